"""Who writes: the one normal form of an annotator's name, annotator rows, and audit entries that
concern no single image. Each function takes a Session; the caller owns the transaction."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.engine import insert_ignore
from db.models import Annotator, AuditEntry


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


def get_annotator(session: Session, name: str, kind: str = "human") -> Annotator:
    """The annotator called ``name`` (normalised by :func:`annotator_name`), created on first use."""
    name = annotator_name(name, person=False)
    insert_ignore(session, Annotator.__table__, {"name": name, "kind": kind}, ["name"])
    return session.scalars(select(Annotator).where(Annotator.name == name)).one()


def log_event(session: Session, annotator: str, action: str, after: Mapping[str, Any], note: str | None = None) -> None:
    """Append an audit entry that concerns no single image (split assignment, imports ...)."""
    session.add(AuditEntry(annotator=get_annotator(session, annotator, "system"), action=action, after=dict(after), note=note))
