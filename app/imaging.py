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

from oxnet.data.imaging import read_pixels, window
from oxnet.data.overlay import draw_overlay


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
