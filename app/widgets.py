"""Small rendering helpers shared by the pages."""

from __future__ import annotations

from typing import Any

import streamlit as st


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
