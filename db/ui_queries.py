"""Queries and the one annotation save behind the Streamlit pages (``app/views``).

Pages only render; what they read and write goes through here. Each function takes a Session and the
caller owns the transaction. Results are plain dataclasses and dicts (safe to cache and to pickle).

Contracts with the trainer (issue 5), read here and documented in the README:

- metrics are :class:`~db.models.Metric` rows; :func:`oxnet.evaluation.evaluate`'s nested dicts are
  flattened as ``per_class_AP/<class>`` and ``image_auc/<class>``; training losses are ``loss/<name>``
  rows on the ``train`` split (one value per model version, the round's mean);
- an attention map of a prediction is ``Prediction.image_probs["attention"][<class>]``: a 2-D list of
  non-negative floats over the image (any grid size; it is stretched to the image).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import String, cast, exists, or_, select
from sqlalchemy.orm import Session, selectinload

from db.lifecycle import BoxInput, ConflictError, box_error, downgrade, mark_boxes_complete, set_boxes, set_image_labels
from db.models import (
    Annotator,
    FileStatus,
    Granularity,
    Image,
    ImageLabel,
    LabelClass,
    Lease,
    Metric,
    ModelVersion,
    Prediction,
    Project,
    Role,
    Split,
    SuggestedAction,
    Suggestion,
    SweepResult,
    utcnow,
)
from db.repository import (
    DEFAULT_PROJECT,
    class_names,
    get_annotator,
    get_project,
    serving_history,
    serving_model_version,
    take_lease,
)
from db.roles import check_actor

#: Metric name prefixes of the flattened per-class dicts of :func:`oxnet.evaluation.evaluate`.
PER_CLASS_AP_PREFIX = "per_class_AP/"
IMAGE_AUC_PREFIX = "image_auc/"
#: Prefix of the training-loss metrics (split ``train``) of a model version.
LOSS_PREFIX = "loss/"
#: Key of the attention maps inside ``Prediction.image_probs``.
ATTENTION_KEY = "attention"
#: Smallest box side (original image pixels) a save accepts: a click on the canvas is not a box.
MIN_BOX_PX = 4.0
#: Val metric of a model version giving the score at which its boxes become worth showing (the
#: Annotate page's threshold default); without it the page starts at :data:`DEFAULT_SCORE_THRESHOLD`.
SCORE_THRESHOLD_METRIC = "score_threshold"
DEFAULT_SCORE_THRESHOLD = 0.5


@dataclass(frozen=True)
class QueueItem:
    """One image of the annotation queue. ``score`` is None when no model has ranked the queue yet.

    ``strategy``, ``cost`` (units), ``gain`` (expected mAP, 0-1), ``gain_per_unit`` and
    ``gain_per_minute`` (None while the costs are not measured) come from the strategy that ranked the
    queue (:func:`oxnet.strategies.describe`); None where it made no estimate.
    """

    image_id: int
    path: str
    width: int
    height: int
    granularity: str
    split: str | None
    action: str
    score: float | None
    reason: str
    classes: tuple[str, ...] = ()
    strategy: str | None = None
    cost: float | None = None
    gain: float | None = None
    gain_per_unit: float | None = None
    gain_per_minute: float | None = None


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


# --- the queue -----------------------------------------------------------------------------------


def _free_for(annotator_id: int, now: datetime):
    """SQL condition: the image (outer-joined ``Lease``) is not leased to someone else right now."""
    return or_(Lease.image_id.is_(None), Lease.expires_at <= now, Lease.annotator_id == annotator_id)


def queue(
    session: Session,
    action: SuggestedAction | str,
    *,
    annotator: str,
    project: str = DEFAULT_PROJECT,
    class_name: str | None = None,
    split: Split | str | None = None,
    limit: int = 24,
    offset: int = 0,
    exclude: Collection[int] = (),
    now: datetime | None = None,
) -> list[QueueItem]:
    """Images waiting for ``action``, best first, skipping images leased to other annotators.

    With a serving model version (:func:`db.repository.serving_model_version`; a candidate does not
    serve): its suggestions by score (``class_name`` keeps suggestions whose reason
    names the class). Before any model: images below the action's target granularity in store order
    (``class_name`` keeps images labelled with the class), reason "no model yet". Images already at or
    past the action's target are never listed.
    """
    action = SuggestedAction(action)
    project_id = get_project(session, project).id
    who = get_annotator(session, annotator).id
    now = now or utcnow()
    below = [g for g in Granularity if g.rank < action.target.rank]
    version = serving_model_version(session, project)
    columns = (Image.id, Image.path, Image.width, Image.height, Image.granularity, Image.split)
    if version is not None:
        query = (
            select(*columns, Suggestion.score, Suggestion.reason)
            .join(Image, Image.id == Suggestion.image_id)
            .where(Suggestion.model_version_id == version.id, Suggestion.action == action)
            .order_by(Suggestion.score.desc(), Suggestion.id)
        )
        if class_name:
            query = query.where(cast(Suggestion.reason, String).like(f'%"{_like_escape(class_name)}"%', escape="\\"))
    else:
        query = select(*columns).where(Image.project_id == project_id).order_by(Image.id)
        if class_name:
            query = query.where(
                exists().where(
                    ImageLabel.image_id == Image.id, ImageLabel.present,
                    ImageLabel.class_id == LabelClass.id, LabelClass.name == class_name,
                )
            )
    query = query.outerjoin(Lease, Lease.image_id == Image.id).where(Image.granularity.in_(below), _free_for(who, now))
    if split:
        query = query.where(Image.split == Split(split))
    if exclude:
        query = query.where(Image.id.not_in(list(exclude)))
    items = []
    for row in session.execute(query.limit(limit).offset(offset)):
        score, reason = (row[6], row[7] or {}) if version is not None else (None, {"text": "no model yet: images in store order"})
        items.append(QueueItem(
            image_id=row.id, path=row.path, width=row.width, height=row.height, granularity=row.granularity.value,
            split=row.split.value if row.split else None, action=action.value, score=score,
            reason=str(reason.get("text", "")), classes=tuple(reason.get("classes") or ()),
            strategy=reason.get("strategy"), cost=_number(reason.get("cost")), gain=_number(reason.get("gain")),
            gain_per_unit=_number(reason.get("gain_per_unit")), gain_per_minute=_number(reason.get("gain_per_minute")),
        ))
    return items


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def claim_next_image(
    session: Session,
    action: SuggestedAction | str,
    *,
    annotator: str,
    project: str = DEFAULT_PROJECT,
    exclude: Collection[int] = (),
    class_name: str | None = None,
    split: Split | str | None = None,
    actor: str | None = None,
) -> int | None:
    """Lease the top of the queue (:func:`queue`) to ``annotator`` and return its image id (None: empty).
    ``actor``: the logged-in user (None: a system actor), checked as :func:`db.repository.take_lease` does."""
    check_actor(session, actor, Role.ANNOTATOR, action="take an image", annotator=annotator)
    for item in queue(session, action, annotator=annotator, project=project, class_name=class_name, split=split,
                      limit=20, exclude=exclude):
        if take_lease(session, item.image_id, annotator, actor=actor):
            return item.image_id
    return None


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
                                   Metric.name == SCORE_THRESHOLD_METRIC)
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

    Checks: every box has a known class and an extent inside the image of at least ``min_box`` pixels
    on each side, "No finding" goes with no finding and no box, no class is both present (ticked or
    boxed) and absent, something is labelled at all, and a ``complete`` (full) annotation has a box for
    every present finding.
    """
    problems = []
    known = set(classes)
    for k, (name, *coords) in enumerate(boxes, 1):
        if not name:
            problems.append(f"box {k} has no class: pick a class for it (or delete it)")
            continue
        if name not in known:
            problems.append(f"box {k}: unknown class {name!r}")
            continue
        reason = box_error(*coords, width, height)
        if reason:
            problems.append(f"box {k} ({name}): {reason}; draw it again")
            continue
        x1, y1, x2, y2 = (float(v) for v in coords)
        if min(x2 - x1, y2 - y1) < min_box:
            problems.append(f"box {k} ({name}) is {x2 - x1:.1f} x {y2 - y1:.1f} px, smaller than the minimum "
                            f"{min_box:g} px per side: drag to draw a box (a click is not a box)")
    unknown = sorted((set(present) | set(absent)) - known)
    if unknown:
        problems.append(f"unknown findings {unknown}")
    both = sorted(set(absent) & (set(present) | {b[0] for b in boxes}))
    if both:
        problems.append(f"{both} marked absent but present (ticked or boxed): choose one")
    if no_finding and (present or boxes):
        problems.append("'No finding' cannot go with ticked findings or boxes: untick one of them")
    if not (no_finding or present or boxes or absent):
        problems.append("nothing labelled: mark the findings you assessed (present or absent), or 'No finding'")
    unboxed = sorted(set(present) & known - {b[0] for b in boxes})
    if complete and unboxed:
        problems.append(f"'all lesions are boxed' but {unboxed} have no box: draw them, or untick 'all lesions are boxed'")
    return problems


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
    return image if image is not None else session.get(Image, image_id)


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

