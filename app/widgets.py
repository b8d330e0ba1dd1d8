"""Small rendering helpers shared by the pages."""

from __future__ import annotations

import string
from typing import Any

import streamlit as st

_MARKDOWN_SPECIAL = str.maketrans({c: "\\" + c for c in string.punctuation})


def plain(text: object) -> str:
    """``text`` for a markdown string, shown as typed: every ASCII punctuation character backslash-escaped
    (CommonMark), so a name like ``[x](http://...)`` or ``![](...)`` shows as text, never a link or image."""
    return " ".join(str(text).split()).translate(_MARKDOWN_SPECIAL)


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
