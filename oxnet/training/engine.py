"""The training engine: a plain loop in the style of torchvision's detection references.

- :func:`train_one_round`: batches -> loss dict -> sum -> finite check -> backward -> clip -> step -> EMA
  -> per-step learning-rate schedule (warm-up, cosine).
- :func:`fit`: datasets, mixed sampler and loaders for the granularities the method can use, optional
  RetinaNet pretraining, epochs, and after each epoch the end-of-epoch steps of :class:`_Run`: validate
  (mAP), schedule (``ReduceLROnPlateau``, unless the schedule is cosine), record, early stop, checkpoint (atomic ``last.pt``,
  ``best.pt``), report; resume, progress callback; runs under ``torchrun`` as well
  (:mod:`oxnet.training.distributed`).

Prediction and evaluation of a trained model are in :mod:`oxnet.evaluation.predict`.

Example::

    >>> from oxnet.data import records_from_coco
    >>> from oxnet.training.engine import fit
    >>> from oxnet.training.settings import TrainConfig
    >>> train = records_from_coco("train.json") + records_from_coco("weak.json", granularity="weak")
    >>> val = records_from_coco("val.json")
    >>> history = fit(train, val, TrainConfig(method="oxnet", preset="cpu", epochs=10), classes=val.classes)
    >>> history.best_metric, history.best_checkpoint
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from oxnet.training.checkpoint import load_checkpoint, save_checkpoint
from oxnet.data.datasets import OmniDataset, collate
from oxnet.data.records import Record
from oxnet.data.sampler import MixedBatchSampler
from oxnet.evaluation.metrics import evaluate
from oxnet.evaluation.predict import ground_truth, predict
from oxnet.modeling.backbone import bn_frozen
from oxnet.modeling.config import ModelConfig
from oxnet.modeling.detector import OXNet
from oxnet.training.distributed import Dist, average_batchnorm_stats, current_world_size, distributed, to_device
from oxnet.training.settings import METHODS, WARMUP_FACTOR, TrainConfig
from oxnet.modeling.teacher import MeanTeacher
from oxnet.vocabulary import AP40, GRANULARITIES, MAP

__all__ = [
    "History",
    "Progress",
    "fit",
    "train_one_round",
]

logger = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
PRETRAIN_BEST = "pretrain_best.pt"
#: Settings that must match for a run to resume from an existing ``last.pt``.
_RESUME_KEYS = ("preset", "model", "method", "pretrain_epochs", "seed", "schedule", "warmup_steps")
#: ... and with ``schedule="cosine"``, which lays the learning rate out over the phase's steps.
_COSINE_RESUME_KEYS = ("epochs", "steps_per_epoch")


# --------------------------------------------------------------------------------------------------
# One round of training
# --------------------------------------------------------------------------------------------------
Batch = tuple[Tensor, Tensor, list[dict[str, Any]]]


def _target_to(target: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in target.items()}


def train_one_round(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Batch],
    *,
    device: str | torch.device,
    grad_clip: float = 0.1,
    teacher: MeanTeacher | None = None,
    scaler: torch.amp.GradScaler | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    epoch: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train over ``loader`` once.

    Each batch ``(images, teacher_images, targets)`` (see :func:`oxnet.data.collate`: images
    Tensor[B, 1, S, S] in [0, 1], boxes (x1, y1, x2, y2) in input pixels) goes: teacher pseudo-labels
    (when ``teacher`` is given) -> ``model(images, targets)`` loss dict -> sum (the model applies its
    ``loss_weights``) -> finite check -> backward -> gradient-norm clipping -> optimizer step -> EMA
    update of the teacher -> ``scheduler`` step.

    Args:
        model: the student :class:`~oxnet.modeling.detector.OXNet`, or it wrapped in ``DistributedDataParallel``.
        optimizer: optimizer of the student's parameters.
        loader: batches as produced by ``oxnet.data.collate``.
        device: where the model is; batches are moved there (channels_last on CUDA).
        grad_clip: maximum total gradient norm; 0 switches clipping off.
        teacher: the :class:`~oxnet.modeling.teacher.MeanTeacher` whose student ``model`` is, for methods with
            soft focal loss; ``None`` otherwise.
        scaler: a ``GradScaler`` for mixed precision; autocast (float16) is on when it is enabled.
        scheduler: a per-step learning-rate schedule, stepped after every step (after ``on_step``, which so
            sees the learning rate the step used), as the warm-up of torchvision's detection references.
        epoch: only used in messages.
        on_step: called after every step with (step index, the step's losses as floats, "total" included).

    Returns:
        The mean of every named loss over the round, plus "total" (their sum). Under torch.distributed
        the values are averaged over the processes.

    Raises:
        FloatingPointError: a loss is NaN or infinite; the message names the epoch, the step, the
            non-finite losses and the image ids of the batch.
        ValueError: ``loader`` yields no batch.
    """
    device = torch.device(device)
    student = teacher.student if teacher is not None else getattr(model, "module", model)
    params = [p for p in student.parameters() if p.requires_grad]
    amp_scaler = scaler if scaler is not None and scaler.is_enabled() else None
    amp = amp_scaler is not None
    world = current_world_size()
    model.train()
    if teacher is not None:
        teacher.train()  # the student trains, the teacher stays in eval mode
    sums: Tensor | None = None
    names: list[str] = []
    steps = 0
    for step, (images, teacher_images, targets) in enumerate(loader):
        images = to_device(images, device)
        targets = [_target_to(t, device) for t in targets]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            if teacher is not None:
                targets = teacher.pseudo_label(to_device(teacher_images, device), targets)
            losses = model(images, targets)
        names = list(losses)
        total = torch.stack([losses[k].float() for k in names]).sum()
        values = torch.stack([losses[k].detach().float() for k in names] + [total.detach()])
        if world > 1:
            dist.all_reduce(values)
            values /= world
        floats = [v + 0.0 for v in values.tolist()]  # + 0.0: unused losses read 0.0, not -0.0
        bad = [f"{k}={v}" for k, v in zip(names + ["total"], floats) if not math.isfinite(v)]
        if bad:
            ids = [t.get("image_id") for t in targets]
            raise FloatingPointError(
                f"non-finite loss at epoch {epoch}, step {step}: {', '.join(bad)} (batch image ids {ids}); "
                "lower the learning rate or check these images and their boxes"
            )
        if amp_scaler is not None:
            amp_scaler.scale(total).backward()
            amp_scaler.unscale_(optimizer)
        else:
            total.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(params, grad_clip)
        if amp_scaler is not None:
            amp_scaler.step(optimizer)
            amp_scaler.update()
        else:
            optimizer.step()
        if world > 1:
            average_batchnorm_stats(student)
        if teacher is not None:
            teacher.update_teacher()
        sums = values if sums is None else sums + values
        steps += 1
        if on_step is not None:
            on_step(step, dict(zip(names + ["total"], floats)))
        if scheduler is not None:
            scheduler.step()
    if sums is None:
        raise ValueError("train_one_round: the loader yielded no batch")
    return dict(zip(names + ["total"], [v + 0.0 for v in (sums / steps).tolist()]))



# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """What :func:`fit` reports to its callback after every step (``kind="step"``) and after every
    epoch's validation (``kind="epoch"``, with ``metrics``)."""

    kind: str
    phase: str  # "pretrain" (plain RetinaNet first) or "train"
    epoch: int  # 0-based, counted over both phases
    epochs: int  # total epochs over both phases
    step: int  # steps done in this epoch
    steps_per_epoch: int
    global_step: int
    losses: dict[str, float]
    lr: float  # of this step ("step"); of the next epoch's first step ("epoch")
    elapsed_s: float
    eta_s: float  # seconds left, estimated
    metrics: dict[str, Any] | None = None


@dataclass
class History:
    """Per-epoch record of a :func:`fit` run.

    ``epochs``: one dict per epoch: "epoch" (0-based over both phases), "phase", "losses" (means),
    "metrics" (validation metrics of :func:`oxnet.evaluation.metrics.evaluate`), "lr" (of the epoch's first
    step), "steps", "seconds".
    ``best_epoch``/``best_metric``: the best validation mAP of the "train" phase; ``best_checkpoint``
    holds that model.
    """

    out_dir: str
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None
    stopped_early: bool = False

    @property
    def best_checkpoint(self) -> Path | None:
        return Path(self.out_dir) / BEST if self.best_epoch is not None else None

    @property
    def last_checkpoint(self) -> Path:
        return Path(self.out_dir) / LAST

    def done(self, phase: str) -> int:
        """Epochs completed in ``phase``."""
        return sum(e["phase"] == phase for e in self.epochs)

    def best(self, phase: str) -> tuple[int | None, float | None]:
        """(epoch, mAP) of the best validation mAP in ``phase``; the first epoch wins ties."""
        best: tuple[int | None, float | None] = (None, None)
        for e in self.epochs:
            score = e["metrics"][MAP]
            if e["phase"] == phase and (best[1] is None or score > best[1]):
                best = (e["epoch"], score)
        return best

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        return cls(**data)


def _phases(config: TrainConfig) -> list[tuple[str, str, int]]:
    """(phase, method, epochs) in order: optional RetinaNet pretraining, then the method."""
    if config.pretrain_epochs and config.method != "retinanet":
        return [("pretrain", "retinanet", config.pretrain_epochs), ("train", config.method, config.epochs)]
    return [("train", config.method, config.epochs)]


def _carry_moments(optimizer: torch.optim.Optimizer, stored: Mapping[str, Any]) -> bool:
    """Warm start: continue the stored optimizer's per-parameter state (Adam's moments) with this run's
    hyper-parameters. A fresh Adam after a warm start moves every weight by about ``lr`` in its first
    steps (its moments are zero), a jolt that undoes part of the pre-training; continuing the moments
    makes the switch from RetinaNet to OXnet a continuation. Returns False, changing nothing, when the
    stored state does not fit (other parameters or shapes)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [i for group in stored["param_groups"] for i in group["params"]]
    if len(saved) != len(params) or len(stored["param_groups"]) != len(optimizer.param_groups):
        return False
    for index, p in zip(saved, params):
        moments = stored["state"].get(index, {})
        if any(torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape for v in moments.values()):
            return False
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(dict(stored))  # a shallow copy, as load_state_dict makes itself
    for group, own in zip(optimizer.param_groups, hyper):
        group.update(own)
    return True


def _usable_records(records: Sequence[Record], method: str, proportions: Mapping[str, float], log: Callable) -> list[Record]:
    """The records ``method`` learns from, with a clear log line for every granularity left out."""
    counts = Counter(r.granularity for r in records)
    usable = METHODS[method]["granularities"]
    used = {g for g in usable if counts[g] and proportions.get(g, 0) > 0}
    for g in GRANULARITIES:
        if counts[g] and g not in usable:
            log(
                logging.WARNING,
                "method %r cannot learn from %s images: %d %s training images are left out (it uses %s images)",
                method, g, counts[g], g, "/".join(usable),
            )
        elif counts[g] and g not in used:
            log(logging.WARNING, "proportions give %s images a share of 0: %d %s images are left out", g, counts[g], g)
    kept = [r for r in records if r.granularity in used]
    if not kept:
        raise ValueError(f"no training images that method {method!r} can use ({dict(counts)}, proportions {dict(proportions)})")
    log(
        logging.INFO,
        "method %r trains on %s",
        method, ", ".join(f"{counts[g]} {g}" for g in GRANULARITIES if g in used),
    )
    return kept


def _check_resumable(state: Mapping[str, Any], config: TrainConfig, classes: Sequence[str], path: Path) -> None:
    stored = state.get("train_config") or {}
    ours, defaults = config.to_dict(), TrainConfig().to_dict()  # a setting newer than the checkpoint: its default
    keys = _RESUME_KEYS + (_COSINE_RESUME_KEYS if config.schedule == "cosine" else ())
    diffs = [k for k in keys if stored.get(k, defaults[k]) != ours[k]]
    if list(state["classes"]) != list(classes):
        diffs.append("classes")
    if diffs:
        raise ValueError(
            f"{path} belongs to a run with other settings ({', '.join(diffs)} differ); "
            "resume with the same settings, or choose another out_dir"
        )


def fit(
    train_records: Sequence[Record],
    val_records: Sequence[Record],
    config: TrainConfig,
    *,
    classes: Sequence[str] | None = None,
    callback: Callable[[Progress], None] | None = None,
    progress: bool = True,
) -> History:
    """Train ``config.method`` on ``train_records`` and validate on ``val_records`` every epoch.

    The training records may mix full, weak and unlabeled images; those the method cannot learn from
    are left out with a log line saying so. With ``config.pretrain_epochs`` plain RetinaNet is first
    trained on the full images; its best epoch (by validation mAP) starts student and teacher.
    The learning rate warms up over ``config.warmup_steps`` steps of each phase, then follows
    ``config.schedule`` (see :func:`_lr_schedulers`).
    After every epoch: validation mAP (predictions in original pixels against the records' boxes),
    ``ReduceLROnPlateau`` (mode "max"; schedule "plateau"), ``last.pt`` and, when mAP improved, ``best.pt`` in
    ``config.out_dir``; training stops early after ``config.early_stop_patience`` epochs without
    improvement. If ``out_dir`` holds a ``last.pt`` of the same settings, the run resumes after its last
    complete epoch (``epochs`` may be raised to train longer).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains its slice of each batch in
    DistributedDataParallel; rank 0 validates, logs and writes checkpoints.

    Args:
        train_records: training images (``oxnet.data.Record``), any granularities.
        val_records: fully labeled validation images.
        config: the settings.
        classes: class names (model index i = ``classes[i]``); default ``train_records.classes``.
        callback: receives a :class:`Progress` after every step and every epoch (rank 0 only).
        progress: show a tqdm bar (rank 0 only).

    Returns:
        The :class:`History` (also stored in the checkpoints).
    """
    classes = list(classes if classes is not None else getattr(train_records, "classes", None) or [])
    if not classes:
        raise ValueError("classes are required (pass classes=, or Records from oxnet.data.records_from_coco)")
    truth = ground_truth(val_records, classes)
    if not truth["annotations"]:
        raise ValueError("val_records have no boxes: validation mAP is undefined")
    out_dir = Path(config.out_dir)
    last_path = out_dir / LAST
    resume = load_checkpoint(last_path) if last_path.is_file() else None
    if resume is not None:
        _check_resumable(resume, config, classes, last_path)
    history = History.from_dict(resume["history"]) if resume is not None else History(out_dir=str(out_dir))
    history.out_dir = str(out_dir)

    with distributed(config.device) as env:

        def log(level: int, message: str, *args: Any) -> None:
            if env.is_main:
                logger.log(level, message, *args)

        if resume is not None:
            log(logging.INFO, "resuming %s after epoch %d", last_path, resume["epoch"])
        amp = config.amp if config.amp is not None else env.device.type == "cuda"
        if amp and env.device.type != "cuda":
            raise ValueError("amp=True needs a CUDA device")
        phases = _phases(config)
        run = _Run(config, classes, train_records, val_records, truth, env, amp, history, callback, progress, log)
        run.total_epochs = sum(n for _, _, n in phases)
        first_epoch = 0
        for index, (phase, method, epochs) in enumerate(phases):
            if not history.stopped_early and history.done(phase) < epochs:
                state = init = None
                if resume is not None and resume["phase"] == phase:
                    state = resume
                elif index > 0:  # after pretraining: student and teacher start from its best epoch
                    init = load_checkpoint(out_dir / PRETRAIN_BEST)
                elif config.init_checkpoint:
                    init = load_checkpoint(config.init_checkpoint)
                run.phase(phase, method, epochs, first_epoch=first_epoch, state=state, init=init)
            first_epoch += epochs
    return history


@dataclass
class _Parts:
    """What one phase trains, built by :meth:`_Run._build` (from scratch, resumed or warm-started)."""

    model_config: ModelConfig
    student: OXNet
    teacher: MeanTeacher | None
    model: nn.Module  # the student, or it wrapped in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None  # per epoch, on validation mAP
    step_scheduler: torch.optim.lr_scheduler.LRScheduler | None  # per optimizer step


def _lr_schedulers(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> tuple[torch.optim.lr_scheduler.ReduceLROnPlateau | None, torch.optim.lr_scheduler.LRScheduler | None]:
    """The learning-rate schedule of a phase of ``total_steps`` optimizer steps: (per epoch, per step).

    - warm-up (``warmup_steps`` > 0): ``LinearLR`` from ``WARMUP_FACTOR`` x lr to lr over the first
      ``warmup_steps`` steps;
    - "plateau": then ``ReduceLROnPlateau`` on validation mAP after every epoch (it multiplies the
      current rate, so it also applies during a warm-up that spans epochs);
    - "cosine": then ``CosineAnnealingLR`` from lr to 0 over the remaining steps (``SequentialLR`` after
      the warm-up); no plateau scheduler.
    """
    per_step: list[torch.optim.lr_scheduler.LRScheduler] = []
    if config.warmup_steps:
        per_step.append(torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=WARMUP_FACTOR, total_iters=config.warmup_steps))
    plateau = None
    if config.schedule == "cosine":
        per_step.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - config.warmup_steps)))
    else:
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=config.plateau_factor, patience=config.plateau_patience
        )
    if len(per_step) == 2:
        return plateau, torch.optim.lr_scheduler.SequentialLR(optimizer, per_step, milestones=[config.warmup_steps])
    return plateau, per_step[0] if per_step else None


class _Run:
    """The state shared by the phases of one :func:`fit` call. :meth:`phase` trains epochs; after each,
    the end-of-epoch steps run in order: :meth:`_validate`, :meth:`_schedule`, :meth:`_record`,
    :meth:`_early_stop`, :meth:`_log_epoch`, :meth:`_checkpoint`, :meth:`_report_epoch`."""

    def __init__(
        self,
        config: TrainConfig,
        classes: list[str],
        train_records: Sequence[Record],
        val_records: Sequence[Record],
        truth: dict[str, Any],
        env: Dist,
        amp: bool,
        history: History,
        callback: Callable[[Progress], None] | None,
        progress: bool,
        log: Callable[..., None],
    ) -> None:
        self.config = config
        self.classes = classes
        self.train_records = train_records
        self.val_records = val_records
        self.truth = truth  # COCO ground truth of the validation records
        self.env = env
        self.amp = amp
        self.history = history
        self.callback = callback if env.is_main else None
        self.progress = progress and env.is_main
        self.log = log
        self.out_dir = Path(config.out_dir)
        self.total_epochs = 0
        self.global_step = sum(e["steps"] for e in history.epochs)
        self.started = time.perf_counter()
        self.epoch_seconds = 0.0  # time spent in the current epoch so far

    def _build(
        self, method: str, state: Mapping[str, Any] | None, init: Mapping[str, Any] | None, total_steps: int
    ) -> _Parts:
        """The phase's model, teacher, optimizer, scaler and schedulers (``total_steps`` optimizer steps)."""
        config, device = self.config, self.env.device
        model_config = config.model_config(len(self.classes), method=method)
        torch.manual_seed(config.seed)
        source = state or init
        if source is None:
            student = OXNet.from_config(model_config)
            self.backbone_start = student.backbone_start
        else:  # the weights come from the checkpoint: no download, and its BatchNorm kind
            student = OXNet.from_config(replace(model_config, weights="random", freeze_bn=bn_frozen(source["student"])))
            self.backbone_start = source.get("backbone_start") or "unknown (a checkpoint from before this was recorded)"
            try:
                student.load_state_dict(source["student"])
            except RuntimeError as e:
                raise ValueError(f"the checkpoint's student weights do not fit the model of this run: {e}") from e
        student.to(device)
        if device.type == "cuda":
            student.to(memory_format=torch.channels_last)
        teacher = MeanTeacher(student, ema_decay=config.ema_decay) if METHODS[method]["sfl"] else None
        if teacher is not None and state is not None:
            teacher.teacher.load_state_dict(state["teacher"])
            teacher.ema_step.fill_(int(state["ema_step"]))
        model: nn.Module = student
        if self.env.world_size > 1:
            pools = {r.granularity for r in self.train_records} & set(METHODS[method]["granularities"])
            # BatchNorm statistics are averaged after every step instead of broadcast from rank 0 at
            # every forward (newer torch names the keyword forward_sync_buffers).
            no_buffer_sync: dict[str, Any] = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else {"broadcast_buffers": False}
            )
            model = DistributedDataParallel(
                student,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=not model_config.daa or config.batch_size < len(pools),
                **no_buffer_sync,
            )
        optimizer = torch.optim.Adam(student.parameters(), lr=config.learning_rate(), weight_decay=config.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=self.amp)
        scheduler, step_scheduler = _lr_schedulers(optimizer, config, total_steps)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            if step_scheduler is not None:
                step_scheduler.load_state_dict(state["step_scheduler"])
        elif init is not None and init.get("optimizer") is not None:
            if not _carry_moments(optimizer, init["optimizer"]):
                self.log(logging.WARNING, "warm start: the checkpoint's optimizer state does not fit; Adam starts afresh")
        return _Parts(model_config, student, teacher, model, optimizer, scaler, scheduler, step_scheduler)

    def _loader(self, method: str) -> DataLoader:
        config, env = self.config, self.env
        records = _usable_records(self.train_records, method, config.proportions, self.log)
        size = config.model_config(len(self.classes), method=method).image_size
        dataset = OmniDataset(records, num_classes=len(self.classes), size=size, train=True, seed=config.seed)
        balanced = config.repeat_threshold is not None
        sampler = MixedBatchSampler(
            dataset.granularities, config.batch_size, config.proportions, num_batches=config.steps_per_epoch,
            seed=config.seed, rank=env.rank, world_size=env.world_size,
            class_sets=dataset.class_sets if balanced else None, repeat_threshold=config.repeat_threshold,
        )
        for g, repeats in sampler.repeats.items():
            if repeats is not None:
                self.log(logging.INFO, "class-balanced sampling (threshold %g): repeat factors of the %s images: "
                         "mean %.2f, max %.2f", config.repeat_threshold, g, repeats.mean(), repeats.max())
        return DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=config.num_workers,
            pin_memory=env.device.type == "cuda",
        )

    def phase(self, phase: str, method: str, epochs: int, *, first_epoch: int, state, init) -> None:
        """Train ``epochs`` epochs of ``method`` (global epoch numbers start at ``first_epoch``), from
        ``state`` (resume: a ``last.pt``) or ``init`` (warm start: student weights) or scratch."""
        loader = self._loader(method)
        parts = self._build(method, state, init, total_steps=epochs * len(loader))
        for local in range(self.history.done(phase), epochs):
            epoch = first_epoch + local
            cast(OmniDataset, loader.dataset).set_epoch(epoch)  # the loader _loader built
            cast(MixedBatchSampler, loader.batch_sampler).set_epoch(epoch)
            started = time.perf_counter()
            lr = parts.optimizer.param_groups[0]["lr"]  # recorded: the rate of the epoch's first step
            losses = self._train_epoch(parts, loader, phase, epoch, started)
            metrics = self._validate(parts.student)
            self._schedule(parts, metrics)
            best_epoch, best_metric = self._record(phase, epoch, losses, metrics, lr, len(loader), started)
            stop = self._early_stop(phase, epoch, best_epoch, more_to_come=local + 1 < epochs)
            self._log_epoch(phase, epoch, losses, metrics, lr, best_epoch, best_metric)
            self._checkpoint(parts, phase, epoch, best_epoch, best_metric)
            self._report_epoch(parts, phase, epoch, len(loader), losses, metrics)
            if stop:
                self.log(logging.INFO, "early stop: no better val mAP for %d epochs", epoch - best_epoch)
                break
        if self.env.world_size > 1:
            dist.barrier()  # the next phase reads the checkpoints rank 0 wrote

    def _train_epoch(self, parts: _Parts, loader: DataLoader, phase: str, epoch: int, started: float) -> dict[str, float]:
        """One :func:`train_one_round` over ``loader`` with a progress bar and a step callback."""
        bar = tqdm(loader, desc=f"{phase} epoch {epoch + 1}/{self.total_epochs}", disable=not self.progress,
                   leave=False, dynamic_ncols=True)

        def on_step(step: int, losses: dict[str, float]) -> None:
            self.global_step += 1
            self.epoch_seconds = time.perf_counter() - started
            bar.set_postfix(loss=f"{losses['total']:.4f}")
            if self.callback is not None:  # the learning rate of this step: the step scheduler steps after
                lr = parts.optimizer.param_groups[0]["lr"]
                self.callback(self._progress("step", phase, epoch, step + 1, len(loader), losses, lr))

        losses = train_one_round(
            parts.model, parts.optimizer, bar, device=self.env.device, grad_clip=self.config.grad_clip,
            teacher=parts.teacher, scaler=parts.scaler, scheduler=parts.step_scheduler, epoch=epoch, on_step=on_step,
        )
        bar.close()
        return losses

    def _validate(self, student: OXNet) -> dict[str, Any]:
        """Rank 0 evaluates; the metrics go to every rank (the scheduler and early stop need them)."""
        metrics: dict[str, Any] | None = None
        if self.env.is_main:
            predictions = predict(
                student, self.val_records, batch_size=self.config.batch_size, device=self.env.device,
                num_workers=self.config.num_workers,
            )
            metrics = evaluate(self.truth, predictions)
        if self.env.world_size > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        return cast("dict[str, Any]", metrics)  # set on rank 0, broadcast to the others

    def _schedule(self, parts: _Parts, metrics: Mapping[str, Any]) -> None:
        """``ReduceLROnPlateau`` on the validation mAP (schedule "plateau"; a cosine schedule steps per step)."""
        if parts.scheduler is not None:
            parts.scheduler.step(metrics[MAP])

    def _record(
        self, phase: str, epoch: int, losses: dict[str, float], metrics: dict[str, Any], lr: float, steps: int,
        started: float,
    ) -> tuple[int, float]:
        """Append the epoch to the history; returns the phase's best (epoch, mAP) so far, which for the
        "train" phase is also the history's best."""
        history = self.history
        history.epochs.append(
            {"epoch": epoch, "phase": phase, "losses": losses, "metrics": metrics, "lr": lr,
             "steps": steps, "seconds": time.perf_counter() - started}
        )
        best_epoch, best_metric = history.best(phase)
        if phase == "train":
            history.best_epoch, history.best_metric = best_epoch, best_metric
        return cast(int, best_epoch), cast(float, best_metric)  # not None: this phase has the epoch just appended

    def _early_stop(self, phase: str, epoch: int, best_epoch: int, *, more_to_come: bool) -> bool:
        """Whether the "train" phase stops here: ``early_stop_patience`` epochs without a better val mAP
        while epochs remain. Recorded in the history (``stopped_early``)."""
        patience = self.config.early_stop_patience
        stop = phase == "train" and patience is not None and more_to_come and epoch - best_epoch >= patience
        self.history.stopped_early = stop
        return stop

    def _log_epoch(
        self, phase: str, epoch: int, losses: dict[str, float], metrics: dict[str, Any], lr: float, best_epoch: int,
        best_metric: float,
    ) -> None:
        self.log(
            logging.INFO,
            "%s epoch %d/%d: loss %.4f (%s), val mAP %.4f AP40 %.4f (best %.4f at epoch %d), lr %.2g, %.1f s",
            phase, epoch + 1, self.total_epochs, losses["total"],
            ", ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "total" and v),
            metrics[MAP], metrics[AP40] or 0.0, best_metric, best_epoch + 1, lr,
            self.history.epochs[-1]["seconds"],
        )

    def _checkpoint(self, parts: _Parts, phase: str, epoch: int, best_epoch: int, best_metric: float) -> None:
        """Rank 0 writes ``last.pt`` and, when this epoch is the phase's best, ``best.pt`` (or
        ``pretrain_best.pt``), each atomically."""
        if not self.env.is_main:
            return
        teacher = parts.teacher
        checkpoint = {
            "classes": self.classes, "model_config": parts.model_config.to_dict(),
            "train_config": self.config.to_dict(), "student": parts.student.state_dict(),
            "teacher": teacher.teacher.state_dict() if teacher is not None else None,
            "ema_step": int(teacher.ema_step) if teacher is not None else 0,
            "optimizer": parts.optimizer.state_dict(), "scaler": parts.scaler.state_dict(),
            "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else None,
            "step_scheduler": parts.step_scheduler.state_dict() if parts.step_scheduler is not None else None,
            "phase": phase, "epoch": epoch + 1,
            "step": self.global_step, "best_metric": best_metric, "history": self.history.to_dict(),
            "backbone_start": self.backbone_start,
        }
        if best_epoch == epoch:
            save_checkpoint(checkpoint, self.out_dir / (BEST if phase == "train" else PRETRAIN_BEST))
        save_checkpoint(checkpoint, self.out_dir / LAST)

    def _report_epoch(
        self, parts: _Parts, phase: str, epoch: int, steps: int, losses: dict[str, float], metrics: dict[str, Any]
    ) -> None:
        if self.callback is not None:
            self.callback(self._progress("epoch", phase, epoch, steps, steps, losses,
                                         parts.optimizer.param_groups[0]["lr"], metrics))

    def _progress(self, kind, phase, epoch, step, steps, losses, lr, metrics=None) -> Progress:
        """ETA: remaining steps of this epoch at this epoch's pace, plus the remaining epochs at the pace
        of the last complete ones (validation included), or of this one before any is complete."""
        per_step = self.epoch_seconds / step if kind == "step" else 0.0
        done = [e["seconds"] for e in self.history.epochs[-3:]]
        per_epoch = float(np.mean(done)) if done else per_step * steps
        eta = per_step * (steps - step) + per_epoch * (self.total_epochs - epoch - 1)
        return Progress(
            kind=kind, phase=phase, epoch=epoch, epochs=self.total_epochs, step=step, steps_per_epoch=steps,
            global_step=self.global_step, losses=losses, lr=lr, elapsed_s=time.perf_counter() - self.started,
            eta_s=eta, metrics=metrics,
        )
