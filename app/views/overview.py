"""Overview: image counts per granularity and split, the trainer, the serving model and its metrics, and
candidate versions kept back by the trainer (with a promote button)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pandas as pd
import streamlit as st

from app.jobs import AUTO_DEMO_ENV, list_jobs, start_demo_job
from app.store import annotator, may, sessions, store_url
from app.trainer_control import start_trainer, stop_trainer, trainer_pid
from app.widgets import candidate_notices, show_job
from db.service import (
    DEFAULT_KEEP_READY,
    MIN_SAVES,
    TRAINER_STALE_AFTER,
    Granularity,
    annotation_cost_rows,
    image_counts,
    model_files,
    serving_summary,
    stop_trainer_after_round,
    trainer_status,
)
from oxnet.vocabulary import AP40, AP75, MAP, MEAN_IMAGE_AUC

HEADLINE_METRICS = (MAP, AP40, AP75, MEAN_IMAGE_AUC)


@st.cache_data(ttl=5, show_spinner=False)
def _counts(url: str) -> dict | None:
    return image_counts(sessions())


@st.cache_data(ttl=30, show_spinner=False)
def _costs(url: str) -> list[dict]:
    return annotation_cost_rows(sessions())


def _serving(url: str) -> dict | None:
    """The serving version and the candidates, read afresh (indexed queries): never a cached, older one."""
    with sessions()() as session:
        return serving_summary(session)


def _trainer_row(url: str) -> dict | None:
    return trainer_status(sessions())


st.title("Overview")
url = store_url()
who = annotator()
admin = may("admin")  # the trainer, the demo project: the functions check the role again
counts = _counts(url)

if counts is None:
    st.info("The store is empty. The demo project (about 300 synthetic chest X-rays) is created in the background; "
            "or import your own images on the **Data** page.")

    @st.fragment(run_every=timedelta(seconds=1))
    def _seeding() -> None:
        jobs = list_jobs(url, "seed", limit=1)
        if not jobs:
            if os.environ.get(AUTO_DEMO_ENV, "1") == "0" and admin and st.button(
                    "Create the demo project", key="overview_seed", type="primary"):
                start_demo_job(url, actor=who)
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
    alive = bool(row and row["alive"])
    if row is None or not row["owner"]:
        st.markdown("Not running.")
    elif alive:
        st.markdown(f"**Running** (`{row['owner']}`), round {row['round']}, {row['phase'] or 'starting'}; "
                    f"last heartbeat {int(row['seconds_ago'])} s ago.")
        st.progress(min(1.0, max(0.0, float(row["progress"] or 0.0))), text=f"round {row['round']}: {row['phase'] or ''}")
    else:
        st.warning(f"**Stale**: `{row['owner']}` holds the lock but its last heartbeat was at {row['heartbeat_at']} UTC "
                   f"(more than {int(TRAINER_STALE_AFTER.total_seconds() // 60)} min ago). It probably died; start a new one.")
    if row and row["last_error"]:
        st.error(f"Last error: {row['last_error']}")
    if not admin:
        st.caption("An admin starts and stops the trainer.")
        return
    weights = st.text_input(
        "Backbone start of the first round", key="overview_weights", placeholder="the preset's",
        help="Empty: the preset's (random init on cpu; the paper preset tries ImageNet weights and says so when "
             "they cannot be had). 'random', 'imagenet', or the path of a torchvision ResNet state_dict on this "
             "server, e.g. /models/resnet18.pth. Later rounds warm-start from the previous model.",
    ).strip()
    left, after, now_, _ = st.columns([1, 1, 1, 2], vertical_alignment="center")
    if left.button("Start trainer", disabled=alive, key="overview_start", type="primary",
                   help="cpu preset, or paper when a GPU is present"):
        if weights and weights not in ("random", "imagenet") and not Path(weights).is_file():
            st.error(f"Backbone weights file {weights} does not exist on this server; the trainer was not started.")
        else:
            try:
                st.toast(f"Trainer started (pid {start_trainer(url, weights=weights or None, actor=who)}).")
            except (OSError, PermissionError) as e:
                st.error(f"Could not start the trainer: {e}")
    owner = row["owner"] if row else None
    if after.button("Stop after this round", disabled=not alive or who is None, key="overview_stop_after_round",
                    help="the round in progress finishes and its model version is saved; then the trainer exits") and who is not None:
        stop_trainer_after_round(sessions(), annotator=who, actor=who)
        st.toast("The trainer stops once the round in progress is saved.")
    if now_.button("Stop now", disabled=trainer_pid(owner, url) is None, key="overview_stop",
                   help="the round in progress is abandoned: its version is marked failed and never served; "
                        "labels are kept; the next start trains a new round from the latest ready model"):
        pid = stop_trainer(owner, url, actor=who)
        st.toast(f"Stopping the trainer (pid {pid}) now: the round in progress is discarded (its version is marked "
                 "failed); your labels are kept, and the next start begins a new round from the latest ready model."
                 if pid else "No trainer process found on this machine.")
    st.caption("**Stop after this round** keeps the round in progress (it finishes, is saved and serves). "
               "**Stop now** discards it: its model version is marked failed; labels are never lost.")


_trainer_panel()

st.subheader("Serving model")


@st.fragment(run_every=timedelta(seconds=5))
def _serving_panel() -> None:
    """The serving version and the candidates, re-read every few seconds (a round can finish while the
    page is open)."""
    summary = _serving(url)
    if summary is None:
        st.info("No model version yet: start the trainer; its first round adds one.")
        return
    latest = summary["serving"]  # the version whose suggestions and boxes the Queue and Annotate pages show
    counts_seen = latest["label_counts"]
    st.markdown(f"Version **{latest['id']}** (round {latest['round']}, {latest['created_at']:%Y-%m-%d %H:%M} UTC), trained on "
                + ", ".join(f"{counts_seen.get(g.value, 0):,} {g.value}" for g in Granularity) + " training images.")
    start = latest["backbone_start"]
    st.caption(f"Backbone start: {start}." if start else "Backbone start: not recorded (a version from before it was kept).")
    val = latest["metrics"].get("val", {})
    cols = st.columns(len(HEADLINE_METRICS))
    for col, name in zip(cols, HEADLINE_METRICS, strict=True):
        col.metric(f"{name} (val)", f"{val[name]:.3g}" if name in val else "-")
    candidate_notices(summary, key="overview")


_serving_panel()


@st.cache_data(ttl=30, show_spinner=False)
def _models_disk_use(url: str) -> tuple[str, int]:
    folder, used = model_files(url)
    return str(folder), used


_folder, _used = _models_disk_use(url)
st.caption(f"Model checkpoints use {_used / 2**20:,.1f} MiB in `{_folder}` (the serving, the newest and the best versions and the "
           f"{DEFAULT_KEEP_READY} newest others are kept; failed versions' files are removed).")

st.subheader("Annotation cost")
st.caption(f"Active seconds per save, from the Annotate page. The suggestions price each upgrade with the medians "
           f"once image-level labels and that upgrade have {MIN_SAVES} saves each (units: the labels' median); "
           "until then 1 unit for labels and 5 for boxes.")
st.dataframe(pd.DataFrame(_costs(url)), width="content", hide_index=True)
