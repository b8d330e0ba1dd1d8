"""Queries and the one annotation save behind the Streamlit pages (``app/views``).

Pages only render; every store query and command they run goes through this module (the door),
which calls the store module the logic lives in (the queue and its leases: :mod:`db.queue`; several
readers: :mod:`db.readers`; counts: :mod:`db.projects`; the trainer's state: :mod:`db.trainer_lock`).
The queries take a Session and the caller owns the transaction; the page commands at the end take the
page's sessionmaker and own one transaction per UI event. Results are plain dataclasses and dicts
(safe to cache and to pickle).

Contracts with the trainer (what it writes and these queries read), documented in the README:

- metrics are :class:`~db.models.Metric` rows; :func:`oxnet.evaluation.metrics.evaluate`'s nested dicts are
  flattened as ``per_class_AP/<class>`` and ``image_auc/<class>``; training losses are ``loss/<name>``
  rows on the ``train`` split (one value per model version, the round's mean);
- an attention map of a prediction is ``Prediction.image_probs["attention"][<class>]``: a 2-D list of
  non-negative floats over the image (any grid size; it is stretched to the image).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from db.costs import MIN_SAVES as MIN_SAVES
from db.costs import cost_rows, record_save
from db.demo import data_dir as data_dir
from db.drafts import FINDING_STATES as FINDING_STATES
from db.drafts import NOT_ASSESSED as NOT_ASSESSED
from db.drafts import PRESENT as PRESENT
from db.drafts import StoredDraft, delete_draft, get_draft, list_drafts, save_draft
from db.importers import SALT_ENV as SALT_ENV
from db.lifecycle import ConflictError, downgrade, mark_boxes_complete, set_boxes, set_image_labels
from db.people import annotator_name as annotator_name
from db.models import (
    Annotator,
    FileStatus,
    Granularity,
    Image,
    LabelClass,
    Lease,
    Metric,
    ModelVersion,
    Prediction,
    Project,
    Role,
    Split,
    SuggestedAction,
    SweepResult,
    utcnow,
)
from db.projects import DEFAULT_PROJECT, class_names, get_project, stats
from db.queue import claim_next
from db.queue import queue as queue
from db.retention import DEFAULT_KEEP_READY as DEFAULT_KEEP_READY
from db.retention import folder_size
from db.roles import check_actor
from db.trainer_lock import TRAINER_STALE_AFTER as TRAINER_STALE_AFTER
from db.trainer_lock import trainer_state
from db.versions import promote_model_version, serving_history, serving_model_version
from oxnet.data.annotation import BoxInput, annotation_problems
from oxnet.vocabulary import ATTENTION_KEY, SCORE_THRESHOLD

#: Smallest box side (original image pixels) a save accepts: a click on the canvas is not a box.
MIN_BOX_PX = 4.0
#: The Annotate page's threshold default when the serving version has no val ``SCORE_THRESHOLD`` metric
#: (the score at which its boxes become worth showing).
DEFAULT_SCORE_THRESHOLD = 0.5


@dataclass(frozen=True)
class ImageDetail:
    """An image with its annotation, as the Annotate page edits it.

    ``boxes``: (class, x1, y1, x2, y2) in original pixels; ``labels``: {class: present} for the classes
    that have a label row.
    """

    id: int
    path: str
    width: int
    height: int
    version: int
    granularity: str
    split: str | None
    file_status: str
    no_finding: bool
    boxes_complete: bool
    labels: dict[str, bool]
    boxes: list[tuple[str, float, float, float, float]]
    classes: list[str]
    leased_by: str | None = None


@dataclass(frozen=True)
class ModelOutput:
    """The serving model version's output on one image (empty lists when it has no prediction for it).

    ``boxes``: ``{"class", "bbox": [x1, y1, x2, y2] (original pixels), "score"}`` dicts, best first;
    ``attention``: {class: 2-D list}.
    """

    model_version_id: int | None
    boxes: list[dict[str, Any]] = field(default_factory=list)
    image_probs: dict[str, float] = field(default_factory=dict)
    attention: dict[str, list[list[float]]] = field(default_factory=dict)
    #: The version's val ``score_threshold`` metric, or None when it recorded none.
    score_threshold: float | None = None


def project_exists(session: Session, project: str = DEFAULT_PROJECT) -> bool:
    """Whether the store has the project (a fresh store has none)."""
    return session.execute(select(Project.id).where(Project.name == project)).first() is not None


def project_classes(session: Session, project: str = DEFAULT_PROJECT) -> list[str]:
    """The project's class names in category-id order."""
    return class_names(session, get_project(session, project))


def unreadable_files(session: Session, project: str = DEFAULT_PROJECT, *, limit: int = 500) -> list[dict[str, Any]]:
    """The project's images whose file is missing or corrupt (left out of training and exports):
    ``{"id", "path", "status", "reason"}`` by image id."""
    if not project_exists(session, project):
        return []
    rows = session.execute(
        select(Image.id, Image.path, Image.file_status, Image.file_error)
        .join(Project, Project.id == Image.project_id)
        .where(Project.name == project, Image.file_status.in_([FileStatus.MISSING, FileStatus.CORRUPT]))
        .order_by(Image.id).limit(limit)
    )
    return [{"id": i, "path": path, "status": status.value, "reason": error or ""} for i, path, status, error in rows]


# --- one image -----------------------------------------------------------------------------------


def image_detail(session: Session, image_id: int, *, annotator: str | None = None) -> ImageDetail:
    """The image's annotation; ``leased_by`` names another annotator holding an unexpired lease."""
    image = session.scalars(
        select(Image).where(Image.id == image_id).options(selectinload(Image.labels), selectinload(Image.boxes))
        .execution_options(populate_existing=True)
    ).one_or_none()
    if image is None:
        raise ValueError(f"no image with id {image_id}")
    holder = session.execute(
        select(Annotator.name).join(Lease, Lease.annotator_id == Annotator.id)
        .where(Lease.image_id == image_id, Lease.expires_at > utcnow())
    ).scalar()
    classes = list(session.scalars(select(LabelClass.name).where(LabelClass.project_id == image.project_id).order_by(LabelClass.ordinal)))
    return ImageDetail(
        id=image.id, path=image.path, width=image.width, height=image.height, version=image.version,
        granularity=image.granularity.value, split=image.split.value if image.split else None,
        file_status=image.file_status.value, no_finding=image.no_finding, boxes_complete=image.boxes_complete,
        labels={label.label_class.name: label.present for label in image.labels},
        boxes=sorted((b.label_class.name, b.x1, b.y1, b.x2, b.y2) for b in image.boxes),
        classes=classes, leased_by=holder if holder not in (None, annotator) else None,
    )


def model_output(session: Session, image_id: int, *, project: str = DEFAULT_PROJECT) -> ModelOutput:
    """The serving model version's prediction on the image (see :class:`ModelOutput`)."""
    version = serving_model_version(session, project)
    if version is None:
        return ModelOutput(model_version_id=None)
    prediction = session.scalars(
        select(Prediction).where(Prediction.model_version_id == version.id, Prediction.image_id == image_id)
    ).first()
    threshold = session.execute(
        select(Metric.value).where(Metric.model_version_id == version.id, Metric.split == Split.VAL,
                                   Metric.name == SCORE_THRESHOLD)
    ).scalar()
    threshold = float(threshold) if threshold is not None and 0.0 <= float(threshold) <= 1.0 else None
    if prediction is None:
        return ModelOutput(model_version_id=version.id, score_threshold=threshold)
    probs = dict(prediction.image_probs or {})
    attention = probs.pop(ATTENTION_KEY, None) or {}
    boxes = sorted(prediction.boxes or [], key=lambda b: -float(b.get("score", 0.0)))
    return ModelOutput(
        model_version_id=version.id, boxes=boxes,
        image_probs={k: float(v) for k, v in probs.items() if isinstance(v, (int, float))},
        attention={k: v for k, v in attention.items() if isinstance(v, list)} if isinstance(attention, Mapping) else {},
        score_threshold=threshold,
    )


def validate_annotation(
    classes: Sequence[str],
    present: Collection[str],
    no_finding: bool,
    boxes: Sequence[BoxInput],
    width: int,
    height: int,
    *,
    complete: bool = False,
    absent: Collection[str] = (),
    min_box: float = MIN_BOX_PX,
) -> list[str]:
    """Why an annotation cannot be saved, one message per problem ([] when it can).

    The one annotation check (:func:`oxnet.data.annotation.annotation_problems`) with the UI's rules:
    every box has a known class and an extent inside the image of at least ``min_box`` pixels on each
    side, "No finding" goes with no finding and no box, no class is both present (ticked or boxed) and
    absent, something is labelled at all, and a ``complete`` (full) annotation has a box for every
    present finding.
    """
    return [p.message for p in annotation_problems(boxes, classes=classes, width=width, height=height, present=present,
                                                   absent=absent, no_finding=no_finding, complete=complete,
                                                   require_label=True, min_box=min_box)]


def save_annotation(
    session: Session,
    image_id: int,
    *,
    present: Collection[str],
    no_finding: bool,
    boxes: Sequence[BoxInput],
    complete: bool,
    annotator: str,
    expected_version: int,
    absent: Collection[str] = (),
    actor: str | None = None,
) -> Image:
    """Save what the annotator sees as the image's whole annotation, or nothing.

    ``present`` / ``absent``: the findings the annotator marked so (classes with boxes are present); a
    class in neither is "not assessed" and gets no label row (training masks it);
    ``boxes``: (class, x1, y1, x2, y2) in original pixels; ``complete``: all lesions are boxed (full).
    Runs the :mod:`db.lifecycle` edits that change something, in an order that never passes through a
    contradiction, each audited. Raises ValueError (see :func:`validate_annotation`) or
    :class:`~db.lifecycle.ConflictError` when the image changed since ``expected_version``; the caller's
    transaction then rolls back and nothing is saved. ``actor`` is the logged-in user (None: a system
    actor); :class:`~db.roles.PermissionDenied` when they may not annotate or are not ``annotator``.
    """
    check_actor(session, actor, Role.ANNOTATOR, action="save annotations", annotator=annotator)
    detail = image_detail(session, image_id)
    if detail.version != expected_version:
        raise ConflictError(image_id, expected_version, detail.version)
    problems = validate_annotation(detail.classes, present, no_finding, boxes, detail.width, detail.height,
                                   complete=complete, absent=absent)
    if problems:
        raise ValueError("; ".join(problems))
    new_boxes = sorted((str(n), float(a), float(b), float(c), float(d)) for n, a, b, c, d in boxes)
    boxed = {b[0] for b in new_boxes}
    final = {name: name in present or name in boxed for name in detail.classes
             if name in present or name in boxed or name in absent}
    old_boxed = {b[0] for b in detail.boxes}
    image = None
    first = {**{name: value or name in old_boxed for name, value in final.items()}, **{name: True for name in old_boxed}}
    first_nf = no_finding and not old_boxed
    if (first, first_nf) != (detail.labels, detail.no_finding):
        image = set_image_labels(session, image_id, first, annotator=annotator, no_finding=first_nf)
    if new_boxes != detail.boxes:
        image = set_boxes(session, image_id, new_boxes, annotator=annotator)
    if (final, no_finding) != (first, first_nf):
        image = set_image_labels(session, image_id, final, annotator=annotator, no_finding=no_finding)
    if complete and not detail.boxes_complete:
        image = mark_boxes_complete(session, image_id, annotator=annotator)
    elif not complete and detail.boxes_complete:
        image = downgrade(session, image_id, Granularity.WEAK, annotator=annotator, reason="annotator unticked 'all lesions boxed'")
    image = image if image is not None else session.get(Image, image_id)
    if image is None:
        raise ValueError(f"no image with id {image_id}")
    return image


# --- models and metrics --------------------------------------------------------------------------


def model_versions(session: Session, project: str = DEFAULT_PROJECT, *, limit: int = 200) -> list[dict[str, Any]]:
    """The newest ``limit`` ready model versions, oldest first, each with its metrics and serving state.

    ``{"id", "round", "created_at", "label_counts": {granularity: n}, "metrics": {split: {name: value}},
    "backbone_start", "state"}``; ``backbone_start`` is which start its backbone had (None when not
    recorded); ``state`` is "serving" (its suggestions are the queue's), "candidate" (newer than the
    serving one: kept back by the trainer or rolled back) or "previous" (older than the serving one).
    """
    project_id = get_project(session, project).id
    versions = list(session.scalars(
        select(ModelVersion).where(ModelVersion.project_id == project_id, ModelVersion.status == "ready")
        .order_by(ModelVersion.id.desc()).limit(limit)
    ))[::-1]
    serving = serving_model_version(session, project)
    if serving is not None and versions and serving.id not in {v.id for v in versions}:
        versions.insert(0, serving)  # the serving version is always listed, however old
    metrics: dict[int, dict[str, dict[str, float]]] = {v.id: {} for v in versions}
    if versions:
        for version_id, split, name, value in session.execute(
            select(Metric.model_version_id, Metric.split, Metric.name, Metric.value).where(Metric.model_version_id.in_(list(metrics)))
        ):
            metrics[version_id].setdefault(split.value, {})[name] = value

    def state(v: ModelVersion) -> str:
        if serving is None or v.id == serving.id:
            return "serving"
        return "candidate" if v.id > serving.id else "previous"

    return [
        {"id": v.id, "round": v.round, "created_at": v.created_at, "label_counts": dict(v.label_counts or {}),
         "metrics": metrics[v.id], "backbone_start": (v.config or {}).get("backbone_start"), "state": state(v)}
        for v in versions
    ]


def serving_summary(session: Session, project: str = DEFAULT_PROJECT) -> dict[str, Any] | None:
    """The serving version and the candidates for the Overview and Metrics pages, or None before any
    ready version: ``{"serving": version dict, "candidates": [version dicts, newest first],
    "history": [serving changes, newest first]}`` (dicts as :func:`model_versions`; each candidate with
    ``"reason"``, the trainer's note when it kept the version back)."""
    versions = model_versions(session, project)
    serving = next((v for v in versions if v["state"] == "serving"), None)
    if serving is None:
        return None
    history = serving_history(session, project)
    reasons = {h["model_version_id"]: h["note"] for h in reversed(history) if h["action"] == "model_candidate"}
    candidates = [{**v, "reason": reasons.get(v["id"])} for v in reversed(versions) if v["state"] == "candidate"]
    return {"serving": serving, "candidates": candidates, "history": history}


def sweep_results(session: Session, project: str = DEFAULT_PROJECT) -> list[dict[str, Any]]:
    """Every sweep run: ``{"id", "method", "seed", "n_full", "n_weak", "n_unlabeled", "metrics", "created_at"}``."""
    project_id = get_project(session, project).id
    rows = session.scalars(select(SweepResult).where(SweepResult.project_id == project_id).order_by(SweepResult.id))
    return [
        {"id": r.id, "method": r.method, "seed": r.seed, "n_full": r.n_full, "n_weak": r.n_weak,
         "n_unlabeled": r.n_unlabeled, "metrics": dict(r.metrics or {}), "created_at": r.created_at}
        for r in rows
    ]



# =================================================================================================
# The pages' door: the store queries and commands the pages (app/views, app/main.py, app/widgets.py)
# run besides the ones above. Each function opens its own session (a read) or transaction (a write)
# from the page's sessionmaker: one UI event, one transaction. The re-exported names (``X as X``) are
# the store's vocabulary, limits, errors and folders the pages use, so a page imports db.service only.
# =================================================================================================

Sessions = sessionmaker[Session]


def take_image(sessions: Sessions, image_id: int, annotator: str, *, review: bool = False, actor: str | None = None) -> bool:
    """Lease the image to ``annotator`` (their own lease again: extended; a reader's lease when several
    read each image, unless ``review``: a reviewer's edit, :func:`db.readers.take_image`); False while
    someone else holds it. Raises ValueError when there is no image with that id, and
    :class:`~db.roles.PermissionDenied` when ``actor`` (the logged-in user; None: a system actor) may not
    (every command of this door takes ``actor`` so and passes it to the checked write)."""
    from db.readers import take_image as take  # db.readers builds on this module

    with sessions.begin() as session:
        return take(session, image_id, annotator, review=review, actor=actor)


def leave_image(sessions: Sessions, image_id: int, annotator: str, *, actor: str | None = None) -> None:
    """Give back whichever lease the annotator holds on the image (nothing when they hold none)."""
    from db.readers import release_image

    with sessions.begin() as session:
        release_image(session, image_id, annotator, actor=actor)


def next_image(sessions: Sessions, action: SuggestedAction | str, annotator: str, exclude: Collection[int] = (), *,
               actor: str | None = None) -> int | None:
    """Lease the top of the ``action`` queue to ``annotator`` (:func:`db.queue.claim_next`); None when it is empty."""
    with sessions.begin() as session:
        item = claim_next(session, action, annotator=annotator, exclude=exclude, actor=actor)
        return item.image_id if item is not None else None


def annotation_view(sessions: Sessions, image_id: int, annotator: str, *, review: bool = False) -> ImageDetail:
    """What the Annotate page edits (:func:`db.readers.annotation_detail`): the image's label, or with
    several readers the annotator's own read. Raises ValueError when there is no image with that id."""
    from db.readers import annotation_detail

    with sessions() as session:
        return annotation_detail(session, image_id, annotator=annotator, review=review)


def read_draft(sessions: Sessions, image_id: int, annotator: str) -> StoredDraft | None:
    """The annotator's unsaved draft of the image (:mod:`db.drafts`), or None."""
    with sessions() as session:
        return get_draft(session, image_id, annotator)


def write_draft(sessions: Sessions, image_id: int, annotator: str, payload: Mapping[str, Any], *, base_version: int,
                actor: str | None = None) -> None:
    """Store the annotator's draft of the image (replacing theirs), started from image ``base_version``."""
    with sessions.begin() as session:
        save_draft(session, image_id, annotator, payload, base_version=base_version, actor=actor)


def discard_draft(sessions: Sessions, image_id: int, annotator: str, *, actor: str | None = None) -> None:
    """Delete the annotator's draft of the image (nothing when there is none)."""
    with sessions.begin() as session:
        delete_draft(session, image_id, annotator, actor=actor)


def drafts_of(sessions: Sessions, annotator: str) -> list[tuple[int, datetime]]:
    """(image id, last change) of the annotator's drafts, newest first."""
    with sessions() as session:
        return list_drafts(session, annotator)


def save_from_draft(
    sessions: Sessions,
    image_id: int,
    *,
    present: Collection[str],
    absent: Collection[str],
    no_finding: bool,
    boxes: Sequence[BoxInput],
    complete: bool,
    annotator: str,
    expected_version: int,
    action: SuggestedAction | str,
    before: Granularity | str,
    seconds: float,
    review: bool = False,
    actor: str | None = None,
) -> str:
    """The Annotate page's Save, in one transaction: :func:`save_annotation`, the annotator's draft
    deleted and the save's ``seconds`` recorded; with several readers the save is the annotator's own
    read and with ``review`` a reviewer's edit of the image's label (:func:`db.readers.save_for`), (:func:`db.costs.record_save`, the upgrade from
    ``before``). Returns the image's new granularity. Raises what :func:`save_annotation` raises
    (ValueError, :class:`~db.lifecycle.ConflictError`), and then nothing of it is stored."""
    from db.readers import save_for  # several readers: the annotator's own read; a review: the image's label

    with sessions.begin() as session:
        granularity = save_for(session, image_id, present=present, absent=absent, no_finding=no_finding, boxes=boxes,
                               complete=complete, annotator=annotator, expected_version=expected_version, review=review,
                               actor=actor)
        delete_draft(session, image_id, annotator, actor=actor)
        record_save(session, image_id, annotator=annotator, action=action, before=before, seconds=seconds)
    return granularity


def promote(sessions: Sessions, model_version_id: int, *, annotator: str, actor: str | None = None) -> None:
    """Make the ready version serve (a promotion, or a rollback to an older one), audited with ``annotator``.
    Raises ValueError for a version that is not ready, not the project's or already serving."""
    with sessions.begin() as session:
        promote_model_version(session, model_version_id, annotator=annotator, actor=actor)


def stop_trainer_after_round(sessions: Sessions, *, annotator: str = "ui", actor: str | None = None) -> None:
    """Ask the trainer to stop once the round in progress is saved (an audit entry it polls)."""
    from db.workbench import request_stop  # imports torch (oxnet.active.loop): only when asked

    with sessions.begin() as session:
        request_stop(session, after_round=True, annotator=annotator, actor=actor)


def image_counts(sessions: Sessions, project: str = DEFAULT_PROJECT) -> dict[str, Any] | None:
    """The project's image counts by granularity and split (:func:`db.projects.stats`); None before the project exists."""
    with sessions() as session:
        return stats(session, project) if project_exists(session, project) else None


def trainer_status(sessions: Sessions, project: str = DEFAULT_PROJECT, *, now: datetime | None = None) -> dict[str, Any] | None:
    """The trainer's row as the Overview shows it, or None before a trainer ever ran: ``{"owner",
    "heartbeat_at", "round", "progress", "phase", "last_error", "alive", "seconds_ago"}``; ``alive``: a
    lock owner whose last heartbeat is younger than :data:`TRAINER_STALE_AFTER`; ``seconds_ago``: the
    heartbeat's age (None without one)."""
    now = now or utcnow()
    with sessions() as session:
        row = trainer_state(session, project)
        if row is None:
            return None
        age = now - row.heartbeat_at if row.heartbeat_at else None
        return {"owner": row.lock_owner, "heartbeat_at": row.heartbeat_at, "round": row.round, "progress": row.progress,
                "phase": row.phase, "last_error": row.last_error,
                "alive": bool(row.lock_owner and age is not None and age < TRAINER_STALE_AFTER),
                "seconds_ago": age.total_seconds() if age is not None else None}


def annotation_cost_rows(sessions: Sessions, project: str = DEFAULT_PROJECT) -> list[dict[str, Any]]:
    """Per upgrade its saves, median seconds and units (:func:`db.costs.cost_rows`)."""
    with sessions() as session:
        return cost_rows(session, project)


def model_files(url: str) -> tuple[Path, int]:
    """The folder of the store's model checkpoints and the bytes its files use (0 before any)."""
    folder = data_dir(url) / "models"
    return folder, folder_size(folder)


def unreadable(sessions: Sessions, project: str = DEFAULT_PROJECT) -> list[dict[str, Any]]:
    """:func:`unreadable_files` of the project in a session of its own."""
    with sessions() as session:
        return unreadable_files(session, project)
