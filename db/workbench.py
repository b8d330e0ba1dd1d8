"""The store side of the workbench loop: :class:`SqlStore` implements :class:`oxnet.active.protocol.Store` with
SQLAlchemy, and :func:`request_stop` lets the UI or a shell stop the trainer through the store. It speaks
plain Python and numpy values only (the trainer converts its tensors), so the store never loads torch.

The trainer's lock owner is ``"<host>:<pid>"`` (``app.trainer_control`` reads the pid from it). A lock
whose heartbeat is fresh refuses a second trainer, except when its owner is a process of this host
that no longer exists (a trainer killed with ``kill -9``): then it is taken over at once instead of
after :data:`db.trainer_lock.TRAINER_STALE_AFTER`.

A stop request is an audit entry (action :data:`STOP_ACTION`, ``after={"project": name}``): the
running trainer sees it within a heartbeat and stops cleanly; the round in progress is abandoned
(recorded failed, see :data:`oxnet.active.loop.STOPPED_MESSAGE`). ``request_stop(..., after_round=True)``
writes :data:`STOP_AFTER_ROUND_ACTION` instead: the trainer finishes and saves the round in progress,
then exits. No schema change is needed.

Model version checkpoints live in ``<data dir>/models/<project>/version-<id>/model.pt``
(:func:`db.demo.data_dir`: ``workbench_data/`` beside a SQLite store).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import psutil
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.demo import data_dir
from db.engine import database_url, init_db, make_sessionmaker
from db.export import export_training_mix
from db.costs import annotation_costs
from db.models import (
    AuditEntry,
    FileStatus,
    Image,
    Metric,
    ModelStatus,
    ModelVersion,
    ServingModel,
    Split,
    SuggestedAction,
    Suggestion,
    utcnow,
)
from db.retention import DEFAULT_KEEP_READY, Retention, apply_retention
from db.people import log_event
from db.roles import check_actor
from db.projects import DEFAULT_PROJECT, class_names, get_project
from db.trainer_lock import (
    TRAINER_STALE_AFTER,
    acquire_trainer_lock,
    release_trainer_lock,
    trainer_heartbeat,
    trainer_state,
)
from db.versions import (
    create_model_version,
    finish_model_version,
    AUTO_SERVE_ACTION,
    CANDIDATE_ACTION,
    latest_model_version,
    record_metrics,
    serving_model_version,
    set_serving_version,
    write_predictions,
    write_scores,
    write_suggestions,
)
from oxnet.active.protocol import ScoredImage, Snapshot, VersionInfo
from oxnet.active.strategies import CostModel, HistoryPoint
from oxnet.vocabulary import ATTENTION_KEY, FULL, MAP, WEAK

__all__ = ["STOP_ACTION", "STOP_AFTER_ROUND_ACTION", "SqlStore", "default_owner", "request_stop"]

#: Audit action of a stop request.
STOP_ACTION = "trainer_stop"
#: Audit action of a request to stop once the round in progress is finished.
STOP_AFTER_ROUND_ACTION = "trainer_stop_after_round"
#: Annotator name of the trainer's own audit entries.
TRAINER_ANNOTATOR = "trainer"
#: Boxes kept per stored prediction (best first).
MAX_BOXES = 20
#: Images written per transaction (short write locks, so the UI's saves never wait long).
WRITE_CHUNK = 500


def default_owner() -> str:
    """``"<host>:<pid>"`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_local_owner(owner: str | None) -> bool:
    """Whether ``owner`` ("host:pid") names a process of this host that no longer runs (or is a zombie)."""
    host, _, pid = (owner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        return psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # it exists but cannot be inspected (another user's): alive
        return False


def request_stop(
    session: Session, project: str = DEFAULT_PROJECT, *, annotator: str = "ui", after_round: bool = False,
    actor: str | None = None,
) -> None:
    """Ask the project's trainer to stop (an audit entry it polls): after its current step, abandoning the
    round in progress, or with ``after_round`` once that round is finished and saved. ``actor``: the
    logged-in user (None: the command line), who must be an admin (:func:`db.roles.check_actor`)."""
    check_actor(session, actor, "admin", action="stop the trainer", annotator=annotator if actor is not None else None)
    get_project(session, project)
    log_event(session, annotator, STOP_AFTER_ROUND_ACTION if after_round else STOP_ACTION, {"project": project})


class SqlStore:
    """:class:`oxnet.active.protocol.Store` on a SQLAlchemy store; every method runs its own transaction.

    Args:
        sessions: a ``sessionmaker`` (:func:`db.engine.make_sessionmaker`).
        project: the project the trainer works on.
        models_dir: where model version folders are made.
        owner: the lock owner name (default ``"<host>:<pid>"``).
        stale_after: a lock whose heartbeat is older than this may be taken.
        keep_ready: ready versions kept besides the protected ones (:func:`apply_retention`, run after
            every finished, failed or abandoned version); None keeps every checkpoint.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        project: str = DEFAULT_PROJECT,
        models_dir: str | Path,
        owner: str | None = None,
        stale_after: timedelta = TRAINER_STALE_AFTER,
        keep_ready: int | None = DEFAULT_KEEP_READY,
    ) -> None:
        self.sessions = sessions
        self.keep_ready = keep_ready
        self.project = project
        self.models_dir = Path(models_dir)
        self.owner = owner or default_owner()
        self.stale_after = stale_after
        self._stop_marker = 0

    @classmethod
    def open(cls, url: str | None = None, *, project: str = DEFAULT_PROJECT, **kwargs: Any) -> SqlStore:
        """The store at ``url`` (default ``$OXNET_DB_URL``), migrated to the newest schema; model folders
        under ``<data dir>/models/<project>``."""
        url = database_url(url)
        kwargs.setdefault("models_dir", data_dir(url) / "models" / project)
        return cls(make_sessionmaker(init_db(url)), project=project, **kwargs)

    def _project_id(self, session: Session) -> int:
        return get_project(session, self.project).id

    # -- lock, heartbeat, stop -----------------------------------------------------------------------
    def acquire(self) -> bool:
        with self.sessions.begin() as session:
            taken = acquire_trainer_lock(session, self.owner, project=self.project, stale_after=self.stale_after)
            if not taken:
                state = trainer_state(session, self.project)
                if state is not None and _dead_local_owner(state.lock_owner):
                    now = utcnow()
                    state.lock_owner, state.heartbeat_at, state.updated_at = self.owner, now, now
                    taken = True
            self._stop_marker = session.scalars(select(func.coalesce(func.max(AuditEntry.id), 0))).one()
        return taken

    def release(self, error: str | None = None) -> None:
        with self.sessions.begin() as session:
            release_trainer_lock(session, self.owner, project=self.project, error=error)

    def heartbeat(self, round: int, progress: float, phase: str, error: str | None = None) -> None:
        with self.sessions.begin() as session:
            trainer_heartbeat(session, self.owner, project=self.project, round=round, progress=progress,
                              phase=phase, error=error)

    def stop_requested(self) -> bool:
        return self._requested(STOP_ACTION)

    def stop_after_round_requested(self) -> bool:
        """Whether someone asked, since this trainer started, to stop once the round in progress is done."""
        return self._requested(STOP_AFTER_ROUND_ACTION)

    def _requested(self, action: str) -> bool:
        with self.sessions.begin() as session:
            afters = session.scalars(
                select(AuditEntry.after).where(AuditEntry.action == action, AuditEntry.id > self._stop_marker)
            )
            return any((after or {}).get("project") == self.project for after in afters)

    def mark_unreadable(self, image_id: int, reason: str) -> None:
        """Set the image's ``file_status`` to missing (no file at its path) or corrupt, with ``reason``
        in ``file_error``, and log it; exports, and so the next snapshots, leave it out."""
        with self.sessions.begin() as session:
            image = session.get(Image, image_id)
            if image is None:
                return
            status = FileStatus.CORRUPT if Path(image.path).is_file() else FileStatus.MISSING
            image.file_status, image.file_error = status, f"{reason} (found by the trainer)"[:2000]
            log_event(session, TRAINER_ANNOTATOR, "file_unreadable",
                      {"project": self.project, "image_id": image_id, "status": status.value, "reason": reason})

    # -- model versions ------------------------------------------------------------------------------
    def abandon_unfinished(self) -> int:
        with self.sessions.begin() as session:
            versions = session.scalars(
                select(ModelVersion).where(ModelVersion.project_id == self._project_id(session),
                                           ModelVersion.status == ModelStatus.TRAINING)
            ).all()
            for version in versions:
                version.status = ModelStatus.FAILED
                version.config = {**version.config, "error": "abandoned: its trainer stopped before the round "
                                                             "finished (killed?); the next round starts afresh"}
            count = len(versions)
        self.retain()
        return count

    def next_round(self) -> int:
        with self.sessions.begin() as session:
            last = session.scalar(select(func.max(ModelVersion.round)).where(ModelVersion.project_id == self._project_id(session)))
            return (last or 0) + 1

    def label_marker(self) -> int:
        with self.sessions.begin() as session:
            return self._label_marker(session)

    def _label_marker(self, session: Session) -> int:
        return session.scalars(
            select(func.coalesce(func.max(AuditEntry.id), 0))
            .join(Image, Image.id == AuditEntry.image_id)
            .where(Image.project_id == self._project_id(session))
        ).one()

    def snapshot(self) -> Snapshot:
        with self.sessions.begin() as session:
            marker = self._label_marker(session)  # read first: an edit racing the export triggers one more round
            mix = export_training_mix(session, project=self.project)
            classes = class_names(session, get_project(session, self.project))
        return Snapshot(classes=classes, train=mix["train"], val=mix["val"], test=mix["test"], marker=marker)

    def ready_checkpoints(self, limit: int = 20) -> list[tuple[int, str | None, str | None]]:
        with self.sessions.begin() as session:
            versions = session.execute(
                select(ModelVersion.id, ModelVersion.checkpoint_path, ModelVersion.config)
                .where(ModelVersion.project_id == self._project_id(session), ModelVersion.status == ModelStatus.READY)
                .order_by(ModelVersion.id.desc()).limit(limit)
            ).all()
        return [(i, path, (config or {}).get("checkpoint_sha256")) for i, path, config in versions]

    def start_version(self, round: int, label_counts: Mapping[str, int], config: Mapping[str, Any]) -> VersionInfo:
        with self.sessions.begin() as session:
            version = create_model_version(session, self.project, config=config, round=round)
            version.label_counts = dict(label_counts)
            version_id = version.id
        folder = self.models_dir / f"version-{version_id:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        return VersionInfo(id=version_id, folder=folder)

    def write_results(self, version_id: int, classes: Sequence[str], results: Sequence[ScoredImage],
                      suggestions: Sequence[Mapping[str, Any]]) -> None:
        for chunk in _chunks(results, WRITE_CHUNK):
            with self.sessions.begin() as session:
                write_predictions(session, version_id, [_prediction_row(r, classes) for r in chunk])
                write_scores(session, version_id, [
                    {"image_id": r.image_id, "value": r.value,
                     "details": {"disagreement": r.disagreement, "uncertainty": r.uncertainty, "conflict": r.conflict}}
                    for r in chunk
                ])
        for chunk in _chunks(suggestions, WRITE_CHUNK):
            with self.sessions.begin() as session:
                write_suggestions(session, version_id, [
                    {"image_id": row["image_id"], "action": SuggestedAction(row["action"]), "score": row["score"],
                     "reason": row["reason"]} for row in chunk
                ])

    def serving_metrics(self) -> dict[str, float] | None:
        with self.sessions.begin() as session:
            version = serving_model_version(session, self.project)
            if version is None:
                return None
            rows = session.execute(
                select(Metric.name, Metric.value).where(Metric.model_version_id == version.id, Metric.split == Split.VAL)
            )
            return {name: value for name, value in rows}

    def annotation_costs(self) -> CostModel:
        with self.sessions.begin() as session:
            return annotation_costs(session, self.project)

    def history(self) -> list[HistoryPoint]:
        with self.sessions.begin() as session:
            project_id = self._project_id(session)
            rows = session.execute(
                select(ModelVersion.label_counts, Metric.value)
                .join(Metric, (Metric.model_version_id == ModelVersion.id) & (Metric.split == Split.VAL) & (Metric.name == MAP))
                .where(ModelVersion.project_id == project_id, ModelVersion.status == ModelStatus.READY)
                .order_by(ModelVersion.id)
            ).all()
        return [HistoryPoint(weak=int((c or {}).get(WEAK, 0)), full=int((c or {}).get(FULL, 0)), mAP=float(v))
                for c, v in rows]

    def pool_hints(self, limit: int) -> tuple[list[int], list[int]]:
        with self.sessions.begin() as session:
            version = latest_model_version(session, self.project)
            if version is None:
                return [], []
            changed = cast(Sequence[int], session.scalars(
                select(AuditEntry.image_id).join(Image, Image.id == AuditEntry.image_id)
                .where(Image.project_id == self._project_id(session), AuditEntry.at >= version.created_at)
                .distinct().limit(limit)
            ).all())  # the join on Image keeps only entries with an image
            top = session.scalars(
                select(Suggestion.image_id).where(Suggestion.model_version_id == version.id)
                .order_by(Suggestion.score.desc(), Suggestion.id).limit(limit)
            ).all()
        return list(changed), list(top)

    def finish_version(
        self, version_id: int, checkpoint: str, metrics: Mapping[str, Mapping[str, float]], config: Mapping[str, Any],
        *, serve: bool = True, reason: str | None = None,
    ) -> None:
        with self.sessions.begin() as session:
            serving = serving_model_version(session, self.project)  # before this version is ready
            for split, values in metrics.items():
                record_metrics(session, version_id, split, values)
            version = finish_model_version(session, version_id, status=ModelStatus.READY, checkpoint_path=checkpoint)
            version.config = dict(config)
            log_event(session, TRAINER_ANNOTATOR, "model_version_ready",
                      {"project": self.project, "model_version_id": version_id, "round": version.round,
                       "label_counts": version.label_counts})
            if serve or serving is None:
                set_serving_version(session, version_id, annotator=TRAINER_ANNOTATOR, action=AUTO_SERVE_ACTION,
                                    project=self.project, note=reason, kind="system")
            else:
                if session.get(ServingModel, version.project_id) is None:
                    # pin the serving version: without a row the newest ready version (this one) would serve
                    set_serving_version(session, serving.id, annotator=TRAINER_ANNOTATOR, action=AUTO_SERVE_ACTION,
                                        project=self.project, kind="system",
                                        note=f"kept serving while version {version_id} is a candidate")
                log_event(session, TRAINER_ANNOTATOR, CANDIDATE_ACTION,
                          {"project": self.project, "model_version_id": version_id,
                           "serving_model_version_id": serving.id}, note=reason)
        self.retain()

    def retain(self) -> Retention | None:
        """Apply the checkpoint retention (:func:`apply_retention`) unless ``keep_ready`` is None."""
        if self.keep_ready is None:
            return None
        with self.sessions.begin() as session:
            report = apply_retention(session, self.models_dir, self.project, keep_ready=self.keep_ready)
        return report

    def fail_version(self, version_id: int, error: str, config: Mapping[str, Any]) -> None:
        with self.sessions.begin() as session:
            version = finish_model_version(session, version_id, status=ModelStatus.FAILED)
            version.config = {**config, "error": error}
        self.retain()


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _prediction_row(result: ScoredImage, classes: Sequence[str]) -> dict[str, Any]:
    """A :class:`~db.models.Prediction` row: boxes by class name in original pixels, image-level
    probabilities and the DAA attention maps (``image_probs[ATTENTION_KEY][class]``, 2-D lists)."""
    order = np.argsort(-np.asarray(result.scores, dtype=np.float64), kind="stable")[:MAX_BOXES].tolist()
    boxes = [
        {"class": classes[int(result.labels[i])], "bbox": [round(float(v), 2) for v in result.boxes[i]],
         "score": round(float(result.scores[i]), 4)}
        for i in order
    ]
    probs: dict[str, Any] = {name: round(float(p), 4) for name, p in zip(classes, result.image_probs)}
    attention = np.asarray(result.attention, dtype=np.float64)
    probs[ATTENTION_KEY] = {name: np.round(attention[c], 4).tolist() for c, name in enumerate(classes)}
    return {"image_id": result.image_id, "boxes": boxes, "image_probs": probs}
