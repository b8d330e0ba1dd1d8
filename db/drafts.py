"""Drafts: an annotator's unsaved work on one image, kept in the store (table ``draft``).

The Annotate page writes the draft on every change and restores it when the same annotator opens the
image again (after a page change, a browser reload or a server restart); a save or an explicit discard
deletes it. A draft is a JSON payload (see :func:`check_payload`) plus the image version it started
from. Each function takes a Session; the caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import delete, select
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from db.models import Annotator, Draft, Image, Role, utcnow
from db.people import get_annotator
from db.roles import check_actor

#: The states of one image-level finding in a draft (and on the page).
PRESENT, ABSENT, NOT_ASSESSED = "present", "absent", "not assessed"
FINDING_STATES = (PRESENT, ABSENT, NOT_ASSESSED)
#: Keys of a draft payload.
PAYLOAD_KEYS = ("findings", "no_finding", "complete", "boxes", "task")


@dataclass(frozen=True)
class StoredDraft:
    """A draft as read back: ``payload`` (checked), the image version it started from, when it was written."""

    image_id: int
    payload: dict[str, Any]
    base_version: int
    updated_at: datetime


def check_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` as a plain JSON dict, or ValueError naming the bad field.

    ``findings``: {class: "present" | "absent" | "not assessed"}; ``no_finding``, ``complete``: bool;
    ``boxes``: [[class, x1, y1, x2, y2], ...] in original pixels; ``task``: str.
    """
    missing = [k for k in PAYLOAD_KEYS if k not in payload]
    if missing:
        raise ValueError(f"draft payload lacks {missing}")
    findings = payload["findings"]
    if not isinstance(findings, Mapping) or any(v not in FINDING_STATES for v in findings.values()):
        raise ValueError(f"draft field 'findings' must map class names to one of {FINDING_STATES}, got {findings!r}")
    boxes = []
    for k, box in enumerate(payload["boxes"]):
        try:
            name, x1, y1, x2, y2 = box
            boxes.append([str(name), float(x1), float(y1), float(x2), float(y2)])
        except (TypeError, ValueError):
            raise ValueError(f"draft field 'boxes'[{k}] must be [class, x1, y1, x2, y2], got {box!r}") from None
    for key in ("no_finding", "complete"):
        if not isinstance(payload[key], bool):
            raise ValueError(f"draft field {key!r} must be true or false, got {payload[key]!r}")
    return {"findings": {str(k): v for k, v in findings.items()}, "no_finding": payload["no_finding"],
            "complete": payload["complete"], "boxes": boxes, "task": str(payload["task"])}


def _annotator_id(session: Session, annotator: str) -> int | None:
    return session.execute(select(Annotator.id).where(Annotator.name == annotator)).scalar()


def save_draft(
    session: Session, image_id: int, annotator: str, payload: Mapping[str, Any], *, base_version: int, actor: str | None = None
) -> None:
    """Write (insert or replace) ``annotator``'s draft of the image. ValueError for a bad payload or image;
    :class:`~db.roles.PermissionDenied` when ``actor`` (the logged-in user; None: a system actor) may not
    annotate or is not ``annotator``."""
    check_actor(session, actor, Role.ANNOTATOR, action="keep drafts", annotator=annotator)
    checked = check_payload(payload)
    if session.get(Image, image_id) is None:
        raise ValueError(f"no image with id {image_id}")
    who = get_annotator(session, annotator)
    draft = session.scalars(select(Draft).where(Draft.annotator_id == who.id, Draft.image_id == image_id)).one_or_none()
    if draft is None:
        session.add(Draft(annotator_id=who.id, image_id=image_id, base_version=base_version, payload=checked, updated_at=utcnow()))
    else:
        draft.payload, draft.base_version, draft.updated_at = checked, base_version, utcnow()
    session.flush()


def get_draft(session: Session, image_id: int, annotator: str) -> StoredDraft | None:
    """``annotator``'s draft of the image, or None. A stored payload that no longer checks is None too."""
    who = _annotator_id(session, annotator)
    if who is None:
        return None
    draft = session.scalars(select(Draft).where(Draft.annotator_id == who, Draft.image_id == image_id)).one_or_none()
    if draft is None:
        return None
    try:
        payload = check_payload(draft.payload)
    except (ValueError, TypeError, AttributeError):
        return None
    return StoredDraft(image_id=image_id, payload=payload, base_version=draft.base_version, updated_at=draft.updated_at)


def delete_draft(session: Session, image_id: int, annotator: str, *, actor: str | None = None) -> bool:
    """Drop ``annotator``'s draft of the image; True when there was one (``actor`` as :func:`save_draft`)."""
    check_actor(session, actor, Role.ANNOTATOR, action="discard drafts", annotator=annotator)
    who = _annotator_id(session, annotator)
    if who is None:
        return False
    return bool(cast(CursorResult[Any], session.execute(delete(Draft).where(Draft.annotator_id == who, Draft.image_id == image_id))).rowcount)


def list_drafts(session: Session, annotator: str, *, limit: int = 20) -> list[tuple[int, datetime]]:
    """(image id, updated_at) of ``annotator``'s drafts, newest first."""
    who = _annotator_id(session, annotator)
    if who is None:
        return []
    rows = session.execute(
        select(Draft.image_id, Draft.updated_at).where(Draft.annotator_id == who).order_by(Draft.updated_at.desc()).limit(limit)
    )
    return [(image_id, at) for image_id, at in rows]
