"""What the pages show of an image: windowed, inverted, fitted to the canvas, with overlays.

Pixels come from :func:`oxnet.data.imaging.read_pixels` (DICOM windows and MONOCHROME1 handled there). The
window/level controls are in percent of the image's value range so they mean the same for 8- and
16-bit data. Rendered images are cached per (file, settings) with ``st.cache_data``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import streamlit as st
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from oxnet.data.imaging import read_pixels, window
from oxnet.data.overlay import draw_overlay

#: Colour of annotated boxes (a reader's or the training label's) drawn by :func:`outline`.
ANNOTATION_COLOUR = (255, 59, 48)


def fit(width: int, height: int, max_width: int, max_height: int) -> tuple[int, int]:
    """The largest (w, h) with the image's aspect ratio inside ``max_width`` x ``max_height`` (at least 1 px)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = min(max_width / width, max_height / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@st.cache_data(ttl=600, max_entries=64, show_spinner=False)
def render(path: str, size: tuple[int, int], level: float = 50.0, width: float = 100.0, invert: bool = False,
           crop: tuple[int, int, int, int] | None = None) -> PILImage.Image:
    """The image at ``path`` (or its ``crop`` (x0, y0, x1, y1) in original pixels) resized to ``size`` (w, h), 8-bit grayscale.

    ``level`` (window centre) and ``width`` are percent of the full value range (0-255 or 0-65535);
    level 50 / width 100 shows the stored values unchanged. ``invert`` flips black and white. A crop
    is a server-side zoom: the region is resampled from the original pixels.
    Raises ValueError (file missing, unreadable or not an image) with the path in the message.
    """
    try:
        pixels = read_pixels(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the file ({e.strerror or e})") from e
    top = 255.0 if pixels.dtype == np.uint8 else 65535.0
    unit = window(pixels.astype(np.float32), level / 100.0 * top, max(1.0, width / 100.0 * top))
    if invert:
        unit = 1.0 - unit
    image = PILImage.fromarray(np.rint(unit * 255).astype(np.uint8), mode="L")
    if crop is not None:
        image = image.crop(crop)
    return image.resize(size, PILImage.Resampling.LANCZOS if size[0] < image.width else PILImage.Resampling.BILINEAR)


@st.cache_data(ttl=600, max_entries=512, show_spinner=False)
def thumbnail(path: str, side: int = 192) -> bytes | None:
    """A PNG thumbnail (longest side ``side``) of the image, or None when it cannot be read."""
    try:
        pixels = read_pixels(path)
    except (OSError, ValueError):
        return None
    if pixels.dtype != np.uint8:
        pixels = (pixels // 257).astype(np.uint8)
    image = PILImage.fromarray(pixels, mode="L")
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def compose(
    base: PILImage.Image,
    scale: float,
    suggestions: Sequence[Mapping[str, Any]] = (),
    attention: Sequence[Sequence[float]] | None = None,
    *,
    origin: tuple[float, float] = (0.0, 0.0),
    image_size: tuple[int, int] | None = None,
) -> PILImage.Image:
    """``base`` as RGB with the model's boxes and an attention overlay (:func:`oxnet.data.overlay.draw_overlay`).

    ``base`` shows the image region starting at ``origin`` (original pixels) ``scale`` times larger;
    boxes are in original pixels and labelled ``S<number>`` (their ``number``, else their place in
    ``suggestions``). ``image_size`` (w, h): the whole image's size, needed to place the attention map
    when ``base`` is a crop.
    """
    labels = [f"S{int(box.get('number', k))} {box.get('class', '?')} {float(box.get('score', 0)):.2f}"
              for k, box in enumerate(suggestions, 1)]
    return draw_overlay(base, [box["bbox"] for box in suggestions], labels, attention, scale=scale, origin=origin,
                        image_size=image_size)


def outline(
    base: PILImage.Image, scale: float, boxes: Sequence[Sequence[Any]], colour: tuple[int, int, int] = ANNOTATION_COLOUR,
) -> PILImage.Image:
    """``base`` as RGB with annotated ``boxes`` ((class, x1, y1, x2, y2) in original pixels, shown ``scale``
    times larger) drawn as solid outlines numbered in order with their class."""
    image = base.convert("RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    for k, (name, x1, y1, x2, y2) in enumerate(boxes, 1):
        corners = [float(x1) * scale, float(y1) * scale, float(x2) * scale, float(y2) * scale]
        draw.rectangle(corners, outline=colour, width=2)
        draw.text((corners[0] + 3, max(0.0, corners[1] - 16)), f"{k} {name}", fill=colour, font=font)
    return image
