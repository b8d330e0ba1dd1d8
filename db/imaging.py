"""The store's name for the one image reader, :mod:`oxnet.data.imaging` (PNG, JPEG and DICOM).

Kept so that ``from db.imaging import probe_image`` goes on working; the code lives in oxnet, which
the UI, the importers, the trainer and ``oxnet train`` all read images with.
"""

from oxnet.data.imaging import (  # noqa: F401 - re-exported
    DICOM_DECODERS_HINT,
    MAX_PIXELS,
    ImageInfo,
    is_dicom,
    probe_image,
    read_pixels,
    window,
)

__all__ = ["DICOM_DECODERS_HINT", "MAX_PIXELS", "ImageInfo", "is_dicom", "probe_image", "read_pixels", "window"]
