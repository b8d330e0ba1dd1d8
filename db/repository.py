"""Repository functions: small queries and writes over the store. Each takes a Session; the caller owns
the transaction (``with Session.begin() as session: ...``).

Annotation edits (labels, boxes, downgrades) live in :mod:`db.lifecycle`; imports in :mod:`db.importers`;
exports in :mod:`db.export`.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import (
    Annotator,
    AuditEntry,
    Granularity,
    Image,
    LabelClass,
    Lease,
    Metric,
    ModelStatus,
    ModelVersion,
    Prediction,
    Project,
    Role,
    Score,
    ServingModel,
    Split,
    SuggestedAction,
    Suggestion,
    SweepResult,
    TrainerState,
    utcnow,
)
from db.roles import check_actor
from oxnet.classes import PAPER_CLASSES

#: Name of the project used when none is given.
DEFAULT_PROJECT = "default"
#: How long an image handed to an annotator stays theirs.
DEFAULT_LEASE = timedelta(minutes=30)
#: A trainer whose heartbeat is older than this has died; another may take its lock.
TRAINER_STALE_AFTER = timedelta(minutes=5)


#: Longest annotator name (characters, after normalisation).
MAX_ANNOTATOR_NAME = 64
#: Names a person cannot claim (compared case-insensitively): the store's own writers. Any name with
#: a ``:`` is reserved too (``import:nih``, ``vindr:R8``).
RESERVED_ANNOTATOR_NAMES = frozenset({"trainer", "system", "ui", "cli", "oracle"})


def annotator_name(name: str, *, person: bool = True) -> str:
    """The one normal form of an annotator's name, for every place a name enters the store.

    Unicode NFC, trimmed, runs of white space made one space; at most :data:`MAX_ANNOTATOR_NAME`
    characters; no control or format characters. With ``person`` (a name typed by a user) the
    reserved names (:data:`RESERVED_ANNOTATOR_NAMES`, anything with ``:``) are refused as well.

    Raises:
        ValueError: the name is empty, too long, holds a control character or is reserved; the
            message says which.
    """
    if not isinstance(name, str):
        raise ValueError(f"the annotator name must be text, got {type(name).__name__}")
    for char in name:
        if unicodedata.category(char).startswith("C") and char not in "\t\n\r":
            raise ValueError(f"the annotator name must not contain control characters (found U+{ord(char):04X})")
    normal = " ".join(unicodedata.normalize("NFC", name).split())
    if not normal:
        raise ValueError("the annotator name must not be empty")
    if len(normal) > MAX_ANNOTATOR_NAME:
        raise ValueError(f"the annotator name must be at most {MAX_ANNOTATOR_NAME} characters, got {len(normal)}")
    if person and (":" in normal or normal.casefold() in RESERVED_ANNOTATOR_NAMES):
        raise ValueError(f"{normal!r} is reserved for the workbench's own writers (trainer, imports); choose another name")
    return normal


_UPSERT_INSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


def _insert_ignore(session: Session, table, values: Mapping[str, Any], key: Sequence[str]) -> None:
    """INSERT ``values`` unless a row with the same ``key`` exists (race-free on SQLite and PostgreSQL)."""
    upsert = _UPSERT_INSERT.get(session.get_bind().dialect.name)
    if upsert is not None:
        session.execute(upsert(table).values(**values).on_conflict_do_nothing(index_elements=list(key)))
    elif session.execute(select(table).filter_by(**{k: values[k] for k in key})).first() is None:
        session.execute(insert(table).values(**values))


# --- projects, classes, annotators ---------------------------------------------------------------


def get_project(session: Session, name: str = DEFAULT_PROJECT) -> Project:
    """The project called ``name``; ValueError naming the existing projects when there is none."""
    project = session.scalars(select(Project).where(Project.name == name)).one_or_none()
    if project is None:
        names = list(session.scalars(select(Project.name).order_by(Project.name)))
        raise ValueError(f"no project {name!r} in the store (projects: {names or 'none; import images first'})")
    return project


def ensure_project(session: Session, name: str = DEFAULT_PROJECT, classes: Sequence[str] | None = None) -> Project:
    """Get or create a project and make sure it has ``classes``.

    A new project gets ``classes`` (the paper's nine when None); an existing one gets the classes it
    lacks appended (an NIH import brings NIH's eight), so existing category ids never change.
    """
    if classes is not None and len(set(classes)) != len(classes):
        raise ValueError(f"duplicate class names in {list(classes)}")
    project = session.scalars(select(Project).where(Project.name == name)).one_or_none()
    if project is None:
        project = Project(name=name)
        session.add(project)
        classes = PAPER_CLASSES if classes is None else classes
    known = [c.name for c in project.classes]
    for name_ in classes or ():
        if name_ not in known:
            known.append(name_)
            project.classes.append(LabelClass(name=name_, ordinal=len(known)))
    session.flush()
    return project


def class_names(session: Session, project: Project) -> list[str]:
    """The project's class names in category-id order (id = index + 1)."""
    return list(session.scalars(select(LabelClass.name).where(LabelClass.project_id == project.id).order_by(LabelClass.ordinal)))


def get_annotator(session: Session, name: str, kind: str = "human") -> Annotator:
    """The annotator called ``name`` (normalised by :func:`annotator_name`), created on first use."""
    name = annotator_name(name, person=False)
    _insert_ignore(session, Annotator.__table__, {"name": name, "kind": kind}, ["name"])
    return session.scalars(select(Annotator).where(Annotator.name == name)).one()


def log_event(session: Session, annotator: str, action: str, after: Mapping[str, Any], note: str | None = None) -> None:
    """Append an audit entry that concerns no single image (split assignment, imports ...)."""
    session.add(AuditEntry(annotator=get_annotator(session, annotator, "system"), action=action, after=dict(after), note=note))


# --- overview, splits ----------------------------------------------------------------------------


def stats(session: Session, project: str = DEFAULT_PROJECT) -> dict[str, Any]:
    """Image counts: ``{"total": n, "granularity": {g: n}, "split": {"train"|...|"unassigned": {g: n}}}``."""
    project_id = get_project(session, project).id
    rows = session.execute(
        select(Image.granularity, Image.split, func.count())
        .where(Image.project_id == project_id)
        .group_by(Image.granularity, Image.split)
    )
    result: dict[str, Any] = {"total": 0, "granularity": {g.value: 0 for g in Granularity}, "split": {}}
    for granularity, split, count in rows:
        result["total"] += count
        result["granularity"][granularity.value] += count
        per_split = result["split"].setdefault(split.value if split else "unassigned", {g.value: 0 for g in Granularity})
        per_split[granularity.value] += count
    return result


def _unit_hash(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(
    session: Session,
    project: str = DEFAULT_PROJECT,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    reassign: bool = False,
    annotator: str = "system",
) -> dict[str, int]:
    """Put every image without a split into train / val / test, all images of a patient together.

    A patient who already has images in a split keeps it (new images join their patient); other
    patients are placed by a seeded hash of their id, so the result is reproducible and stable as
    images arrive. Images without a patient id count as their own patient. ``reassign=True`` redoes
    every image. Returns the number of images newly assigned per split.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing to 1, got {fractions}")
    project_id = get_project(session, project).id
    rows = session.execute(select(Image.id, Image.patient_id, Image.split).where(Image.project_id == project_id)).all()
    known: dict[str, Split] = {}
    if not reassign:
        for _, patient, split in rows:
            if patient is not None and split is not None:
                known.setdefault(patient, split)
    bounds = (fractions[0], fractions[0] + fractions[1])
    updates, counts = [], {s.value: 0 for s in Split}
    for image_id, patient, split in rows:
        if split is not None and not reassign:
            continue
        key = patient if patient is not None else f"image:{image_id}"
        chosen = known.get(key)
        if chosen is None:
            u = _unit_hash(seed, key)
            chosen = Split.TRAIN if u < bounds[0] else Split.VAL if u < bounds[1] else Split.TEST
            if patient is not None:
                known[patient] = chosen
        updates.append({"b_id": image_id, "b_split": chosen.value})
        counts[chosen.value] += 1
    if updates:
        table = Image.__table__
        session.execute(update(table).where(table.c.id == bindparam("b_id")).values(split=bindparam("b_split")), updates)
        log_event(session, annotator, "assign_splits", {"counts": counts, "seed": seed, "fractions": list(fractions)})
    return counts


# --- model versions and their outputs ------------------------------------------------------------


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


# --- the annotation queue and leases -------------------------------------------------------------


def take_lease(
    session: Session, image_id: int, annotator: str, *, ttl: timedelta = DEFAULT_LEASE, now: datetime | None = None,
    actor: str | None = None,
) -> bool:
    """Hand the image to ``annotator`` until now + ``ttl``. False when someone else holds an unexpired lease.

    Taking your own lease again extends it.

    Raises:
        ValueError: there is no image with id ``image_id``.
        PermissionDenied: ``actor`` (the logged-in user; None: a system actor) may not annotate, or is
            not ``annotator`` (:func:`db.roles.check_actor`).
    """
    check_actor(session, actor, Role.ANNOTATOR, action="take an image", annotator=annotator)
    if session.get(Image, image_id) is None:
        raise ValueError(f"no image with id {image_id}")
    now = now or utcnow()
    who = get_annotator(session, annotator).id
    extended = session.execute(
        update(Lease)
        .where(Lease.image_id == image_id, or_(Lease.annotator_id == who, Lease.expires_at <= now))
        .values(annotator_id=who, taken_at=now, expires_at=now + ttl)
        .execution_options(synchronize_session=False)
    )
    if extended.rowcount:
        return True
    # No lease row yet, or another's unexpired one. Two annotators can get here at once for the same
    # image: the insert ignores a row that appeared meanwhile (PostgreSQL would raise a unique
    # violation), and whoever's row is there holds the lease.
    _insert_ignore(session, Lease.__table__, {"image_id": image_id, "annotator_id": who, "taken_at": now,
                                              "expires_at": now + ttl}, key=["image_id"])
    holder = session.execute(select(Lease.annotator_id).where(Lease.image_id == image_id)).scalar_one()
    return holder == who


def release_lease(session: Session, image_id: int, annotator: str, *, actor: str | None = None) -> bool:
    """Give the image back (only its holder can). True when a lease was released."""
    check_actor(session, actor, Role.ANNOTATOR, action="give an image back", annotator=annotator)
    who = get_annotator(session, annotator).id
    result = session.execute(delete(Lease).where(Lease.image_id == image_id, Lease.annotator_id == who))
    return bool(result.rowcount)


def expire_leases(session: Session, now: datetime | None = None) -> int:
    """Delete expired leases; returns how many."""
    return session.execute(delete(Lease).where(Lease.expires_at <= (now or utcnow()))).rowcount


def next_suggestions(
    session: Session,
    action: SuggestedAction | str,
    *,
    annotator: str,
    project: str = DEFAULT_PROJECT,
    limit: int = 50,
    now: datetime | None = None,
) -> list[Suggestion]:
    """The top ``limit`` suggestions for ``action`` of the serving model version, best score first.

    Leaves out images leased to another annotator (unexpired) and images already at or past the
    action's target granularity (labels for unlabeled images; boxes for unlabeled and weak ones).
    Served by the (model_version_id, action, score) index.
    """
    action = SuggestedAction(action)
    version = serving_model_version(session, project)
    if version is None:
        return []
    now = now or utcnow()
    who = get_annotator(session, annotator).id
    below = [g for g in Granularity if g.rank < action.target.rank]
    query = (
        select(Suggestion)
        .join(Image, Image.id == Suggestion.image_id)
        .outerjoin(Lease, Lease.image_id == Suggestion.image_id)
        .where(
            Suggestion.model_version_id == version.id,
            Suggestion.action == action,
            Image.granularity.in_(below),
            or_(Lease.image_id.is_(None), Lease.expires_at <= now, Lease.annotator_id == who),
        )
        .order_by(Suggestion.score.desc())
        .limit(limit)
    )
    return list(session.scalars(query))


def claim_next(
    session: Session,
    action: SuggestedAction | str,
    *,
    annotator: str,
    project: str = DEFAULT_PROJECT,
    ttl: timedelta = DEFAULT_LEASE,
    now: datetime | None = None,
    actor: str | None = None,
) -> Suggestion | None:
    """Lease the best available suggestion for ``action`` to ``annotator`` and return it (None if none)."""
    check_actor(session, actor, Role.ANNOTATOR, action="take an image", annotator=annotator)
    for suggestion in next_suggestions(session, action, annotator=annotator, project=project, now=now):
        if take_lease(session, suggestion.image_id, annotator, ttl=ttl, now=now, actor=actor):
            return suggestion
    return None


# --- the trainer's state and sweeps --------------------------------------------------------------


def acquire_trainer_lock(
    session: Session,
    owner: str,
    *,
    project: str = DEFAULT_PROJECT,
    stale_after: timedelta = TRAINER_STALE_AFTER,
    now: datetime | None = None,
) -> bool:
    """Make ``owner`` the project's single trainer. False while another trainer's heartbeat is fresh."""
    now = now or utcnow()
    project_id = get_project(session, project).id
    _insert_ignore(
        session, TrainerState.__table__,
        {"project_id": project_id, "round": 0, "progress": 0.0, "updated_at": now}, ["project_id"],
    )
    taken = session.execute(
        update(TrainerState)
        .where(
            TrainerState.project_id == project_id,
            or_(
                TrainerState.lock_owner.is_(None),
                TrainerState.lock_owner == owner,
                TrainerState.heartbeat_at < now - stale_after,
            ),
        )
        .values(lock_owner=owner, heartbeat_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(taken.rowcount)


def trainer_heartbeat(
    session: Session,
    owner: str,
    *,
    project: str = DEFAULT_PROJECT,
    round: int | None = None,
    progress: float | None = None,
    phase: str | None = None,
    error: str | None = None,
    now: datetime | None = None,
) -> None:
    """Record that ``owner`` is alive, and where it is. RuntimeError when it no longer holds the lock."""
    now = now or utcnow()
    values: dict[str, Any] = {"heartbeat_at": now, "updated_at": now}
    for key, value in (("round", round), ("progress", progress), ("phase", phase), ("last_error", error)):
        if value is not None:
            values[key] = value
    project_id = get_project(session, project).id
    result = session.execute(
        update(TrainerState)
        .where(TrainerState.project_id == project_id, TrainerState.lock_owner == owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:
        raise RuntimeError(f"trainer {owner!r} does not hold the lock of project {project!r}")


def release_trainer_lock(session: Session, owner: str, *, project: str = DEFAULT_PROJECT, error: str | None = None) -> None:
    """Give the trainer lock back (on exit or after an error, which is kept in ``last_error``)."""
    project_id = get_project(session, project).id
    values: dict[str, Any] = {"lock_owner": None, "updated_at": utcnow()}
    if error is not None:
        values["last_error"] = error
    session.execute(
        update(TrainerState)
        .where(TrainerState.project_id == project_id, TrainerState.lock_owner == owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def trainer_state(session: Session, project: str = DEFAULT_PROJECT) -> TrainerState | None:
    """The trainer's row of the project (None before any trainer ran)."""
    return session.get(TrainerState, get_project(session, project).id, populate_existing=True)


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


SWEEP_ROW_KEYS = ("method", "full_fraction", "seed", "n_full", "n_weak", "n_unlabeled", "mAP")


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
        metrics = {k: v for k, v in row.items() if k.startswith(("mAP", "AP")) or k in ("mean_image_auc", "teacher_mAP")}
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
