"""Two tiny in-page helpers (Streamlit components v2, no iframe) the Annotate page needs from the browser.

- :func:`column_width`: the pixel width of the column it sits in, so the canvas can be sized to fit
  (Python cannot know the layout). None until the browser has reported it (one extra rerun).
- :func:`leave_guard`: while ``active``, the browser asks "leave page?" before a reload or closing the
  tab (``beforeunload``). Navigating between the app's pages is not an unload; the draft is in the
  store anyway.
"""

from __future__ import annotations

import streamlit as st

_WIDTH_JS = """
export default function({ parentElement, setStateValue }) {
  const host = parentElement.host || parentElement;
  const column = host.closest('[data-testid="stColumn"]') || host.closest('[data-testid="stVerticalBlock"]') || document.body;
  let last = 0;
  const report = () => {
    const width = Math.floor(column.getBoundingClientRect().width);
    if (width > 0 && Math.abs(width - last) >= 8) { last = width; setStateValue("width", width); }
  };
  const observer = new ResizeObserver(() => requestAnimationFrame(report));
  observer.observe(column);
  const timer = setTimeout(report, 50);
  return () => { observer.disconnect(); clearTimeout(timer); };
}
"""

_GUARD_JS = """
export default function({ data }) {
  if (!window.__oxnetLeaveGuard) {
    window.__oxnetLeaveGuard = { active: false };
    window.addEventListener("beforeunload", (event) => {
      if (window.__oxnetLeaveGuard.active) { event.preventDefault(); event.returnValue = ""; }
    });
  }
  window.__oxnetLeaveGuard.active = Boolean(data && data.active);
  return () => { window.__oxnetLeaveGuard.active = false; };
}
"""

_width = st.components.v2.component("oxnet.column_width", js=_WIDTH_JS, html="<div></div>")
_guard = st.components.v2.component("oxnet.leave_guard", js=_GUARD_JS, html="<div></div>")


def column_width(key: str) -> int | None:
    """The width (CSS px) of the enclosing column, as the browser last reported it, or None before it did."""
    result = _width(key=key, default={"width": None}, on_width_change=lambda: None, width="stretch", height="content")
    value = result.get("width") if hasattr(result, "get") else None
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def leave_guard(active: bool, key: str) -> None:
    """Ask before the browser leaves the page (reload, close) while ``active``."""
    _guard(key=key, data={"active": bool(active)}, width="content", height="content")
