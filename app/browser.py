"""Two tiny in-page helpers (Streamlit components v2, no iframe) the Annotate page needs from the browser.

- :func:`column_room`: the pixel width of the column it sits in and the height left below it in the
  window, so the canvas can be sized to fit (Python cannot know the layout). None until the browser
  has reported them (one extra rerun).
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
  const scroller = document.querySelector('[data-testid="stMain"]');
  let lastWidth = 0, lastRoom = 0;
  const report = () => {
    const width = Math.floor(column.getBoundingClientRect().width);
    const top = host.getBoundingClientRect().top + (scroller ? scroller.scrollTop : window.scrollY);
    const room = Math.floor(window.innerHeight - top);
    if (width > 0 && Math.abs(width - lastWidth) >= 8) { lastWidth = width; setStateValue("width", width); }
    if (Math.abs(room - lastRoom) >= 8) { lastRoom = room; setStateValue("room", room); }
  };
  const later = () => requestAnimationFrame(report);
  const observer = new ResizeObserver(later);
  observer.observe(column);
  window.addEventListener("resize", later);
  const timer = setTimeout(report, 50);
  return () => { observer.disconnect(); window.removeEventListener("resize", later); clearTimeout(timer); };
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


def column_room(key: str) -> tuple[int | None, int | None]:
    """(width of the enclosing column, height from this element to the bottom of the window), in CSS px,
    as the browser last reported them; None before it did."""
    result = _width(key=key, default={"width": None, "room": None}, on_width_change=lambda: None,
                    on_room_change=lambda: None, width="stretch", height="content")
    values = [result.get(name) if hasattr(result, "get") else None for name in ("width", "room")]
    width, room = (int(v) if isinstance(v, (int, float)) and v > 0 else None for v in values)
    return width, room


def leave_guard(active: bool, key: str) -> None:
    """Ask before the browser leaves the page (reload, close) while ``active``."""
    _guard(key=key, data={"active": bool(active)}, width="content", height="content")
