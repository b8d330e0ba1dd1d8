"""Backbone weights files: a torchvision ResNet state_dict and, optionally, a description beside it.

A weights file stays a plain torchvision ResNet state_dict (``resnet.load_state_dict(sd, strict=False)``
works), so it cannot carry text. ``oxnet pretrain`` therefore writes a JSON file next to it, named
``<weights file>.json``::

    {"format": "oxnet-backbone", "version": 1,
     "description": "self-supervised: simsiam, 2000 images, 10 epochs",
     "freeze_bn": false,            # the detector's BatchNorm default for this start
     "method": "simsiam", "depth": 18, "image_size": 128, "images": 2000, "epochs": 10, ...}

The detector reads it when it loads the file: the model's ``backbone_start`` becomes ``"weights file
X.pth (self-supervised: simsiam, 2000 images, 10 epochs)"`` and ``freeze_bn=None`` follows the file's
``freeze_bn``. A weights file without the JSON (from torchvision or elsewhere) is described by its name
and freezes BatchNorm, as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT = "oxnet-backbone"

__all__ = ["FORMAT", "describe", "freeze_bn_default", "info_path", "read_info", "self_supervised"]


def info_path(weights: str | Path) -> Path:
    """The description file of a weights file: ``<weights>.json``."""
    return Path(f"{weights}.json")


def read_info(weights: str | Path) -> dict[str, Any] | None:
    """The description of a weights file, or None when it has none (or ``weights`` is not a file path).

    Raises:
        ValueError: naming the JSON file, when it exists but is not an ``oxnet-backbone`` description.
    """
    if str(weights) in ("random", "imagenet"):
        return None
    path = info_path(weights)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: the description of {Path(weights).name} cannot be read: {e}") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path} is not a backbone description (no format={FORMAT!r} entry); remove it or fix it")
    return info


def describe(weights: str | Path) -> str:
    """``"weights file X.pth"``, followed by the file's description in brackets when it has one."""
    info = read_info(weights)
    text = f"weights file {Path(weights).name}"
    if info and info.get("description"):
        text += f" ({info['description']})"
    return text


def freeze_bn_default(weights: str | Path) -> bool:
    """Whether BatchNorm should be frozen when ``freeze_bn`` is not given: the description's ``freeze_bn``,
    else True (ImageNet weights and foreign files: the paper freezes BatchNorm)."""
    info = read_info(weights)
    return bool(info.get("freeze_bn", True)) if info else True


def self_supervised(weights: str | Path) -> bool:
    """Whether ``weights`` is a file written by ``oxnet pretrain`` (it has an ``oxnet-backbone`` description)."""
    return read_info(weights) is not None
