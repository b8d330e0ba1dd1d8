"""Small rendering helpers shared by the pages."""

from __future__ import annotations

from typing import Any

import streamlit as st
from PIL import Image, ImageDraw


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
