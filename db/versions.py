"""Model versions and what they produce: the label mix they trained on, serving and promotion (audited),
metrics, predictions, scores and suggestions, and the granularity sweep's results. Each function takes
a Session; the caller owns the transaction."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from db.models import (
    AuditEntry,
    Granularity,
    Image,
    Metric,
    ModelStatus,
    ModelVersion,
    Prediction,
    Role,
    Score,
    ServingModel,
    Split,
    SuggestedAction,
    Suggestion,
    SweepResult,
    utcnow,
)
from db.people import get_annotator
from db.roles import check_actor
from db.projects import DEFAULT_PROJECT, get_project
from oxnet.vocabulary import MAP, MEAN_IMAGE_AUC


def train_label_counts(session: Session, project_id: int) -> dict[str, int]:
    """Training-split images per granularity."""
    counts = {g.value: 0 for g in Granularity}
    rows = session.execute(
        select(Image.granularity, func.count())
        .where(Image.project_id == project_id, Image.split == Split.TRAIN)
        .group_by(Image.granularity)
    )
    for granularity, count in rows:
        counts[granularity.value] = count
    return counts


def create_model_version(
    session: Session,
    project: str = DEFAULT_PROJECT,
    *,
    config: Mapping[str, Any],
    round: int = 0,
    checkpoint_path: str | None = None,
) -> ModelVersion:
    """Start a model version (status ``training``) that records the current training label mix."""
    project_id = get_project(session, project).id
    version = ModelVersion(
        project_id=project_id,
        round=round,
        config=dict(config),
        label_counts=train_label_counts(session, project_id),
        checkpoint_path=checkpoint_path,
    )
    session.add(version)
    session.flush()
    return version


def finish_model_version(
    session: Session, model_version_id: int, *, status: ModelStatus | str = ModelStatus.READY, checkpoint_path: str | None = None
) -> ModelVersion:
    """Set a model version's final status (``ready`` makes its suggestions the queue's) and checkpoint."""
    version = session.get(ModelVersion, model_version_id)
    if version is None:
        raise ValueError(f"no model version with id {model_version_id}")
    version.status = ModelStatus(status)
    if checkpoint_path is not None:
        version.checkpoint_path = checkpoint_path
    session.flush()
    return version


def latest_model_version(session: Session, project: str = DEFAULT_PROJECT) -> ModelVersion | None:
    """The newest ``ready`` model version of the project, or None."""
    project_id = get_project(session, project).id
    return session.scalars(
        select(ModelVersion)
        .where(ModelVersion.project_id == project_id, ModelVersion.status == ModelStatus.READY)
        .order_by(ModelVersion.id.desc())
        .limit(1)
    ).first()


#: Audit actions of serving changes: a user's promotion of a newer (or candidate) version, a user's
#: rollback to an older one, the trainer serving a new version, and the trainer keeping one as candidate.
PROMOTE_ACTION, ROLLBACK_ACTION = "model_promote", "model_rollback"
AUTO_SERVE_ACTION, CANDIDATE_ACTION = "model_serve", "model_candidate"


def serving_model_version(session: Session, project: str = DEFAULT_PROJECT) -> ModelVersion | None:
    """The model version that serves the project's suggestions and model boxes, or None.

    The one the store's ``serving_model`` row names (set by the trainer's serve-or-candidate decision
    and by :func:`promote_model_version`); without a row, the newest ready version. Checkpoint
    retention must keep this version's checkpoint.
    """
    project_id = get_project(session, project).id
    row = session.get(ServingModel, project_id)
    if row is not None:
        version = session.get(ModelVersion, row.model_version_id)
        if version is not None and version.status is ModelStatus.READY:
            return version
    return latest_model_version(session, project)


def candidate_model_versions(session: Session, project: str = DEFAULT_PROJECT) -> list[ModelVersion]:
    """Ready versions newer than the serving one (kept back by the trainer, or rolled back), newest first."""
    serving = serving_model_version(session, project)
    if serving is None:
        return []
    return list(session.scalars(
        select(ModelVersion)
        .where(ModelVersion.project_id == serving.project_id, ModelVersion.status == ModelStatus.READY,
               ModelVersion.id > serving.id)
        .order_by(ModelVersion.id.desc())
    ))


def set_serving_version(
    session: Session,
    model_version_id: int,
    *,
    annotator: str,
    action: str,
    project: str = DEFAULT_PROJECT,
    note: str | None = None,
    kind: str = "human",
    details: Mapping[str, Any] | None = None,
    actor: str | None = None,
) -> ModelVersion:
    """Make a ready version of ``project`` the serving one and audit it (``action``, who, when, from which
    version). Raises ValueError naming the version when it is not a ready version of the project, and
    :class:`~db.roles.PermissionDenied` when ``actor`` (a logged-in user; None: the trainer or the
    command line) is not an admin acting under their own name."""
    check_actor(session, actor, Role.ADMIN, action="change the serving model version", annotator=annotator)
    project_row = get_project(session, project)
    version = session.get(ModelVersion, model_version_id)
    if version is None or version.project_id != project_row.id:
        raise ValueError(f"no model version {model_version_id} in project {project!r}")
    if version.status is not ModelStatus.READY:
        raise ValueError(f"model version {model_version_id} is {version.status.value}, not ready: it cannot serve")
    previous = serving_model_version(session, project)
    who = get_annotator(session, annotator, kind)
    row = session.get(ServingModel, project_row.id)
    now = utcnow()
    if row is None:
        session.add(ServingModel(project_id=project_row.id, model_version_id=version.id, annotator_id=who.id, since=now))
    else:
        row.model_version_id, row.annotator_id, row.since = version.id, who.id, now
    session.add(AuditEntry(annotator=who, action=action, note=note, at=now, after={
        "project": project, "model_version_id": version.id,
        "previous_model_version_id": previous.id if previous is not None else None, **dict(details or {}),
    }))
    session.flush()
    return version


def promote_model_version(
    session: Session, model_version_id: int, *, annotator: str, project: str = DEFAULT_PROJECT, note: str | None = None,
    actor: str | None = None,
) -> ModelVersion:
    """A user makes a ready version serve: a promotion when it is newer than the serving one, a rollback
    when it is older; audited with ``annotator`` and the time. Raises ValueError for a version that is
    not ready, not in the project, or already serving; :class:`~db.roles.PermissionDenied` when
    ``actor`` (the logged-in user; None: the command line) is not an admin."""
    check_actor(session, actor, Role.ADMIN, action="promote or roll back a model version", annotator=annotator)
    serving = serving_model_version(session, project)
    if serving is not None and serving.id == model_version_id:
        raise ValueError(f"model version {model_version_id} already serves")
    action = ROLLBACK_ACTION if serving is not None and model_version_id < serving.id else PROMOTE_ACTION
    return set_serving_version(session, model_version_id, annotator=annotator, action=action, project=project, note=note,
                               actor=actor)


def serving_history(session: Session, project: str = DEFAULT_PROJECT, *, limit: int = 20) -> list[dict[str, Any]]:
    """The newest ``limit`` serving changes and candidate decisions of the project, newest first:
    ``{"at", "annotator", "action", "model_version_id", "previous_model_version_id", "note"}``."""
    get_project(session, project)
    actions = (PROMOTE_ACTION, ROLLBACK_ACTION, AUTO_SERVE_ACTION, CANDIDATE_ACTION)
    entries = session.scalars(
        select(AuditEntry).where(AuditEntry.action.in_(actions)).order_by(AuditEntry.id.desc()).limit(limit * 4)
    )
    rows = []
    for entry in entries:
        after = entry.after or {}
        if after.get("project") != project:
            continue
        rows.append({"at": entry.at, "annotator": entry.annotator.name, "action": entry.action,
                     "model_version_id": after.get("model_version_id"),
                     "previous_model_version_id": after.get("previous_model_version_id"), "note": entry.note})
        if len(rows) == limit:
            break
    return rows


def record_metrics(session: Session, model_version_id: int, split: Split | str, metrics: Mapping[str, float]) -> None:
    """Store named metrics of a model version on a split, replacing earlier values of the same names."""
    split = Split(split)
    session.execute(
        delete(Metric).where(Metric.model_version_id == model_version_id, Metric.split == split, Metric.name.in_(list(metrics)))
    )
    rows = [{"model_version_id": model_version_id, "split": split, "name": k, "value": float(v)} for k, v in metrics.items()]
    if rows:
        session.execute(insert(Metric), rows)


def _bulk(session: Session, model, model_version_id: int, rows: Iterable[Mapping[str, Any]], required: Sequence[str]) -> int:
    batch = []
    for i, row in enumerate(rows):
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"{model.__tablename__} row {i}: missing {missing}")
        batch.append({**row, "model_version_id": model_version_id})
    if batch:
        session.execute(insert(model), batch)
    return len(batch)


def write_predictions(session: Session, model_version_id: int, rows: Iterable[Mapping[str, Any]]) -> int:
    """Bulk-insert predictions: ``{"image_id", "boxes": [{"class", "bbox": [x1, y1, x2, y2], "score"}], "image_probs": {class: p}}``."""
    return _bulk(session, Prediction, model_version_id, rows, ("image_id", "boxes", "image_probs"))


def write_scores(session: Session, model_version_id: int, rows: Iterable[Mapping[str, Any]]) -> int:
    """Bulk-insert scores: ``{"image_id", "value", "details": {...}}``."""
    return _bulk(session, Score, model_version_id, rows, ("image_id", "value"))


def write_suggestions(session: Session, model_version_id: int, rows: Iterable[Mapping[str, Any]]) -> int:
    """Bulk-insert suggestions: ``{"image_id", "action": SuggestedAction, "score", "reason": {"text", "classes"}}``."""
    checked = ({**row, "action": SuggestedAction(row["action"])} if "action" in row else row for row in rows)
    return _bulk(session, Suggestion, model_version_id, checked, ("image_id", "action", "score"))


def record_sweep_result(
    session: Session,
    project: str = DEFAULT_PROJECT,
    *,
    method: str,
    n_full: int,
    n_weak: int,
    n_unlabeled: int,
    metrics: Mapping[str, float],
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Store one sweep run (the label mix it trained on and its metrics)."""
    result = SweepResult(
        project_id=get_project(session, project).id, method=method, seed=seed, n_full=n_full, n_weak=n_weak,
        n_unlabeled=n_unlabeled, metrics=dict(metrics), config=dict(config or {}),
    )
    session.add(result)
    session.flush()
    return result


SWEEP_ROW_KEYS = ("method", "full_fraction", "seed", "n_full", "n_weak", "n_unlabeled", MAP)


def record_sweep_rows(
    session: Session, rows: Sequence[Mapping[str, Any]], project: str = DEFAULT_PROJECT, *, source: str = "rows"
) -> tuple[int, int]:
    """Store the rows of a granularity sweep (``results.json`` of ``scripts/sweep.py``, schema
    oxnet.sweep/1) so the Metrics page plots them. A row whose run is already stored (same method, seed,
    label counts and metrics: storing a part and later the merged file, or a live ``--store`` and then
    the file) is skipped. Every row is checked before any is written; a bad one raises ValueError naming
    ``source`` and its index. Returns (stored, skipped)."""
    for i, row in enumerate(rows):
        missing = [k for k in SWEEP_ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"{source}: rows[{i}] lacks {missing}")
        if not isinstance(row["method"], str) or any(
            not isinstance(row[k], int) or row[k] < 0 for k in ("seed", "n_full", "n_weak", "n_unlabeled")
        ):
            raise ValueError(f"{source}: rows[{i}] has a bad method, seed or image count: {dict(row)}")
    project_id = get_project(session, project).id
    stored = {
        (r.method, r.seed, r.n_full, r.n_weak, r.n_unlabeled, _canonical(r.metrics))
        for r in session.scalars(select(SweepResult).where(SweepResult.project_id == project_id))
    }
    added = 0
    for row in rows:
        metrics = {k: v for k, v in row.items() if k.startswith((MAP, "AP")) or k in (MEAN_IMAGE_AUC, "teacher_mAP")}
        key = (row["method"], row["seed"], row["n_full"], row["n_weak"], row["n_unlabeled"], _canonical(metrics))
        if key in stored:
            continue
        record_sweep_result(session, project, method=row["method"], seed=row["seed"], n_full=row["n_full"],
                            n_weak=row["n_weak"], n_unlabeled=row["n_unlabeled"], metrics=metrics,
                            config={"full_fraction": row["full_fraction"]})
        stored.add(key)
        added += 1
    return added, len(rows) - added


def _canonical(metrics: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(metrics or {}), sort_keys=True)
