"""The store's schema (SQLAlchemy 2.0 declarative models).

Images are referenced in place (path + SHA-256), each with one derived, indexed granularity
(``unlabeled -> weak -> full``) and a version counter that detects concurrent edits. Labels, boxes and
the append-only audit log hang off the image; model versions own their metrics, predictions, scores and
suggestions. Box coordinates are (x1, y1, x2, y2) in ORIGINAL pixels of the referenced file.

Changing anything here needs a new migration in ``db/migrations/versions`` (``alembic revision
--autogenerate`` against a store at head); ``tests/test_db_schema.py`` checks they agree.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from oxnet import vocabulary


def utcnow() -> datetime:
    """Naive UTC now: the store keeps every timestamp as naive UTC (SQLite has no time zones)."""
    return datetime.now(UTC).replace(tzinfo=None)


class Granularity(enum.StrEnum):
    """How much is known about an image, from least to most."""

    UNLABELED = vocabulary.UNLABELED
    WEAK = vocabulary.WEAK
    FULL = vocabulary.FULL

    @property
    def rank(self) -> int:
        """0 for unlabeled, 1 for weak, 2 for full."""
        return _GRANULARITY_RANK[self]


_GRANULARITY_RANK = {Granularity.UNLABELED: 0, Granularity.WEAK: 1, Granularity.FULL: 2}


class SuggestedAction(enum.StrEnum):
    """The upgrade a suggestion asks an annotator for."""

    ADD_LABELS = vocabulary.ADD_LABELS
    DRAW_BOXES = vocabulary.DRAW_BOXES

    @property
    def target(self) -> Granularity:
        """The granularity the image has once the action is done."""
        return Granularity.WEAK if self is SuggestedAction.ADD_LABELS else Granularity.FULL


class Split(enum.StrEnum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class FileStatus(enum.StrEnum):
    """Whether the referenced file was read successfully (NIH imports defer the check)."""

    OK = "ok"
    UNCHECKED = "unchecked"
    MISSING = "missing"
    CORRUPT = "corrupt"


class ModelStatus(enum.StrEnum):
    TRAINING = "training"
    READY = "ready"
    FAILED = "failed"


def _str_enum(cls: type[enum.StrEnum], name: str) -> Enum:
    """A portable (VARCHAR + CHECK) column type storing the enum's values."""
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=max(len(m.value) for m in cls),
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Project(Base):
    """A set of images with one class vocabulary."""

    __tablename__ = "project"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    #: How many different annotators read each image blind (1: today's single reader; see :mod:`db.readers`).
    readers_per_image: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    classes: Mapped[list[LabelClass]] = relationship(
        back_populates="project", order_by="LabelClass.ordinal", cascade="all, delete-orphan"
    )


class LabelClass(Base):
    """A finding class of a project; ``ordinal`` (1-based) is its COCO ``category_id`` on export."""

    __tablename__ = "label_class"
    __table_args__ = (
        UniqueConstraint("project_id", "name"),
        UniqueConstraint("project_id", "ordinal"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    ordinal: Mapped[int] = mapped_column(Integer)

    project: Mapped[Project] = relationship(back_populates="classes")


class Annotator(Base):
    """Who made a change: a person, an importer (``import:nih``) or a dataset reader (``vindr:R8``)."""

    __tablename__ = "annotator"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default="human")


class Role(enum.StrEnum):
    """What an account may do; each role may do everything the roles before it may (:attr:`rank`)."""

    ANNOTATOR = "annotator"
    REVIEWER = "reviewer"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """0 annotator, 1 reviewer, 2 admin."""
        return list(Role).index(self)


class UserAccount(Base):
    """A person who logs in (:mod:`db.accounts`): name, role, argon2 password hash, active flag.

    ``annotator_id`` links the account to the :class:`Annotator` row of the same name, so every label,
    box, lease, draft and audit entry the person makes carries it. The password is only ever stored as
    its argon2 hash (``$argon2id$...``); ``must_change_password`` holds a one-time password until the
    person replaces it.
    """

    __tablename__ = "user_account"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[Role] = mapped_column(_str_enum(Role, "role"))
    password_hash: Mapped[str] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotator.id"), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime)

    annotator: Mapped[Annotator] = relationship(lazy="joined")


class UserSession(Base):
    """A logged-in browser session: the SHA-256 of its random token (never the token), whose it is and
    until when it holds. A revoked (logout, deactivation, password reset) or expired session logs nobody in."""

    __tablename__ = "user_session"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class LoginAttempt(Base):
    """One login attempt, for throttling: ``key`` is the SHA-256 of the tried name or of the client
    address (never the name or address in clear, never the password)."""

    __tablename__ = "login_attempt"
    __table_args__ = (Index(None, "key", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    success: Mapped[bool] = mapped_column(Boolean, default=False)


class Image(Base):
    """One image file, referenced in place, with its derived granularity.

    ``granularity`` is derived from ``boxes_complete``, ``no_finding`` and the image's labels and boxes
    (:func:`db.lifecycle.derive_granularity`); it is stored so queue and overview queries use an index.
    ``version`` grows with every annotation edit; a save based on an older version is a conflict.
    """

    __tablename__ = "image"
    __table_args__ = (
        UniqueConstraint("project_id", "path"),
        UniqueConstraint("project_id", "sha256"),
        Index(None, "project_id", "granularity", "split"),
        Index(None, "project_id", "patient_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bit_depth: Mapped[int | None] = mapped_column(Integer)
    photometric: Mapped[str | None] = mapped_column(String(16))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    view: Mapped[str | None] = mapped_column(String(16))
    split: Mapped[Split | None] = mapped_column(_str_enum(Split, "split"))
    source: Mapped[str] = mapped_column(String(64))
    file_status: Mapped[FileStatus] = mapped_column(_str_enum(FileStatus, "file_status"), default=FileStatus.OK)
    file_error: Mapped[str | None] = mapped_column(Text)
    no_finding: Mapped[bool] = mapped_column(Boolean, default=False)
    boxes_complete: Mapped[bool] = mapped_column(Boolean, default=False)
    granularity: Mapped[Granularity] = mapped_column(
        _str_enum(Granularity, "granularity"), default=Granularity.UNLABELED
    )
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    labels: Mapped[list[ImageLabel]] = relationship(cascade="all, delete-orphan", passive_deletes=True)
    boxes: Mapped[list[Box]] = relationship(cascade="all, delete-orphan", passive_deletes=True)

    __mapper_args__ = {"version_id_col": version}


class ImageLabel(Base):
    """An image-level finding: ``present`` True or False for one class (no row = not known)."""

    __tablename__ = "image_label"

    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), primary_key=True)
    class_id: Mapped[int] = mapped_column(ForeignKey("label_class.id", ondelete="CASCADE"), primary_key=True)
    present: Mapped[bool] = mapped_column(Boolean)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotator.id"))

    label_class: Mapped[LabelClass] = relationship(lazy="joined")
    annotator: Mapped[Annotator] = relationship(lazy="joined")


class Box(Base):
    """A lesion box: (x1, y1, x2, y2) in original pixels of the image file, 0 <= x1 < x2 <= width."""

    __tablename__ = "box"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), index=True)
    class_id: Mapped[int] = mapped_column(ForeignKey("label_class.id", ondelete="CASCADE"))
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotator.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    label_class: Mapped[LabelClass] = relationship(lazy="joined")
    annotator: Mapped[Annotator] = relationship(lazy="joined")


class DicomInstance(Base):
    """Where an image came from in a DICOM archive (DICOMweb import) and the header fields display needs.

    Only UIDs and technical attributes are kept: no names, dates of birth, accession numbers or other
    identifying text (the patient id is on the image, pseudonymised). ``archive`` is the DICOMweb URL
    without credentials. The window is the header's first WindowCenter/WindowWidth (None when absent).
    """

    __tablename__ = "dicom_instance"

    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    transfer_syntax: Mapped[str | None] = mapped_column(String(64))
    window_center: Mapped[float | None] = mapped_column(Float)
    window_width: Mapped[float | None] = mapped_column(Float)
    archive: Mapped[str | None] = mapped_column(String(1024))


class AuditEntry(Base):
    """One change, append-only (SQLite triggers refuse UPDATE and DELETE).

    ``before`` and ``after`` are annotation states of the image (:func:`db.lifecycle.image_state`);
    entries without an image (splits, model versions) carry what changed in ``after``.
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotator.id"))
    image_id: Mapped[int | None] = mapped_column(ForeignKey("image.id"), index=True)
    action: Mapped[str] = mapped_column(String(32))
    note: Mapped[str | None] = mapped_column(Text)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    annotator: Mapped[Annotator] = relationship(lazy="joined")


class Lease(Base):
    """An image handed to one annotator until ``expires_at``; the queue skips it for everyone else."""

    __tablename__ = "lease"

    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotator.id"))
    taken_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class Draft(Base):
    """Unsaved Annotate work of one annotator on one image, kept so a page change, reload or restart loses nothing.

    ``payload`` is the page's draft (findings, boxes in original pixels, task, complete flag; see
    :mod:`db.drafts`); ``base_version`` is the image version it was started from (a newer image version
    means someone else saved in between). Deleted when the annotator saves or discards.
    """

    __tablename__ = "draft"
    __table_args__ = (UniqueConstraint("annotator_id", "image_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotator.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), index=True)
    base_version: Mapped[int] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Reading(Base):
    """One reader's own, blind read of an image in a project with several readers per image (:mod:`db.readers`).

    ``labels``: {class: present} for the classes the reader assessed; ``boxes``: [[class, x1, y1, x2,
    y2], ...] in original pixels; ``complete``: the reader boxed every lesion. ``revision`` grows with
    each save of the same read (the version the reader's Annotate page checks).
    """

    __tablename__ = "reading"
    __table_args__ = (UniqueConstraint("image_id", "annotator_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotator.id"))
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    no_finding: Mapped[bool] = mapped_column(Boolean, default=False)
    complete: Mapped[bool] = mapped_column(Boolean, default=False)
    boxes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    saved_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    annotator: Mapped[Annotator] = relationship(lazy="joined")


class ReaderLease(Base):
    """An image handed to one of its several readers until ``expires_at`` (one row per reader: up to
    ``readers_per_image`` annotators hold it at once). Projects with one reader use :class:`Lease`."""

    __tablename__ = "reader_lease"

    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotator.id"), primary_key=True)
    taken_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class ImageReview(Base):
    """Where a multi-reader image stands: ``status`` "consensus" (the readers' consensus is its label,
    not reviewed) or "reviewed" (a reviewer's result is); ``disagree``: the readers disagreed (the
    review queue puts it first); ``sources``: the reads (ids, readers) the label came from."""

    __tablename__ = "image_review"
    __table_args__ = (Index(None, "status", "disagree"),)

    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    disagree: Mapped[bool] = mapped_column(Boolean, default=False)
    reviewer_id: Mapped[int | None] = mapped_column(ForeignKey("annotator.id"))
    sources: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ModelVersion(Base):
    """One trained model: its config, the label mix it saw and where its checkpoint is."""

    __tablename__ = "model_version"
    __table_args__ = (Index(None, "project_id", "status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"))
    round: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[ModelStatus] = mapped_column(_str_enum(ModelStatus, "model_status"), default=ModelStatus.TRAINING)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Training images per granularity when the round started, e.g. {"full": 120, "weak": 900, "unlabeled": 40}.
    label_counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    checkpoint_path: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ServingModel(Base):
    """Which ready model version of a project serves suggestions and the Annotate page's model boxes.

    One row per project, changed only by :func:`db.versions.promote_model_version` (a user's promote
    or rollback) and by the trainer's serve-or-candidate decision, each with an audit entry. A ready
    version newer than the serving one is a candidate. No row (a store whose versions were made without
    the trainer): the newest ready version serves (:func:`db.versions.serving_model_version`).
    """

    __tablename__ = "serving_model"

    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id", ondelete="CASCADE"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotator.id"))
    since: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Metric(Base):
    """A named evaluation number (mAP, AP40, AUC ...) of a model version on a split."""

    __tablename__ = "metric"
    __table_args__ = (UniqueConstraint("model_version_id", "split", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id", ondelete="CASCADE"))
    split: Mapped[Split] = mapped_column(_str_enum(Split, "split"))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)


class Prediction(Base):
    """A model version's output on an image.

    ``boxes``: list of ``{"class": name, "bbox": [x1, y1, x2, y2] (original pixels), "score": float}``;
    ``image_probs``: ``{class name: probability}`` from the image-level head.
    """

    __tablename__ = "prediction"
    __table_args__ = (UniqueConstraint("model_version_id", "image_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), index=True)
    boxes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    image_probs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Score(Base):
    """An image's informativeness under a model version (teacher-student disagreement) and its parts."""

    __tablename__ = "score"

    model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_version.id", ondelete="CASCADE"), primary_key=True
    )
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Suggestion(Base):
    """"Do ``action`` on this image" under a model version, ranked by ``score``, with the reason."""

    __tablename__ = "suggestion"
    __table_args__ = (
        UniqueConstraint("model_version_id", "image_id", "action"),
        Index(None, "model_version_id", "action", "score"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), index=True)
    action: Mapped[SuggestedAction] = mapped_column(_str_enum(SuggestedAction, "suggested_action"))
    score: Mapped[float] = mapped_column(Float)
    #: e.g. {"text": "teacher and student disagree on Nodule", "classes": ["Nodule"]}
    reason: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AnnotationTime(Base):
    """The active seconds of one annotation save: who upgraded which image how (``upgrade`` is
    "unlabeled->weak", "weak->full", "unlabeled->full", or "edit" when the granularity did not rise)."""

    __tablename__ = "annotation_time"
    __table_args__ = (Index(None, "project_id", "upgrade"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotator.id"))
    action: Mapped[str] = mapped_column(String(32))
    upgrade: Mapped[str] = mapped_column(String(32))
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class SweepResult(Base):
    """One run of the granularity sweep (the paper's Table 2): the label mix and its metrics."""

    __tablename__ = "sweep_result"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer, default=0)
    n_full: Mapped[int] = mapped_column(Integer)
    n_weak: Mapped[int] = mapped_column(Integer)
    n_unlabeled: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class TrainerState(Base):
    """The background trainer of a project: who holds the lock, when it last beat, where it is."""

    __tablename__ = "trainer_state"

    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), primary_key=True)
    lock_owner: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    round: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    phase: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
