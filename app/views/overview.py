"""Overview: image counts per granularity and split, the trainer, the latest model and its metrics."""

from __future__ import annotations

import os
from datetime import timedelta

import pandas as pd
import streamlit as st

from app.jobs import AUTO_DEMO_ENV, list_jobs, start_demo_job
from app.store import sessions, store_url
from app.trainer_control import TRAINER_SCRIPT, start_trainer, stop_trainer, trainer_available, trainer_pid
from app.widgets import show_job
from db.costs import MIN_SAVES, cost_rows
from db.models import Granularity, utcnow
from db.repository import TRAINER_STALE_AFTER, stats, trainer_state
from db.ui_queries import model_versions, project_exists

HEADLINE_METRICS = ("mAP", "AP40", "AP75", "mean_image_auc")


@st.cache_data(ttl=5, show_spinner=False)
def _counts(url: str) -> dict | None:
    with sessions()() as session:
        return stats(session) if project_exists(session) else None


@st.cache_data(ttl=30, show_spinner=False)
def _costs(url: str) -> list[dict]:
    with sessions()() as session:
        return cost_rows(session)


@st.cache_data(ttl=10, show_spinner=False)
def _latest_version(url: str) -> dict | None:
    with sessions()() as session:
        versions = model_versions(session, limit=1)
    return versions[-1] if versions else None


def _trainer_row(url: str) -> dict | None:
    with sessions()() as session:
        row = trainer_state(session)
        if row is None:
            return None
        return {"owner": row.lock_owner, "heartbeat_at": row.heartbeat_at, "round": row.round, "progress": row.progress,
                "phase": row.phase, "last_error": row.last_error}


st.title("Overview")
url = store_url()
counts = _counts(url)

if counts is None:
    st.info("The store is empty. The demo project (about 300 synthetic chest X-rays) is created in the background; "
            "or import your own images on the **Data** page.")

    @st.fragment(run_every=timedelta(seconds=1))
    def _seeding() -> None:
        jobs = list_jobs(url, "seed", limit=1)
        if not jobs:
            if os.environ.get(AUTO_DEMO_ENV, "1") == "0" and st.button("Create the demo project", key="overview_seed", type="primary"):
                start_demo_job(url)
                st.rerun()
            return
        show_job(jobs[0], "Demo project")
        if jobs[0]["status"] == "done":
            _counts.clear()
            st.rerun()

    _seeding()
    st.stop()

total = counts["total"]
cols = st.columns(4)
cols[0].metric("Images", f"{total:,}")
for col, granularity in zip(cols[1:], (Granularity.FULL, Granularity.WEAK, Granularity.UNLABELED), strict=True):
    n = counts["granularity"][granularity.value]
    col.metric(granularity.value.capitalize(), f"{n:,}", help=f"{n / total:.1%} of the images" if total else None)
table = pd.DataFrame(counts["split"]).T.reindex(columns=[g.value for g in Granularity]).fillna(0).astype(int)
table["total"] = table.sum(axis=1)
st.dataframe(table, width="content")

st.subheader("Trainer")


@st.fragment(run_every=timedelta(seconds=3))
def _trainer_panel() -> None:
    row = _trainer_row(url)
    now = utcnow()
    alive = bool(row and row["owner"] and row["heartbeat_at"] and now - row["heartbeat_at"] < TRAINER_STALE_AFTER)
    if row is None or not row["owner"]:
        st.markdown("Not running.")
    elif alive:
        st.markdown(f"**Running** (`{row['owner']}`), round {row['round']}, {row['phase'] or 'starting'}; "
                    f"last heartbeat {int((now - row['heartbeat_at']).total_seconds())} s ago.")
        st.progress(min(1.0, max(0.0, float(row["progress"] or 0.0))), text=f"round {row['round']}: {row['phase'] or ''}")
    else:
        st.warning(f"**Stale**: `{row['owner']}` holds the lock but its last heartbeat was at {row['heartbeat_at']} UTC "
                   f"(more than {int(TRAINER_STALE_AFTER.total_seconds() // 60)} min ago). It probably died; start a new one.")
    if row and row["last_error"]:
        st.error(f"Last error: {row['last_error']}")
    left, right = st.columns(2)
    if not trainer_available():
        left.button("Start trainer", disabled=True, key="overview_start_missing")
        st.caption(f"The trainer script `{TRAINER_SCRIPT.relative_to(TRAINER_SCRIPT.parents[1])}` is missing from this "
                   "checkout, so the trainer cannot be started yet.")
    elif left.button("Start trainer", disabled=alive, key="overview_start", type="primary",
                     help="cpu preset, or paper when a GPU is present"):
        try:
            st.toast(f"Trainer started (pid {start_trainer(url)}).")
        except (OSError, FileNotFoundError) as e:
            st.error(f"Could not start the trainer: {e}")
    owner = row["owner"] if row else None
    if right.button("Stop trainer", disabled=trainer_pid(owner, url) is None, key="overview_stop"):
        pid = stop_trainer(owner, url)
        st.toast(f"Sent SIGTERM to the trainer (pid {pid})." if pid else "No trainer process found on this machine.")


_trainer_panel()

st.subheader("Latest model")
latest = _latest_version(url)
if latest is None:
    st.info("No model version yet: start the trainer; its first round adds one.")
else:
    counts_seen = latest["label_counts"]
    st.markdown(f"Version **{latest['id']}** (round {latest['round']}, {latest['created_at']:%Y-%m-%d %H:%M} UTC), trained on "
                + ", ".join(f"{counts_seen.get(g.value, 0):,} {g.value}" for g in Granularity) + " training images.")
    val = latest["metrics"].get("val", {})
    cols = st.columns(len(HEADLINE_METRICS))
    for col, name in zip(cols, HEADLINE_METRICS, strict=True):
        col.metric(f"{name} (val)", f"{val[name]:.3g}" if name in val else "-")

st.subheader("Annotation cost")
st.caption(f"Active seconds per save, from the Annotate page. The suggestions price each upgrade with the medians "
           f"once image-level labels and that upgrade have {MIN_SAVES} saves each (units: the labels' median); "
           "until then 1 unit for labels and 5 for boxes.")
st.dataframe(pd.DataFrame(_costs(url)), width="content", hide_index=True)
