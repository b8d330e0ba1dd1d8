"""What the trainer needs from the store, in plain values: the :class:`Store` protocol, the
:class:`Snapshot` it reads, the :class:`VersionInfo` of a version being trained and the
:class:`ScoredImage` results it writes (numpy arrays and Python values, no tensors).

Torch-free on purpose: the store (``db.workbench.SqlStore`` implements :class:`Store`) imports this
module without loading torch, so ``python -m db`` runs where torch is not installed. The trainer
(:mod:`oxnet.active.loop`) converts its tensors into these values before it calls the store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from oxnet.active.strategies import CostModel, HistoryPoint

__all__ = ["ScoredImage", "Snapshot", "Store", "VersionInfo"]


@dataclass(frozen=True)
class ScoredImage:
    """One scored image as the store keeps it: predictions and the suggestion score's parts.

    ``boxes`` ndarray[D, 4] float in (x1, y1, x2, y2), ORIGINAL pixels; ``scores`` ndarray[D] float;
    ``labels`` ndarray[D] int, 0-based class indices; ``image_probs`` ndarray[N] float (class index
    order); ``attention`` ndarray[N, h, w] float (DAA attention on the C5 grid); ``value`` the
    suggestion score and ``disagreement``, ``uncertainty``, ``conflict`` its parts.
    """

    image_id: int
    granularity: str
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    image_probs: np.ndarray
    attention: np.ndarray
    value: float
    disagreement: float
    uncertainty: float
    conflict: float


@dataclass(frozen=True)
class Snapshot:
    """The label mix a round learns from.

    ``train``/``val``/``test``: COCO dicts as written by ``db.export.export_training_mix`` (every image
    with its ``granularity``; absolute ``file_name``); ``classes``: class names, category id = index + 1;
    ``marker``: the store's label-change marker read before the export (see :meth:`Store.label_marker`).
    """

    classes: list[str]
    train: dict[str, Any]
    val: dict[str, Any]
    test: dict[str, Any]
    marker: int


@dataclass(frozen=True)
class VersionInfo:
    """A model version row being trained: its id and the folder for its checkpoint."""

    id: int
    folder: Path


class Store(Protocol):
    """What the trainer needs from the store. Every method runs its own transaction."""

    def acquire(self) -> bool:
        """Take the single-trainer lock; False while another live trainer holds it."""

    def release(self, error: str | None = None) -> None:
        """Give the lock back, keeping ``error`` as the last error when given."""

    def abandon_unfinished(self) -> int:
        """Mark model versions left "training" by a dead trainer as failed; returns how many."""

    def next_round(self) -> int:
        """The number of the next round (one more than any model version's round)."""

    def snapshot(self) -> Snapshot:
        """The current label mix."""

    def label_marker(self) -> int:
        """A number that grows with every annotation edit (labels, boxes, completion)."""

    def ready_checkpoints(self) -> list[tuple[int, str | None, str | None]]:
        """``(version id, checkpoint path, sha256 recorded at writing)`` of the ready model versions,
        newest first (path or sha256 None when not recorded). The trainer warm-starts from the first
        one that verifies."""

    def serving_metrics(self) -> Mapping[str, float] | None:
        """The val metrics of the version that serves suggestions now (``{}`` when it has none), or None
        when no version serves yet."""

    def start_version(self, round: int, label_counts: Mapping[str, int], config: Mapping[str, Any]) -> VersionInfo:
        """Create a model version with status "training" and its checkpoint folder."""

    def write_results(self, version_id: int, classes: Sequence[str], results: Sequence[ScoredImage],
                      suggestions: Sequence[Mapping[str, Any]]) -> None:
        """Store predictions and scores (``results``) and the strategy's ranked ``suggestions``
        (:func:`oxnet.active.strategies.describe` rows: image_id, action, score, reason) of a version."""

    def annotation_costs(self) -> CostModel:
        """The cost of each upgrade (measured medians once there are enough saves, else the defaults)."""

    def history(self) -> list[HistoryPoint]:
        """Ready model versions' training label counts and val mAP, oldest first."""

    def pool_hints(self, limit: int) -> tuple[list[int], list[int]]:
        """(images whose labels changed since the newest ready version, that version's top ``limit``
        suggested images): the fixed part of a bounded candidate pool."""

    def finish_version(
        self, version_id: int, checkpoint: str, metrics: Mapping[str, Mapping[str, float]], config: Mapping[str, Any],
        *, serve: bool = True, reason: str | None = None,
    ) -> None:
        """Store metrics (per split) and config, and mark the version ready; it serves suggestions when
        ``serve`` (else it is kept as a candidate), with ``reason`` recorded."""

    def fail_version(self, version_id: int, error: str, config: Mapping[str, Any]) -> None:
        """Mark the version failed, recording ``error``."""

    def heartbeat(self, round: int, progress: float, phase: str, error: str | None = None) -> None:
        """Record liveness and progress; raise RuntimeError when the lock is no longer ours."""

    def stop_requested(self) -> bool:
        """Whether a stop was requested through the store since this trainer started (optionally,
        ``stop_after_round_requested() -> bool``: stop once the round in progress is finished)."""

    def mark_unreadable(self, image_id: int, reason: str) -> None:
        """Record that the image's file cannot be read (missing or corrupt, with ``reason``), so that
        later snapshots leave it out."""
