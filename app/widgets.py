"""Small rendering helpers shared by the pages."""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import streamlit as st
from PIL import Image, ImageDraw
from oxnet.vocabulary import MAP

_MARKDOWN_SPECIAL = str.maketrans({c: "\\" + c for c in string.punctuation})


def plain(text: object) -> str:
    """``text`` for a markdown string, shown as typed: every ASCII punctuation character backslash-escaped
    (CommonMark), so a name like ``[x](http://...)`` or ``![](...)`` shows as text, never a link or image."""
    return " ".join(str(text).split()).translate(_MARKDOWN_SPECIAL)


def require_project_and_name(has_project: bool, who: str | None, *, why: str) -> str:
    """The annotator's name; the page stops with a message while the store has no project or the user
    is not logged in (``why``: what the login is for, as the message says it)."""
    if not has_project:
        st.info("The store has no project yet: see **Overview**.")
        st.stop()
    if not who:
        st.warning(f"Log in first: {why}.")
        st.stop()
    return who


def show_job(job: dict[str, Any], title: str) -> None:
    """A background job's progress bar, or its result or error once it ended."""
    state, done, total = job.get("status"), int(job.get("done") or 0), int(job.get("total") or 0)
    if state == "running":
        fraction = done / total if total else 0.0
        st.progress(min(1.0, fraction), text=f"{title}: {job.get('message', '')} ({done}/{total})" if total else f"{title}: {job.get('message', '')}")
    elif state == "done":
        result = job.get("result") or {}
        st.success(f"{title}: done. {str(result.get('summary', '')).splitlines()[0] if result.get('summary') else ''}")
    else:
        st.error(f"{title} failed: {job.get('message', 'unknown error')}")


@st.cache_resource(show_spinner=False)
def page_icon() -> Image.Image:
    """The favicon, drawn here: a named icon (``":material/...:"``) is fetched by the browser from an
    outside font server, and a tool for patient data makes no outside requests."""
    icon = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    draw = ImageDraw.Draw(icon)
    draw.rounded_rectangle((2, 2, 61, 61), radius=12, fill=(31, 111, 235, 255))  # the theme's primary colour
    for left in (12, 35):  # two lung fields
        draw.ellipse((left, 12, left + 17, 52), fill=(235, 242, 255, 255))
    draw.rectangle((30, 10, 33, 40), fill=(235, 242, 255, 255))  # the trachea
    return icon


def _mAP(version: dict[str, Any]) -> str:
    value = version["metrics"].get("val", {}).get(MAP)
    return f"{value:.3f}" if value is not None else "-"


def promote_button(version_id: int, label: str, *, key: str, on_done: Callable[[], None] | None = None) -> None:
    """A button that makes ``version_id`` the serving model version (a promotion or a rollback), audited
    with the logged-in user; only an admin sees it (the promotion checks the role again)."""
    from app.store import annotator, may, sessions
    from db.service import promote

    who = annotator()
    if who is None or not may("admin"):
        st.caption("An admin can promote this version.")
        return
    if st.button(label, key=key, help="Recorded in the audit log with your name."):
        try:
            promote(sessions(), version_id, annotator=who, actor=who)
        except (ValueError, PermissionError) as e:
            st.error(f"Version {version_id} was not promoted: {e}")
            return
        if on_done is not None:
            on_done()
        st.toast(f"Model version {version_id} now serves suggestions.")
        st.rerun()


def candidate_notices(summary: dict[str, Any], *, key: str, on_done: Callable[[], None] | None = None) -> None:
    """One warning per candidate version (newer than the serving one, not serving), with both val mAPs,
    the trainer's reason and a promote button."""
    serving = summary["serving"]
    for candidate in summary["candidates"]:
        st.warning(f"Version **{candidate['id']}** (round {candidate['round']}) is a **candidate**, not serving: "
                   f"val mAP {_mAP(candidate)} against {_mAP(serving)} of the serving version {serving['id']}.")
        if candidate.get("reason"):
            st.caption(f"Trainer's decision: {candidate['reason']}.")
        promote_button(candidate["id"], f"Promote version {candidate['id']}", key=f"{key}_promote_{candidate['id']}",
                       on_done=on_done)
