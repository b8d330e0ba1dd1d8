"""The workbench loop: one round (snapshot -> train -> evaluate -> save -> score -> suggest) and the
background trainer that repeats it, written against a small store protocol
(:class:`oxnet.active.protocol.Store`: plain values, no SQL here; the SQLAlchemy adapter is
``db.workbench.SqlStore``).

A round::

    snapshot the train/val/test label mix (COCO dicts of the store's export)
    -> fit OXnet for a fixed budget (warm start from the latest ready model version; the first round
       trains plain RetinaNet on the full images first)
    -> validation metrics on the val split's full images (skipped, with the reason recorded, when the
       split has no fully labeled image with boxes: the train split's full images then pick the epoch)
    -> a compact inference checkpoint, written atomically, in the version's folder
    -> score the not-full training images of the round's candidate pool (:mod:`oxnet.active.scoring`; every
       one unless ``pool_size`` bounds it), then rank them with the strategy (:mod:`oxnet.active.strategies`):
       predictions and suggestions (action, expected gain per unit cost, reason) in the strategy's order
    -> the version is marked ready, its metrics stored, and it SERVES (its suggestions become the
       queue's) only when its val mAP is not worse than the serving version's by more than
       ``promote_tolerance`` (:func:`decide_promotion`); otherwise it stays a candidate until a user
       promotes it

then wait for new labels (and at least ``min_interval_s``). A file that cannot be read (missing,
corrupt, another size than stored) does not stop the round: the store marks it (``mark_unreadable``),
the round leaves it out, starting its current phase again without it, and the version's notes name it.
A label saved during a round changes
nothing in that round: the next one sees it. The model version row exists from the start of the round
with status "training" and becomes "ready" only after its checkpoint and outputs are written; a trainer
killed in between leaves a "training" row that the next trainer marks failed.

Example::

    >>> from db.workbench import SqlStore
    >>> trainer = Trainer(SqlStore.open("sqlite:///workbench.db"), TRAINER_PRESETS["cpu"])
    >>> trainer.run()       # until SIGTERM (trainer.stop.set()) or a stop request in the store

Stopping: "stop now" (SIGTERM, ``trainer.stop``, a stop request in the store) ends the round in
progress at its next step; that round's model version is marked failed with the reason, nothing of it
is served, the labels are untouched, and the next trainer starts a new round warm-started from the
latest ready version. "Stop after this round" (a store whose ``stop_after_round_requested()`` says
so; optional in :class:`~oxnet.active.protocol.Store`) lets the round in progress finish and be saved, then exits.

ETA: the phase text carries the whole round's remaining time, ``round eta``: training's own estimate
plus the previous round's measured durations of the later phases (evaluation, saving, scoring and
writing, scaled by the number of images to score); before any round has been measured it says
``train eta ... + scoring``. While scoring, the rate so far gives the rest.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from oxnet.training.checkpoint import (file_sha256, load_checkpoint, model_from_state, non_finite_weights, save_checkpoint,
                                       stored_model_config, verify_checkpoint)
from oxnet.data.datasets import UnreadableImage
from oxnet.data.records import Record, records_from_coco
from oxnet.evaluation.predict import evaluate_model
from oxnet.training.distributed import resolve_device
from oxnet.training.engine import Progress, fit
from oxnet.active.protocol import ScoredImage, Snapshot, Store
from oxnet.active.scoring import ImageScore, ScoreConfig, score_images
from oxnet.active import ssl_start
from oxnet.training.settings import TrainConfig
from oxnet.active.strategies import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    Context,
    HistoryPoint,
    ImageState,
    candidate_pool,
    describe,
    get_strategy,
    image_states,
)
from oxnet.vocabulary import FULL, GRANULARITIES, MAP, WEAK

__all__ = [
    "STOPPED_MESSAGE",
    "TRAINER_PRESETS",
    "AlreadyRunning",
    "LoopSettings",
    "RoundResult",
    "StopRequested",
    "Trainer",
    "decide_promotion",
    "flatten_metrics",
    "scored_image",
    "round_eta",
]

logger = logging.getLogger(__name__)

#: Name of the inference checkpoint in a model version's folder.
MODEL_FILE = "model.pt"
#: Share of a round's progress bar spent training (the rest: evaluation and scoring).
TRAIN_SHARE = 0.8
#: Entries of a training checkpoint kept in the inference checkpoint (optimizer state is dropped).
_KEEP = ("classes", "model_config", "train_config", "student", "teacher", "ema_step", "phase", "epoch", "step",
         "best_metric", "history", "backbone_start")


#: Why a round stopped midway is recorded failed (the model version's ``config["error"]``).
STOPPED_MESSAGE = ("stopped before the round finished: its training is discarded (this version is never served); "
                   "the labels are kept and the next round starts from the latest ready model")


class StopRequested(Exception):
    """Raised inside a round when the trainer has been asked to stop (SIGTERM or the store's flag)."""


class AlreadyRunning(RuntimeError):
    """Another trainer holds the store's lock."""


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoopSettings:
    """Budget and behaviour of the trainer.

    Args:
        preset, model, method: the model (see :class:`~oxnet.training.settings.TrainConfig`).
        epochs, steps_per_epoch: the training budget of every round.
        pretrain_epochs: plain RetinaNet epochs on the full images before the first round's method
            (only when there is no checkpoint to warm-start from).
        ssl_epochs, ssl_label_epochs, ssl_batch_size: in-domain backbone pretraining (SimSiam on every
            training image, then image-level BCE on the weak and full ones) before the first round, once,
            cached in the store's models folder; every round starts from it (:mod:`oxnet.active.ssl_start`).
            0: off.
        batch_size: images per training batch (halved on CUDA out-of-memory).
        lr: Adam learning rate (the models start from random weights: 1e-4).
        seed: base seed; round ``r`` trains with ``seed + r``.
        device: "auto" (CUDA when present; AMP then), "cpu", "cuda[:N]".
        num_workers: DataLoader workers.
        score: settings of the suggestion score; ``score_batch_size`` its batch (halved on OOM).
        suggest: rank the not-full training images and store suggestions (False: none).
        strategy: the ranking (:data:`oxnet.active.strategies.STRATEGIES`); strategies that read no model
            output (the random ones) skip the scoring pass.
        batch_units: annotation units one batch of suggestions spends (the strategy's batch).
        pool_size: images scored per round at most (None: every not-full image): recently changed
            ones, the previous top suggestions and a rotating random share ``pool_random_share``.
        score_time_share: stop scoring the pool (in that priority order) once scoring has taken this
            share of the round's training time (None: score the whole pool). Keeps a round's scoring
            within its training at any store size; it makes the pool depend on the machine's speed,
            so the simulation leaves it off.
        eval_splits: splits evaluated on their full images; "val" comes from training, others
            ("test") are evaluated after it.
        min_interval_s: at least this long between the end of a round and the next one.
        max_interval_s: start a round after this long even without new labels (None: wait for labels).
        retry_delay_s: wait after a failed round before trying again.
        heartbeat_s: seconds between two heartbeats (and stop-flag checks).
        max_rounds: stop after this many rounds (None: run until stopped).
        promote_metric: the val metric that decides whether a new version serves ("mAP").
        promote_tolerance: a new version serves when its ``promote_metric`` is at least the serving
            version's minus this (absolute); otherwise it stays a candidate until a user promotes it.
    """

    preset: str = "cpu"
    model: dict[str, Any] = field(default_factory=dict)
    method: str = "oxnet"
    epochs: int = 2
    steps_per_epoch: int | None = 25
    pretrain_epochs: int = 2
    ssl_epochs: int = 0
    ssl_label_epochs: int = 0
    ssl_batch_size: int = 32
    batch_size: int = 4
    lr: float | None = 1e-4
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    score: ScoreConfig = ScoreConfig()
    score_batch_size: int = 8
    suggest: bool = True
    strategy: str = DEFAULT_STRATEGY
    batch_units: float = 50.0
    pool_size: int | None = None
    pool_random_share: float = 0.3
    score_time_share: float | None = None
    eval_splits: tuple[str, ...] = ("val",)
    min_interval_s: float = 60.0
    max_interval_s: float | None = None
    retry_delay_s: float = 30.0
    heartbeat_s: float = 5.0
    max_rounds: int | None = None
    promote_metric: str = MAP
    promote_tolerance: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", dict(self.model))
        object.__setattr__(self, "eval_splits", tuple(self.eval_splits))
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 (a round must train), got {self.epochs}")
        if self.score_batch_size < 1:
            raise ValueError(f"score_batch_size must be >= 1, got {self.score_batch_size}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {self.strategy!r}")
        if not self.batch_units > 0 or (self.pool_size is not None and self.pool_size < 1):
            raise ValueError(f"need batch_units > 0 and pool_size >= 1 or None, got {self.batch_units}, {self.pool_size}")
        if self.score_time_share is not None and not self.score_time_share > 0:
            raise ValueError(f"score_time_share must be > 0 or None, got {self.score_time_share}")
        if not 0.0 <= self.pool_random_share <= 1.0:
            raise ValueError(f"pool_random_share must be in [0, 1], got {self.pool_random_share}")
        unknown = set(self.eval_splits) - {"val", "test"}
        if unknown:
            raise ValueError(f"eval_splits must be among ('val', 'test'), got {sorted(unknown)}")
        if min(self.min_interval_s, self.retry_delay_s) < 0 or not self.heartbeat_s > 0:
            raise ValueError("min_interval_s and retry_delay_s must be >= 0 and heartbeat_s > 0")
        if self.max_rounds is not None and self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1 or None, got {self.max_rounds}")
        if not (self.promote_tolerance >= 0 and math.isfinite(self.promote_tolerance)):
            raise ValueError(f"promote_tolerance must be a finite number >= 0, got {self.promote_tolerance}")
        self.train_config(out_dir=".", round=0)  # validates preset, method, model, batch ...
        if self.ssl_epochs or self.ssl_label_epochs:
            if self.model.get("weights", "random") not in ("random", "imagenet"):
                raise ValueError(f"ssl_epochs pretrains the backbone itself; it cannot start from weights={self.model['weights']!r}")
            ssl_start.ssl_config(self)  # validates epochs and batch

    def train_config(
        self,
        *,
        out_dir: str | Path,
        round: int,
        init_checkpoint: str | None = None,
        pretrain_epochs: int = 0,
        batch_size: int | None = None,
    ) -> TrainConfig:
        """The :class:`TrainConfig` of one round (a fixed budget: no early stop)."""
        return TrainConfig(
            preset=self.preset, model=self.model, method=self.method, epochs=self.epochs,
            pretrain_epochs=pretrain_epochs, batch_size=batch_size or self.batch_size,
            steps_per_epoch=self.steps_per_epoch, lr=self.lr, seed=self.seed + round, device=self.device,
            num_workers=self.num_workers, early_stop_patience=None, out_dir=str(out_dir),
            init_checkpoint=init_checkpoint,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain types (stored with every model version)."""
        return asdict(self)


#: Named trainer settings: ``tiny`` (tests, seconds), ``cpu`` (a laptop; minutes per round) and
#: ``paper`` (the paper's model on a GPU).
TRAINER_PRESETS: dict[str, LoopSettings] = {
    "tiny": LoopSettings(preset="tiny", model={"image_size": 64}, epochs=1, steps_per_epoch=2, pretrain_epochs=1,
                         batch_size=2, score_batch_size=4, min_interval_s=5.0, retry_delay_s=5.0, heartbeat_s=1.0),
    "cpu": LoopSettings(preset="cpu", epochs=2, steps_per_epoch=25, pretrain_epochs=2, batch_size=4),
    "paper": LoopSettings(preset="paper", epochs=10, steps_per_epoch=None, pretrain_epochs=10, batch_size=8,
                          score_batch_size=16, min_interval_s=300.0),
}


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------
@dataclass
class RoundResult:
    """What a round did.

    ``status``: "ready" (a new model version), "failed" (recorded with ``error``), "stopped" (asked to
    stop midway) or "waiting" (nothing to train on yet; no version was created).
    """

    round: int
    status: str
    version_id: int | None = None
    label_counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    scored: int = 0
    batch_size: int | None = None
    marker: int = 0
    error: str | None = None
    seconds: float = 0.0
    serving: bool | None = None
    durations: dict[str, float] = field(default_factory=dict)


def decide_promotion(
    new: Mapping[str, float] | None,
    serving: Mapping[str, float] | None,
    *,
    metric: str = MAP,
    tolerance: float = 0.02,
) -> tuple[bool, str]:
    """Whether a new model version should serve suggestions, and why.

    Args:
        new: the new version's val metrics (None or without ``metric``: val was skipped).
        serving: the serving version's val metrics (``{}`` when it has none), or None when none serves.
        metric, tolerance: the new version serves when ``new[metric] >= serving[metric] - tolerance``.

    Returns:
        ``(serve, reason)``. The first version serves; so does one compared with a serving version that
        has no ``metric``. A version without ``metric`` facing one that has it stays a candidate.
    """
    value = None if new is None else new.get(metric)
    if serving is None:
        return True, "the first ready version serves"
    old = serving.get(metric)
    if old is None:
        return True, f"the serving version has no val {metric} to compare with"
    if value is None:
        return False, f"no val {metric} (the val split was skipped) to compare with the serving version's {old:.3f}"
    if value >= old - tolerance:
        return True, f"val {metric} {value:.3f} vs the serving version's {old:.3f} (tolerance {tolerance:g})"
    return False, (f"val {metric} {value:.3f} is {old - value:.3f} below the serving version's {old:.3f} "
                   f"(tolerance {tolerance:g}): kept as a candidate")


#: Phases of a round after training whose durations predict the next round's ETA (scoring and
#: writing are per image to score).
_LATER_PHASES = ("save", "evaluate", "rank")
_PER_IMAGE_PHASES = ("score", "write")


def round_eta(train_left_s: float, previous: Mapping[str, float] | None, to_score: int) -> float | None:
    """Seconds left in a round while training: ``train_left_s`` plus the previous round's durations of
    the later phases (``previous``: ``RoundResult.durations``; scoring and writing scaled from its
    ``scored`` images to ``to_score``). None when no previous round was measured."""
    if not previous:
        return None
    later = sum(float(previous.get(name, 0.0)) for name in _LATER_PHASES)
    scored = float(previous.get("scored", 0.0))
    per_image = sum(float(previous.get(name, 0.0)) for name in _PER_IMAGE_PHASES) / scored if scored else 0.0
    return max(0.0, train_left_s) + later + per_image * to_score


def scored_image(result: ImageScore) -> ScoredImage:
    """``result`` in the store protocol's plain values (tensors to numpy on the CPU)."""
    return ScoredImage(
        image_id=result.image_id, granularity=result.granularity, boxes=result.boxes.float().cpu().numpy(),
        scores=result.scores.float().cpu().numpy(), labels=result.labels.cpu().numpy(),
        image_probs=result.image_probs.float().cpu().numpy(), attention=result.attention.float().cpu().numpy(),
        value=float(result.value), disagreement=float(result.disagreement), uncertainty=float(result.uncertainty),
        conflict=float(result.conflict),
    )


def flatten_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """:func:`oxnet.evaluation.metrics.evaluate`'s dict as named floats: nested dicts become ``name/key``
    (``per_class_AP/Nodule``); None, lists and non-finite values are left out."""
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update({f"{name}/{k}": float(v) for k, v in value.items()
                         if isinstance(v, (int, float)) and math.isfinite(v)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = float(value)
    return flat


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def free_memory() -> None:
    """Drop unreachable tensors and return cached CUDA blocks (after an error or out-of-memory)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _halving(run: Callable[[int], Any], batch_size: int, what: str) -> tuple[Any, int]:
    """``run(batch_size)``, halving the batch after every CUDA out-of-memory error down to 1."""
    while True:
        try:
            return run(batch_size), batch_size
        except torch.cuda.OutOfMemoryError:
            free_memory()
            if batch_size == 1:
                raise
            batch_size //= 2
            logger.warning("CUDA out of memory while %s: retrying with batch size %d", what, batch_size)


class Trainer:
    """The background trainer: rounds until stopped, with a heartbeat thread.

    Args:
        store: the :class:`~oxnet.active.protocol.Store`.
        settings: the :class:`LoopSettings`.
        stop: set it to stop (a signal handler does); a fresh event by default.
        on_round: called with every :class:`RoundResult` (tests, the simulation).
    """

    def __init__(
        self,
        store: Store,
        settings: LoopSettings,
        *,
        stop: threading.Event | None = None,
        on_round: Callable[[RoundResult], None] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.stop = stop or threading.Event()
        self.on_round = on_round
        self._status: dict[str, Any] = {"round": 0, "progress": 0.0, "phase": "starting", "error": None}
        self._status_lock = threading.Lock()
        self._lock_lost: str | None = None
        #: Set when the store asks to stop once the round in progress is done.
        self.stop_after_round = threading.Event()
        self._previous_durations: dict[str, float] | None = None
        self._to_score = 0

    # -- status and heartbeat ------------------------------------------------------------------------
    def _set(self, **values: Any) -> None:
        with self._status_lock:
            self._status.update(values)

    def _beat(self) -> None:
        with self._status_lock:
            status = dict(self._status)
            self._status["error"] = None  # an error is written once
        try:
            self.store.heartbeat(status["round"], status["progress"], status["phase"][:64], status["error"])
        except RuntimeError as e:  # the lock was taken over: this trainer must stop
            self._lock_lost = str(e)
            self.stop.set()
            return
        if self.store.stop_requested():
            logger.info("stop requested through the store")
            self.stop.set()
        after_round = getattr(self.store, "stop_after_round_requested", None)
        if after_round is not None and not self.stop_after_round.is_set() and after_round():
            logger.info("asked through the store to stop after the round in progress")
            self.stop_after_round.set()

    def _heartbeats(self, done: threading.Event) -> None:
        while not done.wait(self.settings.heartbeat_s):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - a busy store must not kill the heartbeat; the next one retries
                logger.exception("heartbeat failed")

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise StopRequested

    def _on_progress(self, p: Progress) -> None:
        self._check_stop()
        fraction = (p.epoch + p.step / max(1, p.steps_per_epoch)) / max(1, p.epochs)
        eta = round_eta(p.eta_s, self._previous_durations, self._to_score)
        eta_text = f"round eta {_duration(eta)}" if eta is not None else f"eta {_duration(p.eta_s)}+scoring"
        self._set(progress=TRAIN_SHARE * fraction,
                  phase=f"{p.phase} {p.epoch + 1}/{p.epochs} step {p.step}/{p.steps_per_epoch} "
                        f"loss {p.losses.get('total', float('nan')):.3f} {eta_text}")

    def _on_ssl_progress(self, p: Mapping[str, Any]) -> None:
        self._check_stop()
        self._set(phase=f"{p['stage']} pretrain {p['epoch'] + 1}/{p['epochs']} step {p['step']}/{p['steps']} loss {p['loss']:.3f}")

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> list[RoundResult]:
        """Take the lock, mark abandoned versions failed, then run rounds until stopped (or
        ``max_rounds``), waiting for new labels between them. Returns the rounds' results.

        Raises:
            AlreadyRunning: another trainer holds the lock.
        """
        if not self.store.acquire():
            raise AlreadyRunning("another trainer holds this store's lock (its heartbeat is fresh); stop it first")
        done = threading.Event()
        beats = threading.Thread(target=self._heartbeats, args=(done,), name="oxnet-heartbeat", daemon=True)
        results: list[RoundResult] = []
        error: str | None = None
        try:
            abandoned = self.store.abandon_unfinished()
            if abandoned:
                logger.warning("marked %d model version(s) left unfinished by a previous trainer as failed", abandoned)
            self._beat()
            beats.start()
            while not self.stop.is_set():
                result = self.run_round()
                results.append(result)
                if self.on_round is not None:
                    self.on_round(result)
                rounds = sum(r.status in ("ready", "failed") for r in results)
                if result.status == "stopped" or (self.settings.max_rounds and rounds >= self.settings.max_rounds):
                    break
                if self.stop_after_round.is_set():
                    logger.info("stopping after round %d, as asked", result.round)
                    break
                if result.status == "failed":
                    self._wait(self.settings.retry_delay_s, None, "retrying after a failed round")
                elif result.status == "waiting":
                    self._wait(self.settings.min_interval_s, result.marker, "waiting for boxes to train on")
                else:
                    self._wait(self.settings.min_interval_s, result.marker, "waiting for new labels")
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            done.set()
            if beats.is_alive():
                beats.join()
            self._set(phase="stopped", progress=0.0)
            if self._lock_lost is None:
                try:
                    self._beat()
                except Exception:  # noqa: BLE001 - releasing the lock matters more than the last status
                    logger.exception("last heartbeat failed")
                self.store.release(error)
            else:
                logger.error("stopped: %s", self._lock_lost)
        return results

    def _wait(self, min_seconds: float, marker: int | None, phase: str) -> None:
        """Until ``min_seconds`` passed and (``marker`` is None or the store's label marker moved past it,
        or ``max_interval_s`` passed), or a stop."""
        self._set(phase=phase, progress=0.0)
        started = time.monotonic()
        max_seconds = self.settings.max_interval_s
        poll = min(self.settings.heartbeat_s, 2.0)
        while not self.stop.wait(poll if time.monotonic() - started >= min_seconds else min(poll, min_seconds)):
            if self.stop_after_round.is_set():  # asked while waiting: the round is over, so stop now
                self.stop.set()
                return
            elapsed = time.monotonic() - started
            if elapsed < min_seconds:
                continue
            if marker is None or (max_seconds is not None and elapsed >= max_seconds):
                return
            if self.store.label_marker() != marker:
                return

    def _warm_start(self, config: TrainConfig, classes: Sequence[str], notes: dict[str, str]) -> str | None:
        """The newest ready checkpoint that verifies (file present, checksum as recorded, finite weights)
        and holds this run's model and classes, else None (from scratch). Every checkpoint passed over is
        named in ``notes["warm_start"]``, logged and put in the trainer's state as a warning."""
        problems: list[str] = []
        chosen: str | None = None
        for version_id, path, sha256 in self.store.ready_checkpoints():
            if not path:
                problems.append(f"model version {version_id} has no checkpoint recorded")
                continue
            try:
                state = verify_checkpoint(path, sha256=sha256)
            except (OSError, ValueError) as e:
                problems.append(f"model version {version_id}: {e}")
                continue
            if sha256 is None:
                problems.append(f"model version {version_id}: no checksum recorded for {path} (not verified)")
            try:
                same = (list(state["classes"]) == list(classes)
                        and stored_model_config(state) == config.model_config(len(classes)))
            except ValueError as e:
                problems.append(f"model version {version_id} ({path}): {e}")
                break
            if not same:
                problems.append(f"model version {version_id} ({path}) has other classes or another model")
                break
            chosen = str(path)
            break
        if problems:
            outcome = f"warm start from {chosen}" if chosen else "training from scratch"
            warning = "; ".join(problems) + f": {outcome}"
            notes["warm_start"] = warning
            logger.warning("warm start: %s", warning)
            self._set(error=f"warning: {warning}"[:2000])
        return chosen

    def run_round(self) -> RoundResult:
        """One round (see the module docstring). Errors are recorded and returned, not raised, except
        :class:`StopRequested`, which ends in a "stopped" result."""
        s = self.settings
        started = time.monotonic()
        number = self.store.next_round()
        self._set(round=number, progress=0.0, phase="snapshot")
        snap = self.store.snapshot()
        classes = snap.classes
        missing = self._mark_missing(snap)
        train: list[Record] = records_from_coco(snap.train, classes=classes, on_error="skip")
        splits = {name: [r for r in records_from_coco(getattr(snap, name), classes=classes, on_error="skip")
                         if r.granularity == FULL] for name in ("val", "test")}
        counts: dict[str, int] = {g: sum(r.granularity == g for r in train) for g in GRANULARITIES}
        result = RoundResult(round=number, status="waiting", label_counts=counts, marker=snap.marker)
        notes: dict[str, str] = {}
        if missing:
            notes["missing"] = "left out (file not found, marked in the store): " + ", ".join(
                f"image {i}" for i in missing)
        selection: Sequence[Record] = splits["val"]
        if not any(len(r.boxes) for r in selection):
            notes["val"] = "skipped: the val split has no fully labeled image with boxes"
            selection = [r for r in train if r.granularity == FULL]
            if not any(len(r.boxes) for r in selection):
                result.notes = {**notes, "round": "no fully labeled image with boxes anywhere yet: nothing to train a detector on"}
                logger.info("round %d: %s", number, result.notes["round"])
                return result
            notes["selection"] = "the train split's full images pick the best epoch"
        for name in s.eval_splits:
            if name != "val" and not any(len(r.boxes) for r in splits[name]):
                notes[name] = f"skipped: the {name} split has no fully labeled image with boxes"

        models_dir = getattr(self.store, "models_dir", None)  # not in the Store protocol: only some stores have one
        ssl_file = ssl_start.ssl_weights(s, models_dir)
        probe = ssl_start.starting_from(s.train_config(out_dir=".", round=number), ssl_file)
        warm = self._warm_start(probe, classes, notes)
        pretrain = s.pretrain_epochs if warm is None and counts[FULL] else 0
        config_record = {"loop": s.to_dict(), "notes": notes, "warm_start": warm}
        version = self.store.start_version(number, counts, config_record)
        result.version_id = version.id
        logger.info("round %d (model version %d): %s; warm start %s", number, version.id,
                    ", ".join(f"{n} {g}" for g, n in counts.items()), warm or "none")
        config = s.train_config(out_dir=version.folder, round=number, init_checkpoint=warm, pretrain_epochs=pretrain)
        config = ssl_start.starting_from(config, ssl_file)  # every round's model starts from the in-domain weights
        durations: dict[str, float] = {}
        self._to_score = sum(r.granularity != FULL for r in train) if s.suggest else 0
        unreadable: dict[int, str] = {}

        def leave_out(error: UnreadableImage) -> None:
            """Mark the file in the store and drop its record from this round (or re-raise)."""
            nonlocal train, selection
            if error.image_id is None or error.image_id in unreadable:
                raise error
            logger.warning("round %d: %s; marked unreadable in the store and left out", number, error)
            self.store.mark_unreadable(error.image_id, error.reason)
            unreadable[error.image_id] = error.reason
            notes["unreadable"] = "left out (file unreadable, marked in the store): " + "; ".join(
                f"image {i}: {r}" for i, r in unreadable.items())
            train = [r for r in train if r.image_id != error.image_id]
            selection = [r for r in selection if r.image_id != error.image_id]
            for name in splits:
                splits[name] = [r for r in splits[name] if r.image_id != error.image_id]

        def train_round(b: int):
            while True:  # one retry per unreadable file, each from the start of the round
                try:
                    return fit(train, selection, replace(config, batch_size=b), classes=classes,
                               callback=self._on_progress, progress=False)
                except UnreadableImage as e:
                    leave_out(e)

        try:
            while ssl_file is not None and warm is None and not ssl_file.is_file():  # once: the cached file is reused
                try:
                    self._set(phase="ssl pretraining")
                    # ssl_weights returned a file, so the store has a models folder
                    ssl_start.pretrain_for_round(s, train, classes, cast("str | Path", models_dir), callback=self._on_ssl_progress)
                except UnreadableImage as e:
                    leave_out(e)
            clock = time.monotonic()
            history, batch = _halving(train_round, config.batch_size, "training")
            result.batch_size = batch
            config = replace(config, batch_size=batch)
            config_record["train"] = config.to_dict()
            durations["train"], clock = time.monotonic() - clock, time.monotonic()
            self._check_stop()
            checkpoint, state = self._compact(history.best_checkpoint or history.last_checkpoint, version.folder)
            config_record["backbone_start"] = state.get("backbone_start")
            config_record["checkpoint_sha256"] = file_sha256(checkpoint)
            durations["save"], clock = time.monotonic() - clock, time.monotonic()
            while True:
                try:
                    metrics = self._metrics(history, state, splits, notes)
                    break
                except UnreadableImage as e:
                    leave_out(e)
            durations["evaluate"], clock = time.monotonic() - clock, time.monotonic()
            if s.suggest:
                while True:
                    try:
                        result.scored = self._suggest(version.id, state, train, classes, counts, metrics, number, durations)
                        break
                    except UnreadableImage as e:
                        leave_out(e)
            durations["scored"] = float(result.scored)
            config_record["durations"] = {k: round(v, 3) for k, v in durations.items()}
            result.durations = dict(durations)
            self._check_stop()
            serve, reason = decide_promotion(metrics.get("val"), self.store.serving_metrics(),
                                             metric=s.promote_metric, tolerance=s.promote_tolerance)
            notes["promotion"] = reason
            config_record["promotion"] = {"serve": serve, "reason": reason}
            self.store.finish_version(version.id, str(checkpoint), metrics, config_record, serve=serve, reason=reason)
            result.serving = serve
            self._previous_durations = dict(durations)
        except StopRequested:
            free_memory()
            self.store.fail_version(version.id, STOPPED_MESSAGE, config_record)
            result.status, result.error = "stopped", STOPPED_MESSAGE
        except Exception as e:  # noqa: BLE001 - a failing round is recorded and the next one tries again
            free_memory()
            error = f"round {number} failed: {type(e).__name__}: {e}"
            logger.exception("round %d failed", number)
            self.store.fail_version(version.id, error, config_record)
            self._set(error=error)
            self._beat()
            result.status, result.error = "failed", error
        else:
            result.status, result.metrics = "ready", metrics
            self._set(error="", progress=1.0, phase="round done")
            self._beat()
            logger.info("round %d done: model version %d, val mAP %s, %d images scored; %s", number, version.id,
                        metrics.get("val", {}).get(MAP, "-"), result.scored,
                        "serving" if result.serving else "candidate: " + notes["promotion"])
        result.notes = notes
        result.seconds = time.monotonic() - started
        return result

    def _mark_missing(self, snap: Snapshot) -> list[int]:
        """Mark the snapshot's images whose file does not exist as missing in the store (their records
        are then skipped); returns their ids."""
        missing = []
        for name in ("train", "val", "test"):
            for image in getattr(snap, name).get("images", []):
                if not Path(image["file_name"]).is_file():
                    missing.append(int(image["id"]))
                    self.store.mark_unreadable(int(image["id"]), "file not found")
        if missing:
            logger.warning("%d image file(s) not found, marked missing in the store: ids %s", len(missing), missing[:20])
        return missing

    def _compact(self, source: Path, folder: Path) -> tuple[Path, dict[str, Any]]:
        """Write the inference checkpoint (no optimizer state) atomically and drop the training files."""
        self._set(phase="saving the model")
        state = load_checkpoint(source)
        compact = {k: state.get(k) for k in _KEEP}
        bad = non_finite_weights(compact)
        if bad:  # never make a version ready that the next round could not warm-start from
            raise ValueError(f"training produced non-finite (NaN/inf) weights in {len(bad)} tensor(s), e.g. {bad[0]}")
        path = save_checkpoint(compact, Path(folder) / MODEL_FILE)
        for name in ("last.pt", "best.pt", "pretrain_best.pt"):
            (Path(folder) / name).unlink(missing_ok=True)
        return path, compact

    def _metrics(self, history, state, splits, notes) -> dict[str, dict[str, float]]:
        """Validation metrics of the chosen epoch, mean training losses, and the other splits' metrics."""
        s = self.settings
        chosen = history.best_epoch if history.best_epoch is not None else history.epochs[-1]["epoch"]
        epoch = next(e for e in history.epochs if e["epoch"] == chosen)
        metrics: dict[str, dict[str, float]] = {
            "train": {f"loss/{k}": float(v) for k, v in epoch["losses"].items() if math.isfinite(v)}
        }
        if "val" not in notes:
            metrics["val"] = flatten_metrics(epoch["metrics"])
        others = [n for n in s.eval_splits if n != "val" and n not in notes]
        if others:
            device = resolve_device(s.device)
            model = model_from_state(state).to(device)
            for name in others:
                self._set(phase=f"evaluating on {name}")
                metrics[name] = flatten_metrics(evaluate_model(
                    model, splits[name], state["classes"], batch_size=s.score_batch_size, device=device,
                    num_workers=s.num_workers,
                ))
        return metrics

    def _suggest(self, version_id: int, state: Mapping[str, Any], train: Sequence[Record], classes: Sequence[str],
                 counts: Mapping[str, int], metrics: Mapping[str, Mapping[str, float]], number: int,
                 durations: dict[str, float]) -> int:
        """Score the candidate pool (when the strategy reads model outputs), rank it with the strategy and
        store predictions and suggestions. Returns how many images were scored."""
        s = self.settings
        strategy = get_strategy(s.strategy)
        pending = [r for r in train if r.granularity != FULL]
        clock = time.monotonic()
        results: list[ImageScore] = []
        if strategy.needs_outputs:
            if s.pool_size is not None or s.score_time_share is not None:
                size = min(s.pool_size or len(pending), len(pending))
                changed, top = self.store.pool_hints(size)
                order = candidate_pool([r.image_id for r in pending], size=size, changed=changed, previous_top=top,
                                       random_share=s.pool_random_share, rng=np.random.default_rng(s.seed + number))
                by_id = {r.image_id: r for r in pending}
                pending = [by_id[i] for i in order]
            budget = None if s.score_time_share is None else s.score_time_share * durations.get("train", 0.0)
            results = self._score(state, pending, classes, number, budget_s=budget)
            states = image_states(results)
        else:
            states = [ImageState(r.image_id, r.granularity) for r in pending]
        durations["score"] = time.monotonic() - clock
        clock = time.monotonic()
        self._set(phase=f"ranking with {strategy.name}")
        costs = self.store.annotation_costs()
        history = list(self.store.history())
        val_map = metrics.get("val", {}).get(MAP)
        if val_map is not None:
            history.append(HistoryPoint(weak=counts.get(WEAK, 0), full=counts.get(FULL, 0), mAP=float(val_map)))
        context = Context(costs=costs, counts=counts, history=history, batch_units=s.batch_units, seed=s.seed + number)
        rows = describe(strategy(states, context), costs, strategy.name,
                        {r.image_id: (r.reason or {}).get("classes", []) for r in results})
        durations["rank"] = time.monotonic() - clock
        clock = time.monotonic()
        self._set(phase="writing suggestions")
        self.store.write_results(version_id, classes, [scored_image(r) for r in results], rows)
        durations["write"] = time.monotonic() - clock
        return len(results)

    def _score(self, state: Mapping[str, Any], records: Sequence[Record], classes: Sequence[str], number: int,
               *, budget_s: float | None = None) -> list[ImageScore]:
        """Score ``records`` with the student and its teacher (the student itself when the method has none).
        With ``budget_s``, in chunks, in the given order, stopping before a chunk that would (at the pace
        so far) end after that many seconds; the first chunk is always scored."""
        s = self.settings
        if not records:
            return []
        device = resolve_device(s.device)
        student = model_from_state(state).to(device)
        teacher = model_from_state(state, weights="teacher").to(device) if state.get("teacher") is not None else student
        previous = self._previous_durations or {}
        write_per_image = previous.get("write", 0.0) / previous["scored"] if previous.get("scored") else 0.0
        started = time.monotonic()
        chunk = len(records) if budget_s is None else max(1, 4 * s.score_batch_size)
        results: list[ImageScore] = []
        for start in range(0, len(records), chunk):
            part = records[start : start + chunk]

            def on_batch(done: int, total: int, offset: int = start) -> None:
                self._check_stop()
                finished = offset + done
                elapsed = time.monotonic() - started
                left = elapsed / finished * (len(records) - finished) + write_per_image * len(records) if finished else None
                eta = f" round eta {_duration(left)}" if left is not None else ""
                self._set(progress=TRAIN_SHARE + (1 - TRAIN_SHARE) * finished / len(records),
                          phase=f"scoring {finished}/{len(records)} images{eta}")

            def run(b: int, part: Sequence[Record] = part, on_batch: Callable[[int, int], None] = on_batch,
                    seed: int = s.seed + number + start) -> list[ImageScore]:
                return score_images(
                    student, teacher, part, classes, config=s.score, batch_size=b, device=device,
                    num_workers=s.num_workers, seed=seed, on_batch=on_batch)

            scored, _ = _halving(run, s.score_batch_size, "scoring")
            results += scored
            elapsed = time.monotonic() - started
            if budget_s is not None and elapsed + elapsed / (start // chunk + 1) > budget_s:
                break  # the next chunk would not fit
        return results
