"""Typed training settings: one dataclass and the named training methods. No config DSL.

Example::

    >>> from oxnet.training.settings import TrainConfig
    >>> config = TrainConfig(method="oxnet", preset="tiny", epochs=2, batch_size=4, out_dir="runs/demo")
    >>> config.model_config(num_classes=9).gpa
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from oxnet.modeling import weights_file
from oxnet.modeling.config import PRESETS, ModelConfig
from oxnet.vocabulary import FULL, GRANULARITIES, UNLABELED, WEAK

#: Training methods: which parts of OXnet are switched on, which granularities each can learn from,
#: and whether a mean teacher is needed (only for the soft focal loss).
METHODS: dict[str, dict[str, Any]] = {
    # Plain RetinaNet: focal + box regression on full images only.
    "retinanet": {"daa": False, "gpa": False, "sfl": False, "granularities": (FULL,)},
    # RetinaNet + mean teacher with soft focal loss: full, and weak/unlabeled through the teacher.
    "sfl": {"daa": False, "gpa": False, "sfl": True, "granularities": GRANULARITIES},
    # RetinaNet + image-level head with dual attention alignment: full and weak.
    "daa": {"daa": True, "gpa": False, "sfl": False, "granularities": (FULL, WEAK)},
    # DAA + global prototype alignment: full and weak.
    "daa_gpa": {"daa": True, "gpa": True, "sfl": False, "granularities": (FULL, WEAK)},
    # Everything (the paper's OXnet): full, weak and unlabeled.
    "oxnet": {"daa": True, "gpa": True, "sfl": True, "granularities": GRANULARITIES},
}

#: Default learning rates of Adam: from a random start and from pretrained weights (the paper's 1e-5).
LR_FROM_SCRATCH = 1e-4
LR_PRETRAINED = 1e-5

#: Learning-rate schedules of a phase: "plateau" (``ReduceLROnPlateau`` on validation mAP, per epoch) or
#: "cosine" (per step from ``lr`` to 0 over the phase's epochs x steps per epoch).
SCHEDULES = ("plateau", "cosine")
#: Warm-up starts at this fraction of ``lr`` (detectron2's default WARMUP_FACTOR).
WARMUP_FACTOR = 0.001
#: ``repeat_threshold`` of ``oxnet train --class-balanced``. detectron2's 0.001 is for LVIS's 1,203
#: classes; among the 8-14 findings of a chest X-ray set a class is rare at a few percent of the images.
DEFAULT_REPEAT_THRESHOLD = 0.1


def _default_proportions() -> dict[str, float]:
    return {FULL: 0.5, WEAK: 0.25, UNLABELED: 0.25}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the data. Stored in checkpoints (``to_dict``).

    Args:
        preset: model preset of :data:`oxnet.modeling.config.PRESETS` ("paper", "cpu", "tiny").
        model: :class:`~oxnet.modeling.config.ModelConfig` overrides, e.g. ``{"depth": 50, "image_size": 512}``.
            ``daa``/``gpa``/``sfl`` are set by ``method`` and may not appear here.
        method: one of :data:`METHODS`.
        epochs: epochs of ``method``.
        pretrain_epochs: epochs of plain RetinaNet on the full images first (the authors' recipe); the
            best of them starts both student and teacher. Ignored by ``method="retinanet"``.
        batch_size: images per batch and process.
        proportions: share of each granularity in a batch (``oxnet.data.MixedBatchSampler``).
        steps_per_epoch: batches per epoch; default: every usable image once on average. Fewer caps
            long epochs; more cycles small pools (equal compute for methods that use different pools).
        lr: Adam learning rate; ``None``: 1e-4 from a random start, 1e-5 from pretrained backbone
            weights or ``init_checkpoint``.
        weight_decay: Adam weight decay.
        grad_clip: maximum gradient norm (the authors clip at 0.1); 0 switches clipping off.
        ema_decay: mean teacher decay lambda.
        warmup_steps: the learning rate rises linearly from ``WARMUP_FACTOR`` x lr to lr over the first
            optimizer steps of each phase (0: no warm-up).
        schedule: "plateau": ``ReduceLROnPlateau`` on validation mAP after every epoch; "cosine": cosine
            decay from lr to 0 after every step, over the phase's epochs x steps per epoch after the
            warm-up (a cosine run resumes only with the same ``epochs`` and ``steps_per_epoch``).
        plateau_patience, plateau_factor: ``ReduceLROnPlateau`` on validation mAP (mode "max"); "plateau" only.
        early_stop_patience: stop after this many epochs without a better validation mAP (``None``: never).
        repeat_threshold: class-balanced sampling (repeat factors of Gupta et al., LVIS, 2019) with this
            threshold t in (0, 1]: within the full and the weak pool, an image is drawn
            max(1, sqrt(t / f)) times as often, f the pool's share of images with its rarest class
            (``oxnet.data.sampler.repeat_factors``); ``None``: every image equally often.
        num_workers: DataLoader worker processes.
        seed: seed of the model initialisation, augmentation and batch order.
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
        amp: mixed precision (autocast + GradScaler); ``None``: on for CUDA. Needs CUDA.
        out_dir: folder of the checkpoints (``last.pt``, ``best.pt``, ``pretrain_best.pt``). A run
            restarted with the same ``out_dir`` resumes after its last complete epoch.
        init_checkpoint: warm start: the student (and teacher) start from this checkpoint's student.
    """

    preset: str = "cpu"
    model: dict[str, Any] = field(default_factory=dict)
    method: str = "oxnet"
    epochs: int = 10
    pretrain_epochs: int = 0
    batch_size: int = 4
    proportions: dict[str, float] = field(default_factory=_default_proportions)
    steps_per_epoch: int | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    grad_clip: float = 0.1
    ema_decay: float = 0.99
    warmup_steps: int = 0
    schedule: str = "plateau"
    plateau_patience: int = 2
    plateau_factor: float = 0.1
    early_stop_patience: int | None = 5
    repeat_threshold: float | None = None
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    out_dir: str = "runs/oxnet"
    init_checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        object.__setattr__(self, "model", dict(self.model))
        object.__setattr__(self, "proportions", {k: float(v) for k, v in self.proportions.items()})
        model_fields = {f.name for f in fields(ModelConfig)}
        unknown = set(self.model) - model_fields
        if unknown:
            raise ValueError(f"model: unknown ModelConfig fields {sorted(unknown)}")
        owned = {"daa", "gpa", "sfl", "num_classes"} & set(self.model)
        if owned:
            raise ValueError(f"model: {sorted(owned)} are set by method= and the data, not as model options")
        if self.epochs < 0 or self.pretrain_epochs < 0:
            raise ValueError(f"epochs and pretrain_epochs must be >= 0, got {self.epochs}, {self.pretrain_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1 or None, got {self.steps_per_epoch}")
        unknown = set(self.proportions) - set(GRANULARITIES)
        if unknown:
            raise ValueError(f"proportions: keys must be among {GRANULARITIES}, got {sorted(unknown)}")
        if any(p < 0 or not math.isfinite(p) for p in self.proportions.values()):
            raise ValueError(f"proportions must be finite and >= 0, got {self.proportions}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.plateau_patience < 0 or not 0.0 < self.plateau_factor < 1.0:
            raise ValueError("plateau_patience must be >= 0 and plateau_factor in (0, 1)")
        if self.early_stop_patience is not None and self.early_stop_patience < 1:
            raise ValueError(f"early_stop_patience must be >= 1 or None, got {self.early_stop_patience}")
        if self.repeat_threshold is not None and not 0.0 < self.repeat_threshold <= 1.0:
            raise ValueError(f"repeat_threshold must be in (0, 1] or None, got {self.repeat_threshold}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    def model_config(self, num_classes: int, *, method: str | None = None) -> ModelConfig:
        """The :class:`ModelConfig` of ``preset`` + ``model`` overrides with the flags of ``method``
        (default: this config's method)."""
        flags = {k: v for k, v in METHODS[method or self.method].items() if k != "granularities"}
        return replace(PRESETS[self.preset], num_classes=num_classes, **self.model, **flags)

    def learning_rate(self) -> float:
        """``lr``, or its default: 1e-5 from pretrained weights or a warm start, else 1e-4."""
        if self.lr is not None:
            return self.lr
        weights = self.model.get("weights", PRESETS[self.preset].weights)
        # a self-supervised file from `oxnet pretrain` trains its BatchNorm and random heads: the scratch rate
        pretrained = self.init_checkpoint is not None or (weights != "random" and not weights_file.self_supervised(weights))
        return LR_PRETRAINED if pretrained else LR_FROM_SCRATCH

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (JSON and ``torch.load(weights_only=True)`` safe)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        return cls(**data)
