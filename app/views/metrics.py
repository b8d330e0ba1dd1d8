"""Metrics: mAP against the label mix across model versions, which version serves (promote or roll back
any ready version, audited), the granularity sweep (the paper's Table 2), per-class AP, image-level AUC
training losses and the agreement between readers (several readers per image). Hovering a point names the
model version."""

from __future__ import annotations

from typing import Literal

import pandas as pd
import plotly.express as px
import streamlit as st

from app.store import sessions, store_url
from app.widgets import candidate_notices, promote_button
from db.readers import project_agreement
from db.service import (
    model_versions,
    project_exists,
    serving_summary,
    sweep_results,
)
from oxnet.vocabulary import (
    FULL, IMAGE_AUC_PREFIX, LOSS_PREFIX, MAP, MEAN_IMAGE_AUC, PER_CLASS_AP_PREFIX, UNLABELED, WEAK,
)

PLOT_WIDTH: Literal["stretch"] = "stretch"
#: Above this many model versions the points carry no text labels (hover still names the version).
LABELLED_VERSIONS = 15


def readable(figure, *, integer_x: bool = True):
    """Axes that start at 0 (a rise is not exaggerated) and, for counts and rounds, integer ticks."""
    figure.update_xaxes(rangemode="tozero", **({"tickformat": "d"} if integer_x else {}))
    figure.update_yaxes(rangemode="tozero")
    return figure


@st.cache_data(ttl=30, show_spinner=False)
def _data(url: str) -> tuple[list, list] | None:
    with sessions()() as session:
        if not project_exists(session):
            return None
        return model_versions(session), sweep_results(session)


def _per_class(metrics: dict[str, float], prefix: str) -> pd.DataFrame:
    return pd.DataFrame([{"class": k[len(prefix):], "value": v} for k, v in metrics.items() if k.startswith(prefix)])


st.title("Metrics")
data = _data(store_url())
if data is None:
    st.info("The store has no project yet: see **Overview**.")
    st.stop()
versions, sweeps = data

st.subheader("mAP against annotation granularity, by model version")
rows = [
    {"version": v["id"], "round": v["round"], "full images": v["label_counts"].get(FULL, 0),
     "weak images": v["label_counts"].get(WEAK, 0), "unlabeled images": v["label_counts"].get(UNLABELED, 0),
     MAP: v["metrics"].get("val", {}).get(MAP), "state": v["state"]}
    for v in versions
]
table = pd.DataFrame(rows)
if table.empty or table["mAP"].isna().all():
    st.info("No evaluated model version yet: the trainer adds one per round, with its mAP on the val split.")
else:
    hover = ["version", "round", "state", "full images", "weak images", "unlabeled images"]
    table["label"] = "v" + table["version"].astype(str) + table["state"].map({"serving": " (serving)"}).fillna("")
    left, right = st.columns(2)
    for col, x, colour, key in ((left, "full images", "weak images", "metrics_full"),
                                (right, "weak images", "full images", "metrics_weak")):
        # one line through the versions in order (the live loop's path), the other count as colour
        figure = px.line(table.sort_values("version"), x=x, y="mAP", markers=True, hover_data=hover,
                         text="label" if len(table) <= LABELLED_VERSIONS else None, title=f"mAP (val) vs {x}")
        figure.update_traces(textposition="top center", marker={"size": 9, "color": table.sort_values("version")[colour],
                                                                 "colorscale": "Viridis", "showscale": True,
                                                                 "colorbar": {"title": colour}})
        col.plotly_chart(readable(figure), key=key, width=PLOT_WIDTH)

st.subheader("Serving version, candidates, promote and roll back")
with sessions()() as session:
    summary = serving_summary(session)  # not cached: a promotion shows at once
if summary is None:
    st.info("No ready model version yet.")
else:
    serving = summary["serving"]
    st.markdown(f"Version **{serving['id']}** serves the queue's suggestions and the Annotate page's model boxes. "
                "A new version serves only when its val mAP is not worse than the serving one's beyond the trainer's "
                "tolerance; otherwise it stays a candidate.")
    candidate_notices(summary, key="metrics", on_done=_data.clear)
    states = pd.DataFrame([
        {"version": v["id"], "round": v["round"], "state": v["state"], "mAP (val)": v["metrics"].get("val", {}).get(MAP),
         FULL: v["label_counts"].get(FULL, 0), WEAK: v["label_counts"].get(WEAK, 0),
         "created (UTC)": v["created_at"]}
        for v in reversed(versions)
    ])
    st.dataframe(states, hide_index=True, width="stretch", key="metrics_states")
    others = [v["id"] for v in reversed(versions) if v["id"] != serving["id"]]
    if others:
        left, right = st.columns([1, 2])
        chosen = left.selectbox("Version to serve", others, key="metrics_serve_version",
                                help="An older version: a rollback; a newer one: a promotion. Both are audited.")
        with right:
            st.write("")
            promote_button(chosen, f"{'Roll back to' if chosen < serving['id'] else 'Promote'} version {chosen}",
                           key=f"metrics_serve_{chosen}", on_done=_data.clear)  # per version: a click from a page drawn
            # before someone else changed the serving version acts on the version it showed or not at all
    if summary["history"]:
        with st.expander("Serving history (audit log)"):
            st.dataframe(pd.DataFrame(summary["history"]), hide_index=True, width="stretch", key="metrics_history")

st.subheader("Granularity sweep (the paper's Table 2)")
if not sweeps:
    st.info("No sweep results yet: run the granularity sweep script; each run adds a point here.")
else:
    frame = pd.DataFrame([{**{k: r[k] for k in ("id", "method", "seed", "n_full", "n_weak")}, "mAP": r["metrics"].get("mAP")}
                          for r in sweeps])
    summary = (frame.groupby(["method", "n_full"], as_index=False)
               .agg(mAP=("mAP", "mean"), sd=("mAP", "std"), seeds=("seed", "nunique"), n_weak=("n_weak", "max"), runs=("id", "count")))
    figure = px.line(summary, x="n_full", y="mAP", color="method", error_y="sd", markers=True,
                     hover_data=["n_weak", "seeds", "runs"], title="mAP (mean over seeds, +/- sd) vs full images",
                     labels={"n_full": "full images"})
    st.plotly_chart(readable(figure), key="metrics_sweep", width=PLOT_WIDTH)

latest = versions[-1] if versions else None
val = latest["metrics"].get("val", {}) if latest else {}


def _class_bars(prefix: str, what: str, axis: str, *, key: str, note: str = "", **options) -> None:
    """A bar per class of the latest version's ``prefix`` metrics (``what``: their name in the message
    shown when it has none; ``axis``: the value axis)."""
    frame = _per_class(val, prefix)
    if frame.empty or latest is None:  # no latest version: val is empty too
        st.info(f"The latest model version has no {what}.")
        return
    frame["version"] = latest["id"]
    st.plotly_chart(px.bar(frame, x="class", y="value", hover_data=["version"], labels={"value": axis},
                           title=f"model version {latest['id']}{note}", **options), key=key, width=PLOT_WIDTH)


left, right = st.columns(2)
with left:
    st.subheader("Per-class AP")
    _class_bars(PER_CLASS_AP_PREFIX, "per-class AP", "AP (val)", key="metrics_ap")
with right:
    st.subheader("Image-level AUC")
    mean = val.get(MEAN_IMAGE_AUC)
    _class_bars(IMAGE_AUC_PREFIX, "image-level AUC", "ROC AUC (val)", key="metrics_auc", range_y=[0, 1],
                note=f", mean {mean:.3f}" if mean is not None else "")

st.subheader("Training losses")
losses = pd.DataFrame([
    {"version": v["id"], "round": v["round"], "loss": k[len(LOSS_PREFIX):], "value": value}
    for v in versions for k, value in v["metrics"].get("train", {}).items() if k.startswith(LOSS_PREFIX)
])
if losses.empty:
    st.info("No training losses recorded yet.")
else:
    st.plotly_chart(readable(px.line(losses, x="round", y="value", color="loss", markers=True, hover_data=["version"],
                                     title="mean loss per round")), key="metrics_loss", width=PLOT_WIDTH)

with sessions()() as session:
    agreement = project_agreement(session)
if agreement["readers"] > 1 or agreement["images"]:  # one reader per image: nothing to agree on
    st.subheader("Reader agreement")
if agreement["readers"] > 1 and not agreement["images"]:
    st.caption(f"No image has all its {agreement['readers']} reads yet.")
elif agreement["images"]:
    st.caption(f"{agreement['images']} image(s) with all {agreement['readers']} reads, readers disagree on "
               f"{agreement['disagree']}; box F1 at IoU 0.4 "
               + ("n/a" if agreement["box_f1"] is None else f"{agreement['box_f1']:.2f}") + " (details on **Review**).")
    st.dataframe(pd.DataFrame([{"class": r["class"], "Cohen's kappa": r["cohen_kappa"], "Fleiss' kappa": r["fleiss_kappa"],
                                "box F1": r["box_f1"]} for r in agreement["per_class"]]),
                 hide_index=True, key="metrics_agreement")
