"""A model's output drawn on an image: its boxes (dashed: suggestions, not annotations) with a label
each, and an attention map as a translucent red overlay that is opaque where the map peaks.

Pillow and numpy only, no torch: the Streamlit UI draws the Annotate page's background with
:func:`draw_overlay`, and ``oxnet predict --overlays`` its pictures with :func:`draw_prediction`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["ATTENTION_COLOUR", "SUGGESTION_COLOUR", "draw_overlay", "draw_prediction", "heatmap"]

#: Colour of a model's boxes and their labels.
SUGGESTION_COLOUR = (255, 196, 0)
#: Colour of the attention overlay; its opacity follows the map.
ATTENTION_COLOUR = (255, 40, 0)
#: Opacity (0-1) of the attention overlay where the map peaks.
ATTENTION_OPACITY = 150 / 255
FONT_SIZE = 13


def heatmap(values: Sequence[Sequence[float]] | np.ndarray, size: tuple[int, int], *,
            opacity: float = ATTENTION_OPACITY) -> Image.Image:
    """An RGBA overlay of a 2-D attention map (any grid) stretched to ``size`` (w, h): the map scaled
    to 0-1 as the alpha channel, ``opacity`` where it peaks, transparent where it is lowest."""
    grid = np.asarray(values, dtype=np.float32)
    if grid.ndim != 2 or grid.size == 0 or not np.isfinite(grid).all():
        raise ValueError(f"an attention map must be a finite 2-D grid, got shape {grid.shape}")
    grid = grid - grid.min()
    grid = grid / grid.max() if grid.max() > 0 else grid
    alpha = Image.fromarray(np.rint(grid * round(opacity * 255)).astype(np.uint8), mode="L").resize(size, Image.Resampling.BILINEAR)
    overlay = Image.new("RGBA", size, (*ATTENTION_COLOUR, 0))
    overlay.putalpha(alpha)
    return overlay


def draw_overlay(
    base: Image.Image,
    boxes: Sequence[Sequence[float]] = (),
    labels: Sequence[str] = (),
    attention: Sequence[Sequence[float]] | np.ndarray | None = None,
    *,
    scale: float = 1.0,
    origin: tuple[float, float] = (0.0, 0.0),
    image_size: tuple[int, int] | None = None,
    opacity: float = ATTENTION_OPACITY,
    caption: str | None = None,
) -> Image.Image:
    """``base`` as RGB with ``boxes`` (dashed, each with its label above it) and an ``attention`` overlay.

    ``base`` shows the image region starting at ``origin`` (original pixels) ``scale`` times larger;
    ``boxes`` are (x1, y1, x2, y2) in original pixels. ``image_size`` (w, h): the whole image's size,
    needed to place the attention map when ``base`` is a crop (without it the map covers ``base``).
    ``caption``: a line of text at the top left.
    """
    if len(labels) != len(boxes):
        raise ValueError(f"one label per box: got {len(labels)} labels for {len(boxes)} boxes")
    image = base.convert("RGBA")
    ox, oy = origin
    if attention is not None:
        if image_size is None:
            overlay = heatmap(attention, image.size, opacity=opacity)
        else:
            full = heatmap(attention, (max(1, round(image_size[0] * scale)), max(1, round(image_size[1] * scale))), opacity=opacity)
            left, top = round(ox * scale), round(oy * scale)
            overlay = full.crop((left, top, left + image.width, top + image.height))
        image = Image.alpha_composite(image, overlay)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=FONT_SIZE)
    for box, label in zip(boxes, labels, strict=True):
        bx1, by1, bx2, by2 = (float(v) for v in box)
        x1, y1, x2, y2 = (bx1 - ox) * scale, (by1 - oy) * scale, (bx2 - ox) * scale, (by2 - oy) * scale
        for start in range(int(x1), int(x2), 8):  # dashed outline: suggestions, not annotations
            draw.line([(start, y1), (min(start + 4, x2), y1)], fill=SUGGESTION_COLOUR, width=2)
            draw.line([(start, y2), (min(start + 4, x2), y2)], fill=SUGGESTION_COLOUR, width=2)
        for start in range(int(y1), int(y2), 8):
            draw.line([(x1, start), (x1, min(start + 4, y2))], fill=SUGGESTION_COLOUR, width=2)
            draw.line([(x2, start), (x2, min(start + 4, y2))], fill=SUGGESTION_COLOUR, width=2)
        draw.text((x1 + 3, max(0.0, y1 - 16)), label, fill=SUGGESTION_COLOUR, font=font)
    if caption:
        draw.text((4, 4), caption, fill=SUGGESTION_COLOUR, font=font)
    return image.convert("RGB")


def draw_prediction(
    image: Any,
    prediction: Mapping[str, Any],
    classes: Sequence[str],
    *,
    category_ids: Sequence[int] | None = None,
    score_threshold: float = 0.3,
    alpha: float = 0.5,
) -> Image.Image:
    """A picture of one prediction: the attention map of the most probable class (``alpha``: its opacity
    where it peaks) and the boxes with ``score >= score_threshold`` labelled with class and score.

    Args:
        image: [1, H, W] or [H, W] array-like in [0, 1], the original image (``oxnet.data.load_image``).
        prediction: one item of :func:`oxnet.training.engine.predict` (``boxes`` [N, 4] in the pixels of
            ``image``, ``scores`` [N], ``labels`` [N] category ids, ``image_probs`` [C], ``attention`` [C, h, w];
            tensors or arrays).
        classes: class names in class index order.
        category_ids: the category ids ``predict`` used; default ``1..C``.
    """
    pixels = np.asarray(image, dtype=np.float32)
    gray = np.clip(pixels.reshape(pixels.shape[-2:]), 0.0, 1.0)
    probs = np.asarray(prediction["image_probs"], dtype=np.float32)
    top = int(probs.argmax())
    name_of = dict(zip(category_ids or range(1, len(classes) + 1), classes))
    boxes, labels = [], []
    for box, score, label in zip(np.asarray(prediction["boxes"], dtype=np.float32).reshape(-1, 4).tolist(),
                                 np.asarray(prediction["scores"]).tolist(), np.asarray(prediction["labels"]).tolist()):
        if score >= score_threshold:
            boxes.append(box)
            labels.append(f"{name_of.get(label, label)} {score:.2f}")
    base = Image.fromarray(np.rint(gray * 255).astype(np.uint8), mode="L")
    return draw_overlay(base, boxes, labels, np.asarray(prediction["attention"][top], dtype=np.float32), opacity=alpha,
                        caption=f"attention: {classes[top]} (p={float(probs[top]):.2f})")
