"""Checkpoints: plain state_dicts written atomically and read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain Python values (never a pickled module)::

    "format":        "oxnet-checkpoint"
    "version":       1
    "classes":       list of class names (model index i = classes[i])
    "model_config":  ModelConfig.to_dict()
    "train_config":  TrainConfig.to_dict()
    "student":       OXNet state_dict (prototypes included)
    "teacher":       OXNet state_dict of the mean teacher, or None
    "ema_step":      int, EMA steps taken by the teacher
    "optimizer", "scaler", "scheduler": state_dicts (None in inference-only checkpoints)
    "phase":         "pretrain" | "train"
    "epoch":         completed epochs, over both phases
    "step":          optimizer steps, over both phases
    "best_metric":   best validation mAP of the phase, or None
    "history":       History.to_dict()
    "backbone_start": which start the backbone had ("random init", "ImageNet weights (...)",
                     "weights file resnet50.pth", ...); absent in checkpoints written before it was kept

Example::

    >>> from oxnet.training.checkpoint import load_model
    >>> model = load_model("runs/oxnet/best.pt")  # OXNet in eval mode, on the CPU
"""

from __future__ import annotations

import errno
import hashlib
import shutil
from dataclasses import fields, replace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from oxnet.modeling.backbone import bn_frozen
from oxnet.modeling.config import ModelConfig
from oxnet.modeling.detector import OXNet
from oxnet.files import atomic_write

FORMAT = "oxnet-checkpoint"
VERSION = 1
_REQUIRED = ("format", "version", "classes", "model_config", "student")

__all__ = ["FORMAT", "VERSION", "NoSpaceLeft", "ensure_free_space", "file_sha256", "load_checkpoint", "load_model",
           "non_finite_weights", "save_checkpoint", "verify_checkpoint"]


#: Free space kept in reserve beyond a checkpoint's estimated size (bytes).
SPACE_MARGIN = 16 << 20


class NoSpaceLeft(OSError):
    """Not enough free space to write a file; the message names the folder and what is needed."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def ensure_free_space(folder: str | Path, needed: int) -> None:
    """Raise :class:`NoSpaceLeft` when ``folder``'s file system has less than ``needed`` + a margin free."""
    free = shutil.disk_usage(folder).free
    if free < needed + SPACE_MARGIN:
        raise NoSpaceLeft(f"no space left on {folder}: writing a checkpoint needs about {(needed + SPACE_MARGIN) / 2**20:.0f} MiB, "
                          f"{free / 2**20:.0f} MiB are free; free some space (old model versions, runs/) and try again")


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder is written, flushed
    and fsync'ed, then renamed over ``path`` (``os.replace``). If anything fails midway, ``path`` keeps
    its previous content and the temporary file is removed.

    Args:
        state: the checkpoint dict (tensors and plain Python values only); ``format`` and ``version``
            are added.
        path: destination file; its folder is created if needed.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        NoSpaceLeft: (an ``OSError`` with ``errno.ENOSPC``) before writing, when the folder's file
            system has less free space than the tensors' size plus :data:`SPACE_MARGIN`, or when the
            write fails for lack of space. ``path`` is unchanged and no temporary file stays.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, **state}
    needed = _tensor_bytes(state)
    ensure_free_space(path.parent, needed)
    try:
        with atomic_write(path, binary=True) as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as inline_container.cc's RuntimeError
        if getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(path.parent).free < needed + SPACE_MARGIN:
            raise NoSpaceLeft(f"no space left on {path.parent} while writing {path.name}; free some space "
                              "(old model versions, runs/) and try again") from e
        raise
    return path


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code is run).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming ``path``, when the file is truncated or corrupt, not an OXnet checkpoint,
            or of a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a bad file
        raise ValueError(f"checkpoint {path} cannot be read (truncated or corrupt?): {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an OXnet checkpoint (no format={FORMAT!r} entry)")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise ValueError(f"checkpoint {path} lacks the entries {missing}")
    if state["version"] > VERSION:
        raise ValueError(f"checkpoint {path} has format version {state['version']}; this oxnet reads <= {VERSION}")
    return state


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def non_finite_weights(state: Mapping[str, Any]) -> list[str]:
    """Names (``"student.<param>"``, ``"teacher.<param>"``) of floating-point tensors of the checkpoint's
    weights that hold NaN or infinity."""
    bad = []
    for part in ("student", "teacher"):
        for name, tensor in (state.get(part) or {}).items():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad.append(f"{part}.{name}")
    return bad


def verify_checkpoint(path: str | Path, *, sha256: str | None = None) -> dict[str, Any]:
    """Load a checkpoint and check that it is the file that was written and that its weights are finite.

    Args:
        path: the checkpoint file.
        sha256: the digest recorded when it was written (None: not checked, for files from elsewhere).

    Returns:
        The loaded state (see :func:`load_checkpoint`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming ``path``: another checksum than recorded, unreadable, or NaN/inf weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if sha256 is not None:
        actual = file_sha256(path)
        if actual != sha256:
            raise ValueError(f"checkpoint {path} has checksum {actual[:12]}..., not the {sha256[:12]}... recorded "
                             "when it was written (changed or corrupted on disk)")
    state = load_checkpoint(path)
    bad = non_finite_weights(state)
    if bad:
        raise ValueError(f"checkpoint {path} has non-finite (NaN/inf) weights in {len(bad)} tensor(s), e.g. {bad[0]}")
    return state


def stored_model_config(state: Mapping[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` a checkpoint was written with; fields added since take their defaults, so
    an older checkpoint reads as the model it is. ValueError when it names fields this code does not know
    (written by a newer version)."""
    stored = dict(state["model_config"])
    unknown = set(stored) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise ValueError(f"its model_config has fields this version does not know: {sorted(unknown)}")
    return ModelConfig(**stored)


def model_from_state(state: Mapping[str, Any], *, weights: str = "student", source: str = "checkpoint") -> OXNet:
    """Rebuild the model of a loaded checkpoint dict (``weights``: "student" or "teacher"), in eval mode."""
    if weights not in ("student", "teacher"):
        raise ValueError(f"weights must be 'student' or 'teacher', got {weights!r}")
    if state.get(weights) is None:
        raise ValueError(f"{source} holds no {weights} weights")
    try:
        config = stored_model_config(state)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    # the backbone weights are in the state_dict, and so is its BatchNorm kind
    model = OXNet.from_config(replace(config, weights="random", freeze_bn=bn_frozen(state[weights])))
    try:
        model.load_state_dict(state[weights])
    except RuntimeError as e:
        raise ValueError(f"{source}: {weights} weights do not fit its model_config: {e}") from e
    return model.eval()


def load_model(
    path: str | Path, *, weights: str = "student", device: str | torch.device = "cpu"
) -> OXNet:
    """Load an :class:`~oxnet.modeling.detector.OXNet` for inference from a checkpoint file.

    Args:
        path: a checkpoint (``best.pt``, ``last.pt``, ...).
        weights: "student" (the trained detector) or "teacher" (its EMA, when the method has one).
        device: where to put the model.

    Returns:
        The model in eval mode. Its class names are the checkpoint's ``"classes"``.
    """
    state = load_checkpoint(path)
    return model_from_state(state, weights=weights, source=f"checkpoint {path}").to(device)
