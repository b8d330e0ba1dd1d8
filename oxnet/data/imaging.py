"""The one image reader of the workbench: PNG, JPEG and DICOM, read in place.

The importers (``db``), the UI (``app``), the training and scoring loader (:mod:`oxnet.data`) and
``oxnet train`` all read pixels through this module, so an image that imports also trains. It needs
numpy, Pillow and pydicom only (no torch), so ``python -m db`` stays light.

:func:`probe_image` checks a file and returns what the store keeps about it (size, bit depth,
photometric interpretation, content hash, and from DICOM only the patient id and view - never names,
birth dates or other identifying text). :func:`read_pixels` returns the pixels for display and training:
DICOM gets its modality LUT and its VOI LUT or window applied (``pydicom.pixels.apply_voi_lut``),
MONOCHROME1 is inverted so that bone is bright, and data deeper than 8 bits stays 16-bit.

The decompression-bomb limit is :data:`MAX_PIXELS` (16k x 16k); Pillow's own, lower default
(``Image.MAX_IMAGE_PIXELS``, 89.5 Mpx) is not used: it would refuse a legitimate 10,000 x 10,000 radiograph.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pydicom
from PIL import Image as PILImage
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

#: Images larger than this many pixels are refused as decompression bombs (a 16k x 16k radiograph fits).
MAX_PIXELS = 16384 * 16384
#: What to install when a DICOM file uses a compressed transfer syntax nothing here can decode.
DICOM_DECODERS_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or pip install 'oxnet-workbench[dicom]')"

_PIL_FORMATS = {"PNG", "JPEG"}
_PIL_LIMIT_LOCK = threading.Lock()
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
    """Open with Pillow's own bomb check switched off: :func:`_check_size` applies ``max_pixels`` from
    the header, before any pixel is decoded. (Pillow reads ``Image.MAX_IMAGE_PIXELS`` at every open; it
    is a process-wide setting, so it is swapped under a lock only for the duration of ``open``.)"""
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
        previous, PILImage.MAX_IMAGE_PIXELS = PILImage.MAX_IMAGE_PIXELS, None
        try:
            image = PILImage.open(source)
        except PILImage.DecompressionBombError as e:  # pragma: no cover - the limit is off while opening
            raise ValueError(f"{path}: {e} (possible decompression bomb)") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{path}: not a PNG, JPEG or DICOM file ({e})") from e
        finally:
            PILImage.MAX_IMAGE_PIXELS = previous
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
            format=cast(str, image.format),  # _open_pil accepts only PNG / JPEG, so never None
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
        deeper data. DICOM: see :func:`dicom_unit` (modality LUT, VOI LUT or window, MONOCHROME1
        inverted). PNG/JPEG: colour is converted to luminance.

    Raises:
        FileNotFoundError, PermissionError: the file cannot be opened.
        ValueError: naming the file, when it is not a readable image, is corrupt or too large.
    """
    path = Path(path)
    with open(path, "rb") as f:  # FileNotFoundError / PermissionError as they are
        head = f.read(132)
    if not is_dicom(path, head):
        with _open_pil(path, path, max_pixels) as image:
            try:
                if image.mode in ("I;16", "I;16B", "I"):
                    return np.asarray(image, dtype=np.int64).clip(0, 65535).astype(np.uint16)
                return np.asarray(image.convert("L"), dtype=np.uint8)
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                raise ValueError(f"{path}: corrupt or truncated {image.format} file ({e})") from e

    ds = _read_dicom(path, path.read_bytes(), max_pixels)
    stored = _dicom_array(path, ds)
    try:
        unit = dicom_unit(stored, ds)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    bits = int(ds.get("BitsStored", 8))
    if bits <= 8:
        return np.rint(unit * 255).astype(np.uint8)
    return np.rint(unit * 65535).astype(np.uint16)


def _modality_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The range of values the modality LUT can output for this file's stored bits (as pydicom's
    ``apply_windowing`` computes it): the input range of the VOI stage."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = sorted((low * float(slope) + float(intercept), high * float(slope) + float(intercept)))
    return low, high


def dicom_unit(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Stored DICOM pixels as display values in [0, 1] (``float64``), bright = dense.

    Modality LUT (or rescale slope/intercept), then the VOI stage with
    ``pydicom.pixels.apply_voi_lut``: the first VOI LUT of the file when it has one, else its first
    window (WindowCenter/WindowWidth, with its VOI LUT function), else none (the modality output's
    range). The VOI output is scaled by its own range (the LUT's bit depth, or the window's output
    range), and MONOCHROME1 is inverted.
    """
    values = apply_modality_lut(stored, ds)
    low, high = _modality_range(ds)
    if ds.get("VOILUTSequence"):
        values = apply_voi_lut(values, ds, prefer_lut=True)
        low, high = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            values = apply_voi_lut(values, ds, prefer_lut=False)
        except ValueError as e:  # a window width < 1, an unknown VOI LUT function
            raise ValueError(f"cannot apply the file's window: {e}") from e
    unit = np.clip((np.asarray(values, dtype=np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        unit = 1.0 - unit
    return unit
