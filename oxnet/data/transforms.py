"""Image loading and the augmentations of the two views (student and teacher).

Geometry (resize without cropping, horizontal flip) is shared by both views so that teacher predictions
line up with the student's; photometry (gamma, brightness, contrast, gaussian noise, cutout) is drawn per
view. Everything random takes an explicit ``torch.Generator``, so a sample is reproducible from
(seed, epoch, index) whatever the worker that loads it. The kernels are ``torchvision.transforms.v2``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor
from torchvision import tv_tensors

from oxnet.data.imaging import read_pixels


def load_image(path: str | Path) -> Tensor:
    """Read a PNG, JPEG or DICOM file as a float image in [0, 1], through :func:`oxnet.data.imaging.read_pixels`
    (the reader the store and the UI use: DICOM VOI LUT/window, MONOCHROME1 inverted).

    8-bit data is divided by 255 and deeper data (16-bit PNG, 12- to 16-bit DICOM) by 65535; colour
    images are converted to grayscale (ITU-R 601-2 luma).

    Returns:
        Tensor[1, H, W] float32 in [0, 1].

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the file when it cannot be read or decoded.
    """
    try:
        pixels = read_pixels(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{path}: cannot read the file ({e.strerror or e})") from e
    scale = 255.0 if pixels.dtype == np.uint8 else 65535.0
    return torch.from_numpy(pixels.astype(np.float32) / scale).unsqueeze(0)


def resize_flip(
    image: Tensor, boxes: Tensor, size: int, flip: bool
) -> tuple[Tensor, Tensor]:
    """Resize to ``size`` x ``size`` without cropping (aspect ratio not kept), then optionally flip.

    Args:
        image: Tensor[1, H, W] float in [0, 1].
        boxes: Tensor[K, 4] float in (x1, y1, x2, y2), pixels of ``image``.
        size: side of the square output.
        flip: mirror left-right.

    Returns:
        image Tensor[1, size, size] and boxes Tensor[K, 4] in (x1, y1, x2, y2), pixels of the output.
    """
    image = tv_tensors.Image(image)
    boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))
    image, boxes = F.resize(image, [size, size], antialias=True), F.resize(boxes, [size, size])
    if flip:
        image, boxes = F.horizontal_flip(image), F.horizontal_flip(boxes)
    return image.as_subclass(Tensor).clamp_(0.0, 1.0), boxes.as_subclass(Tensor)


def to_original_pixels(boxes: Tensor, size: tuple[int, int], orig_size: tuple[int, int]) -> Tensor:
    """Boxes found on the network input back in the original image's pixels: the inverse of the resize
    of :func:`resize_flip` (which resizes without keeping the aspect ratio; the flip is not undone).

    Args:
        boxes: Tensor[N, 4] in (x1, y1, x2, y2), pixels of the network input.
        size: (height, width) of the network input.
        orig_size: (height, width) of the original image (a sample's ``orig_size``).

    Returns:
        Tensor[N, 4] in (x1, y1, x2, y2), original pixels, same dtype and device; not clamped.
    """
    return F.resize_bounding_boxes(boxes, canvas_size=(int(size[0]), int(size[1])), size=[int(orig_size[0]), int(orig_size[1])])[0]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


@dataclass(frozen=True)
class Photometric:
    """Random intensity changes of one view; zero strength switches a change off.

    Args:
        gamma: gamma drawn log-uniformly from [exp(-gamma), exp(gamma)].
        brightness: multiplicative factor drawn from [1 - brightness, 1 + brightness].
        contrast: contrast factor (blend with the mean) drawn from [1 - contrast, 1 + contrast].
        noise: standard deviation of additive gaussian noise drawn from [0, noise].
        cutout: number of rectangles filled with the image mean, drawn from [0, cutout].
        cutout_size: largest rectangle side as a fraction of the image side; sides are drawn from
            [cutout_size / 2, cutout_size].
    """

    gamma: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    noise: float = 0.0
    cutout: int = 0
    cutout_size: float = 0.0

    def __post_init__(self) -> None:
        if min(self.gamma, self.brightness, self.contrast, self.noise, self.cutout) < 0:
            raise ValueError(f"augmentation strengths must be >= 0, got {self}")
        if self.brightness > 1 or self.contrast > 1:
            raise ValueError(f"brightness and contrast must be <= 1, got {self}")
        if self.cutout and not 0 < self.cutout_size <= 1:
            raise ValueError(f"cutout_size must be in (0, 1] when cutout > 0, got {self.cutout_size}")

    def __call__(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """Tensor[1, H, W] in [0, 1] -> augmented Tensor[1, H, W] in [0, 1] (a new tensor)."""
        if self.gamma:
            image = F.adjust_gamma(image, float(np.exp(_uniform(generator, -self.gamma, self.gamma))))
        if self.brightness:
            image = F.adjust_brightness(image, _uniform(generator, 1 - self.brightness, 1 + self.brightness))
        if self.contrast:
            image = F.adjust_contrast(image, _uniform(generator, 1 - self.contrast, 1 + self.contrast))
        if self.noise:
            std = _uniform(generator, 0.0, self.noise)
            image = image + std * torch.randn(image.shape, generator=generator, dtype=image.dtype)
        image = image.clamp(0.0, 1.0)
        height, width = image.shape[-2:]
        count = int(torch.randint(self.cutout + 1, (), generator=generator)) if self.cutout else 0
        for _ in range(count):
            h = max(1, int(_uniform(generator, self.cutout_size / 2, self.cutout_size) * height))
            w = max(1, int(_uniform(generator, self.cutout_size / 2, self.cutout_size) * width))
            i = int(torch.randint(height - h + 1, (), generator=generator))
            j = int(torch.randint(width - w + 1, (), generator=generator))
            image = F.erase(image, i, j, h, w, image.mean())
        return image


#: Mild changes for the student view (no cutout: the student's boxes must stay visible).
STUDENT_AUGMENT = Photometric(gamma=0.1, brightness=0.1, contrast=0.1, noise=0.01)
#: Stronger changes and cutout for the teacher view (the mean teacher's second view).
TEACHER_AUGMENT = Photometric(gamma=0.3, brightness=0.25, contrast=0.25, noise=0.03, cutout=3, cutout_size=0.2)
