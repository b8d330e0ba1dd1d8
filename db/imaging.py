"""Reading image files in place: PNG, JPEG and DICOM.

:func:`probe_image` checks a file and returns what the store keeps about it (size, bit depth,
photometric interpretation, content hash, and from DICOM only the patient id and view - never names,
birth dates or other identifying text). :func:`read_pixels` returns the pixels for display and training:
DICOM gets its modality LUT and the header's window applied, MONOCHROME1 is inverted so that bone is
bright, and data deeper than 8 bits stays 16-bit.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image as PILImage
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

#: Images larger than this many pixels are refused as decompression bombs (a 16k x 16k radiograph fits).
MAX_PIXELS = 16384 * 16384
#: What to install when a DICOM file uses a compressed transfer syntax nothing here can decode.
DICOM_DECODERS_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or pip install 'oxnet-workbench[dicom]')"

_PIL_FORMATS = {"PNG", "JPEG"}
_PIL_BIT_DEPTH = {"1": 1, "L": 8, "P": 8, "RGB": 8, "RGBA": 8, "LA": 8, "I;16": 16, "I;16B": 16, "I": 16}


@dataclass(frozen=True)
class ImageInfo:
    """What the store keeps about an image file.

    Attributes:
        format: ``"PNG"``, ``"JPEG"`` or ``"DICOM"``.
        width, height: size in pixels (box coordinates refer to these pixels).
        bit_depth: bits per sample as stored (8, 12, 16 ...).
        photometric: ``"MONOCHROME1"``, ``"MONOCHROME2"`` or ``"RGB"``.
        sha256: hex digest of the file's bytes; None when the file was only probed, not verified.
        patient_id, view: from DICOM headers (PatientID, ViewPosition); None for PNG and JPEG.
    """

    format: str
    width: int
    height: int
    bit_depth: int
    photometric: str
    sha256: str | None
    patient_id: str | None = None
    view: str | None = None


def is_dicom(path: Path, head: bytes) -> bool:
    """A DICOM Part 10 file (``DICM`` at byte 128) or a file named ``*.dcm`` / ``*.dicom``."""
    return head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom")


def _check_size(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"{path}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ValueError(
            f"{path}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
            "(possible decompression bomb)"
        )


def _read_dicom(path: Path, data: bytes | None, max_pixels: int) -> pydicom.Dataset:
    """Parse a DICOM file (pixel data deferred when ``data`` is None), check it has pixels and a sane size."""
    try:
        if data is None:
            ds = pydicom.dcmread(path, defer_size="4 KB")
        else:
            ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a readable DICOM file ({e})") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ValueError(f"{path}: DICOM file without pixel data (a report or structured document?)")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"{path}: DICOM photometric interpretation {photometric!r} is not MONOCHROME1/2")
    _check_size(path, int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), max_pixels)
    return ds


def _dicom_array(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """Decode DICOM pixel data; a compressed syntax without a decoder names the package to install."""
    try:
        return ds.pixel_array
    except Exception as e:  # pydicom raises RuntimeError, ValueError, NotImplementedError ... per plugin
        syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
        if syntax is not None and syntax.is_compressed and importlib.util.find_spec("pylibjpeg") is None:
            raise ValueError(
                f"{path}: pixel data is compressed ({syntax.name}) and no installed decoder handles it; "
                f"install one with: {DICOM_DECODERS_HINT}"
            ) from e
        raise ValueError(f"{path}: cannot decode DICOM pixel data ({e})") from e


def _open_pil(path: Path, source: io.BytesIO | Path, max_pixels: int) -> PILImage.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", PILImage.DecompressionBombWarning)
        try:
            image = PILImage.open(source)
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as e:
            raise ValueError(f"{path}: {e} (possible decompression bomb)") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{path}: not a PNG, JPEG or DICOM file ({e})") from e
    if image.format not in _PIL_FORMATS:
        raise ValueError(f"{path}: {image.format} images are not supported (PNG, JPEG or DICOM)")
    _check_size(path, image.width, image.height, max_pixels)
    return image


def probe_image(path: str | Path, *, verify: bool = True, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Check an image file and describe it.

    Args:
        path: a PNG, JPEG or DICOM file.
        verify: read and hash the whole file and decode every pixel (catches truncated and corrupt
            files). False reads only the header and leaves ``sha256`` None.
        max_pixels: refuse larger images (decompression bombs).

    Raises:
        ValueError: naming the file, for a missing, non-image, corrupt or truncated file, a DICOM file
            without pixel data or with a compressed syntax no installed package decodes, or too many pixels.
    """
    path = Path(path)
    try:
        if verify:
            data = path.read_bytes()
            head = data[:132]
        else:
            data = None
            with open(path, "rb") as f:
                head = f.read(132)
    except OSError as e:
        raise ValueError(f"{path}: cannot read file ({e.strerror or e})") from e
    digest = hashlib.sha256(data).hexdigest() if data is not None else None

    if is_dicom(path, head):
        ds = _read_dicom(path, data, max_pixels)
        if verify:
            _dicom_array(path, ds)
        return ImageInfo(
            format="DICOM",
            width=int(ds.Columns),
            height=int(ds.Rows),
            bit_depth=int(ds.get("BitsStored", ds.get("BitsAllocated", 8))),
            photometric=str(ds.PhotometricInterpretation),
            sha256=digest,
            patient_id=str(ds.PatientID) if ds.get("PatientID") else None,
            view=str(ds.ViewPosition) if ds.get("ViewPosition") else None,
        )

    image = _open_pil(path, io.BytesIO(data) if data is not None else path, max_pixels)
    with image:
        if verify:
            try:
                image.load()
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                raise ValueError(f"{path}: corrupt or truncated {image.format} file ({e})") from e
        return ImageInfo(
            format=image.format,
            width=image.width,
            height=image.height,
            bit_depth=_PIL_BIT_DEPTH.get(image.mode, 8),
            photometric="RGB" if image.mode in ("RGB", "RGBA", "P") else "MONOCHROME2",
            sha256=digest,
        )


def window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The DICOM linear VOI window (PS3.3 C.11.2.1.2.1): ``float64`` array in [0, 1]."""
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    scaled = (values - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(scaled, 0.0, 1.0)


def read_pixels(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Grayscale pixels ready for display and training, bright = dense (bone white).

    Returns:
        ``ndarray[H, W]``: ``uint8`` for 8-bit data, ``uint16`` scaled to the full 0-65535 range for
        deeper data. DICOM: modality LUT (rescale slope/intercept), then the first window of the header
        (WindowCenter/WindowWidth) when present, else the stored range 0..2**BitsStored - 1;
        MONOCHROME1 is inverted. PNG/JPEG: colour is converted to luminance.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(132)
    if not is_dicom(path, head):
        with _open_pil(path, path, max_pixels) as image:
            if image.mode in ("I;16", "I;16B", "I"):
                return np.asarray(image, dtype=np.int64).clip(0, 65535).astype(np.uint16)
            return np.asarray(image.convert("L"), dtype=np.uint8)

    ds = _read_dicom(path, path.read_bytes(), max_pixels)
    values = apply_modality_lut(_dicom_array(path, ds), ds).astype(np.float64)
    bits = int(ds.get("BitsStored", 8))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = (float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v) for v in (ds.WindowCenter, ds.WindowWidth))
        unit = window(values, center, width)
    else:
        unit = np.clip(values / (2**bits - 1), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        unit = 1.0 - unit
    if bits <= 8:
        return np.rint(unit * 255).astype(np.uint8)
    return np.rint(unit * 65535).astype(np.uint16)
