"""DICOM and PNG pixels: window, MONOCHROME1 inversion, 16-bit kept; the window checked against a loop oracle."""

import numpy as np
from PIL import Image as PILImage

from db.imaging import probe_image, read_pixels
from tests.test_db_import import write_dicom


def window_oracle(value, center, width):
    """DICOM PS3.3 C.11.2.1.2.1, one value at a time."""
    if value <= center - 0.5 - (width - 1) / 2:
        return 0.0
    if value > center - 0.5 + (width - 1) / 2:
        return 1.0
    return ((value - (center - 0.5)) / (width - 1)) + 0.5


def test_8bit_monochrome2_is_unchanged(tmp_path):
    pixels = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    out = read_pixels(write_dicom(tmp_path / "a.dcm", pixels))
    assert out.dtype == np.uint8 and np.array_equal(out, pixels)


def test_16bit_window_is_applied_and_kept_16bit(tmp_path):
    pixels = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)) % 4096
    center, width = 1500.0, 1000.0
    out = read_pixels(write_dicom(tmp_path / "b.dcm", pixels, bits_stored=12, window=(center, width)))
    expected = np.array([[round(window_oracle(v, center, width) * 65535) for v in row] for row in pixels.tolist()])
    assert out.dtype == np.uint16 and out.shape == (64, 64)
    assert np.array_equal(out, expected)
    assert len(np.unique(out)) > 256  # more than 8 bits of information survive


def test_monochrome1_is_inverted_after_the_window(tmp_path):
    pixels = np.array([[0, 1000, 2000, 4095]], dtype=np.uint16).repeat(4, axis=0)
    mono2 = read_pixels(write_dicom(tmp_path / "m2.dcm", pixels, bits_stored=12, window=(2048, 4096)))
    mono1 = read_pixels(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1", bits_stored=12, window=(2048, 4096)))
    assert np.array_equal(mono1.astype(int), 65535 - mono2.astype(int))
    assert mono1[0, 0] == 65535 and mono1[0, 3] == 0  # stored 0 is white in MONOCHROME1


def test_16bit_without_window_uses_the_stored_range(tmp_path):
    pixels = np.array([[0, 4095]], dtype=np.uint16)
    out = read_pixels(write_dicom(tmp_path / "c.dcm", pixels, bits_stored=12))
    assert out.tolist() == [[0, 65535]]


def test_png_16bit_and_rgb(tmp_path):
    deep = np.array([[0, 300, 65535]], dtype=np.uint16)
    PILImage.fromarray(deep).save(tmp_path / "deep.png")
    out = read_pixels(tmp_path / "deep.png")
    assert out.dtype == np.uint16 and out.tolist() == deep.tolist()
    assert probe_image(tmp_path / "deep.png").bit_depth == 16
    PILImage.new("RGB", (5, 4), (255, 255, 255)).save(tmp_path / "rgb.jpg")
    rgb = read_pixels(tmp_path / "rgb.jpg")
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 5) and probe_image(tmp_path / "rgb.jpg").photometric == "RGB"


def test_probe_without_verify_reads_header_only(tmp_path):
    path = write_dicom(tmp_path / "d.dcm", np.zeros((20, 30), np.uint8))
    info = probe_image(path, verify=False)
    assert (info.width, info.height, info.sha256, info.format) == (30, 20, None, "DICOM")
