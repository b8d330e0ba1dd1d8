"""The one overlay drawing (:mod:`oxnet.data.overlay`, used by the UI and ``oxnet predict --overlays``) and
the one rescaling of boxes back to original pixels (:func:`oxnet.data.transforms.to_original_pixels`)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from oxnet.data.overlay import ATTENTION_COLOUR, SUGGESTION_COLOUR, draw_overlay, draw_prediction, heatmap
from oxnet.data.transforms import resize_flip, to_original_pixels


def _gray(width=120, height=80, value=60) -> Image.Image:
    return Image.new("L", (width, height), value)


def _coloured(picture: Image.Image, colour) -> np.ndarray:
    """Mask of the pixels drawn in ``colour``."""
    return (np.asarray(picture) == np.asarray(colour, dtype=np.uint8)).all(axis=-1)


def test_the_overlay_module_and_the_uis_imaging_import_no_torch():
    code = "import sys, oxnet.data.overlay, app.imaging; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_boxes_are_drawn_where_scale_and_origin_put_them():
    picture = draw_overlay(_gray(), [(30, 20, 50, 40)], ["S1 Mass 0.90"], scale=2.0, origin=(20.0, 10.0))
    assert picture.mode == "RGB" and picture.size == (120, 80)
    ys, xs = np.nonzero(_coloured(picture, SUGGESTION_COLOUR))
    # (30, 20)-(50, 40) in original pixels, shifted by the origin and doubled: (20, 20)-(60, 60) on the picture
    outline = (ys >= 19) & (xs >= 19)
    assert xs[outline].min() == pytest.approx(20, abs=1) and xs[outline].max() == pytest.approx(60, abs=1)
    assert ys[outline].max() == pytest.approx(60, abs=1)
    assert _coloured(picture, SUGGESTION_COLOUR)[19:, 65:].sum() == 0  # nothing right of the box below its label
    assert _coloured(picture, SUGGESTION_COLOUR)[:19].any()  # the label above it
    assert not _coloured(draw_overlay(_gray()), SUGGESTION_COLOUR).any()
    with pytest.raises(ValueError, match="one label per box"):
        draw_overlay(_gray(), [(1, 1, 5, 5)], [])


def test_attention_is_opaque_where_the_map_peaks_and_placed_on_a_crop():
    grid = [[0.0, 0.0], [0.0, 1.0]]  # peaks bottom right
    picture = np.asarray(draw_overlay(_gray(value=0), attention=grid)).astype(int)
    assert picture[0, 0].tolist() == [0, 0, 0] and picture[-1, -1, 0] > 100 and picture[-1, -1, 0] > picture[-1, -1, 1]
    # a crop showing the top left quarter of a 240 x 160 image at scale 1: no attention there
    crop = np.asarray(draw_overlay(_gray(value=0), attention=grid, origin=(0.0, 0.0), image_size=(240, 160))).astype(int)
    assert crop[: 40, : 60].max() == 0 and crop[-1, -1, 0] > 0
    overlay = heatmap(grid, (4, 4))
    assert overlay.mode == "RGBA" and overlay.getpixel((3, 3))[:3] == ATTENTION_COLOUR
    with pytest.raises(ValueError, match="finite 2-D grid"):
        heatmap([[float("nan")]], (4, 4))
    with pytest.raises(ValueError, match="finite 2-D grid"):
        heatmap([1.0, 2.0], (4, 4))


@pytest.mark.parametrize("tensors", [True, False])
def test_draw_prediction_keeps_boxes_above_the_threshold_and_the_top_class_attention(tensors):
    image = np.full((1, 80, 96), 0.25, dtype=np.float32)
    attention = np.zeros((2, 4, 4), dtype=np.float32)
    attention[1, 3, 3] = 1.0  # class 1 (the more probable) peaks bottom right; class 0 would peak top left
    attention[0, 0, 0] = 1.0
    prediction = {"boxes": np.array([[10, 10, 40, 40], [50, 10, 90, 40]], dtype=np.float32), "scores": np.array([0.9, 0.1]),
                  "labels": np.array([7, 8]), "image_probs": np.array([0.2, 0.8]), "attention": attention}
    if tensors:
        image = torch.from_numpy(image)
        prediction = {k: torch.as_tensor(v) for k, v in prediction.items()}
    picture = draw_prediction(image, prediction, ["Mass", "Nodule"], category_ids=[7, 8], score_threshold=0.5)
    assert picture.mode == "RGB" and picture.size == (96, 80)
    drawn = _coloured(picture, SUGGESTION_COLOUR)
    assert drawn[20:41, 10:41].any() and not drawn[20:41, 45:].any()  # the 0.1 box is left out
    pixels = np.asarray(picture).astype(int)
    assert pixels[-1, -1, 0] > pixels[-1, -1, 2] + 40 and pixels[-1, -1, 0] > pixels[30, 5, 0]  # Nodule's attention


@pytest.mark.parametrize(("orig_h", "orig_w"), [(80, 96), (512, 300), (64, 64)])
def test_to_original_pixels_inverts_the_resize(orig_h, orig_w):
    boxes = torch.tensor([[3.0, 4.0, 40.0, 50.0], [0.0, 0.0, orig_w, orig_h]])
    _, resized = resize_flip(torch.zeros(1, orig_h, orig_w), boxes, 64, flip=False)
    back = to_original_pixels(resized, (64, 64), (orig_h, orig_w))
    assert back.dtype == boxes.dtype and torch.allclose(back, boxes, atol=1e-4)
    # a non-square network input: x scales by the widths, y by the heights; nothing is clamped
    out = to_original_pixels(torch.tensor([[10.0, 10.0, 70.0, 30.0]]), (32, 64), (orig_h, orig_w))
    expected = torch.tensor([[10 * orig_w / 64, 10 * orig_h / 32, 70 * orig_w / 64, 30 * orig_h / 32]])
    assert torch.allclose(out, expected)
    assert to_original_pixels(torch.zeros(0, 4), (64, 64), (orig_h, orig_w)).shape == (0, 4)
