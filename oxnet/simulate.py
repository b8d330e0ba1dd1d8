"""Does the loop help? Replay it with an oracle annotator and compare selection strategies at equal cost.

Each run starts from a store whose training images are mostly unlabeled (a few full, a few weak; the
hidden labels are kept by the oracle), runs a round of the trainer (:class:`oxnet.loop.Trainer`), then
spends ``per_round`` annotation units on the images a strategy picks, each upgraded by one step through
the store's normal edit functions (unlabeled -> weak costs ``cost_labels``, weak -> full costs
``cost_boxes``), and repeats until ``budget`` units are spent. After every round the test split's mAP is
recorded against the units spent so far.

Strategies: ``random`` (not-full training images in random order), ``disagreement`` (the trainer's
suggestions, best score first) and ``random_boxes`` (weak images in random order: a control that buys
boxes as disagreement tends to, so "which images" can be told apart from "which annotation"). The same
seed gives every strategy the same starting labels, split, model initialisation and batch order, so the
curves differ only by what was picked.

The store side (import, oracle edits) is behind :class:`SimulationStore`; ``db.workbench`` implements it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from oxnet.loop import LoopSettings, RoundResult, Store, Trainer
from oxnet.scoring import ADD_LABELS, DRAW_BOXES

__all__ = [
    "STRATEGIES",
    "Candidate",
    "CostModel",
    "SimulationConfig",
    "SimulationStore",
    "figure",
    "hide_labels",
    "pick",
    "plan_labels",
    "run_simulation",
    "summarize",
]

STRATEGIES = ("random", "disagreement", "random_boxes")


@dataclass(frozen=True)
class CostModel:
    """Annotation cost in units: image-level labels for an unlabeled image, boxes for a weak one."""

    labels: float = 1.0
    boxes: float = 5.0

    def __post_init__(self) -> None:
        if not (self.labels > 0 and self.boxes > 0):
            raise ValueError(f"costs must be > 0, got labels={self.labels}, boxes={self.boxes}")

    def of(self, action: str) -> float:
        """Cost of ``action`` ("add image-level labels" or "draw boxes")."""
        if action not in (ADD_LABELS, DRAW_BOXES):
            raise ValueError(f"unknown action {action!r}")
        return self.labels if action == ADD_LABELS else self.boxes


@dataclass(frozen=True)
class Candidate:
    """A not-full training image: its id, granularity and the latest suggestion score (None: none)."""

    image_id: int
    granularity: str
    score: float | None = None

    @property
    def action(self) -> str:
        return ADD_LABELS if self.granularity == "unlabeled" else DRAW_BOXES


class SimulationStore(Store, Protocol):
    """A :class:`~oxnet.loop.Store` that also lists candidates and plays the oracle."""

    def candidates(self) -> list[Candidate]:
        """Not-full training images, with the newest ready model version's suggestion score."""

    def reveal(self, image_id: int, action: str) -> None:
        """Upgrade the image one step with its hidden labels (as an annotator would save them)."""


def pick(candidates: Sequence[Candidate], strategy: str, budget: float, costs: CostModel, rng: np.random.Generator) -> list[Candidate]:
    """The images ``strategy`` upgrades with ``budget`` units: candidates in the strategy's order, each
    taken when its cost still fits (cheaper ones further down may fill the rest)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "random":
        ordered = [candidates[i] for i in rng.permutation(len(candidates))]
    elif strategy == "random_boxes":
        weak = [c for c in candidates if c.granularity == "weak"]
        ordered = [weak[i] for i in rng.permutation(len(weak))]
    else:
        ordered = sorted(candidates, key=lambda c: (-(c.score if c.score is not None else -math.inf), c.image_id))
    chosen, left = [], budget
    for candidate in ordered:
        cost = costs.of(candidate.action)
        if cost <= left + 1e-9:
            chosen.append(candidate)
            left -= cost
    return chosen


def hide_labels(coco: Mapping[str, Any], plan: Mapping[int, tuple[str, str]]) -> dict[str, Any]:
    """A copy of a fully labeled COCO dict where image ``i`` gets ``plan[i] = (split, granularity)``:
    full images keep boxes and ``image_labels``, weak ones only ``image_labels`` (the classes of their
    boxes when the file has none), unlabeled ones nothing. Images not in ``plan`` are left out."""
    out = copy.deepcopy(dict(coco))
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    boxes: dict[int, list[dict[str, Any]]] = {}
    for ann in coco.get("annotations", []):
        boxes.setdefault(ann["image_id"], []).append(ann)
    unknown = set(plan) - {image["id"] for image in coco["images"]}
    if unknown:
        raise ValueError(f"plan names image ids that are not in the COCO dict: {sorted(unknown)[:10]}")
    images, annotations = [], []
    for image in out["images"]:
        if image["id"] not in plan:
            continue
        split, granularity = plan[image["id"]]
        if granularity not in ("full", "weak", "unlabeled"):
            raise ValueError(f"image {image['id']}: granularity must be full, weak or unlabeled, got {granularity!r}")
        image.update(split=split, granularity=granularity)
        own = boxes.get(image["id"], [])
        if "image_labels" not in image:
            image["image_labels"] = sorted({names[a["category_id"]] for a in own}) or ["No Finding"]
        if granularity == "full":
            annotations += own
        elif granularity == "unlabeled":
            image.pop("image_labels")
        images.append(image)
    out["images"], out["annotations"] = images, annotations
    return out


def plan_labels(
    coco: Mapping[str, Any],
    *,
    seed: int,
    initial_full: int,
    initial_weak: int,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    split_seed: int = 0,
) -> dict[int, tuple[str, str]]:
    """``{image id: (split, granularity)}`` for a simulation: patients go to train / val / test by
    ``fractions`` (shuffled by ``split_seed``, so every seed shares the evaluation images), val and test
    are full; of the training images ``initial_full`` (picked by ``seed``) start full, the next
    ``initial_weak`` weak and the rest unlabeled."""
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three numbers >= 0 summing to 1, got {fractions}")
    images = list(coco["images"])
    by_patient: dict[str, list[int]] = {}
    for image in images:
        patient = image.get("patient_id")
        by_patient.setdefault(str(patient) if patient is not None else f"image-{image['id']}", []).append(image["id"])
    patients = sorted(by_patient)
    order = np.random.default_rng(split_seed).permutation(len(patients))
    bounds = np.cumsum(fractions)[:2] * len(images)
    plan: dict[int, tuple[str, str]] = {}
    train: list[int] = []
    for i in order.tolist():
        placed = len(plan)
        split = "train" if placed < bounds[0] else "val" if placed < bounds[1] else "test"
        for image_id in by_patient[patients[i]]:
            plan[image_id] = (split, "full")
            if split == "train":
                train.append(image_id)
    if initial_full < 1 or initial_full + initial_weak > len(train):
        raise ValueError(f"need 1 <= initial_full and initial_full + initial_weak <= {len(train)} training images, "
                         f"got {initial_full} + {initial_weak}")
    for rank, i in enumerate(np.random.default_rng(seed).permutation(len(train)).tolist()):
        granularity = "full" if rank < initial_full else "weak" if rank < initial_full + initial_weak else "unlabeled"
        plan[train[i]] = ("train", granularity)
    return plan


@dataclass(frozen=True)
class SimulationConfig:
    """Settings of a simulation.

    Args:
        strategies: among :data:`STRATEGIES`.
        seeds: one run per strategy and seed.
        budget: units to spend in a run (the last round may spend less when nothing fits).
        per_round: units spent between two rounds.
        costs: the :class:`CostModel`.
        settings: the trainer's :class:`~oxnet.loop.LoopSettings` (its ``eval_splits`` get "test").
    """

    strategies: tuple[str, ...] = ("random", "disagreement")
    seeds: tuple[int, ...] = (0,)
    budget: float = 40.0
    per_round: float = 10.0
    costs: CostModel = CostModel()
    settings: LoopSettings = field(default_factory=LoopSettings)

    def __post_init__(self) -> None:
        unknown = set(self.strategies) - set(STRATEGIES)
        if unknown or not self.strategies:
            raise ValueError(f"strategies must be among {STRATEGIES}, got {list(self.strategies)}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if not 0 < self.per_round <= self.budget:
            raise ValueError(f"need 0 < per_round <= budget, got per_round={self.per_round}, budget={self.budget}")


def _point(result: RoundResult, spent: float, elapsed: float) -> dict[str, Any]:
    test = result.metrics.get("test", {})
    return {"round": result.round, "spent": spent, "status": result.status, "label_counts": result.label_counts,
            "mAP": test.get("mAP"), "AP40": test.get("AP40"), "val_mAP": result.metrics.get("val", {}).get("mAP"),
            "seconds": round(elapsed, 1)}


def run_simulation(
    make_store: Callable[[str, int], SimulationStore],
    config: SimulationConfig,
    *,
    on_point: Callable[[dict[str, Any]], None] | None = None,
    on_update: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every (strategy, seed) on a fresh store from ``make_store(strategy, seed)``.

    Returns ``{"config", "machine", "runs": [{"strategy", "seed", "points": [{"round", "spent", "mAP",
    "AP40", "val_mAP", "label_counts", "status", "seconds"}]}], "summary"}``; ``mAP`` is the test split's.
    ``on_point`` receives every new point; ``on_update`` the results so far after every point (the run in
    progress included), so a long simulation can be watched and an interrupted one keeps its points.
    """
    runs: list[dict[str, Any]] = []

    def results() -> dict[str, Any]:
        return {"config": _jsonable(asdict(config)), "machine": machine(), "runs": runs, "summary": summarize(runs)}

    for seed in config.seeds:
        for strategy in config.strategies:
            store = make_store(strategy, seed)
            settings = _settings(config.settings, seed, strategy)
            rng = np.random.default_rng(seed)
            points: list[dict[str, Any]] = []
            runs.append({"strategy": strategy, "seed": seed, "points": points})
            spent, started = 0.0, time.monotonic()
            while True:
                result = Trainer(store, settings).run()[-1]
                point = {"strategy": strategy, "seed": seed, **_point(result, spent, time.monotonic() - started)}
                points.append(point)
                if on_point is not None:
                    on_point(point)
                if on_update is not None:
                    on_update(results())
                if spent >= config.budget - 1e-9:
                    break
                chosen = pick(store.candidates(), strategy, min(config.per_round, config.budget - spent), config.costs, rng)
                if not chosen:
                    break
                for candidate in chosen:
                    store.reveal(candidate.image_id, candidate.action)
                    spent += config.costs.of(candidate.action)
    return results()


def _settings(base: LoopSettings, seed: int, strategy: str) -> LoopSettings:
    splits = tuple(dict.fromkeys((*base.eval_splits, "val", "test")))
    return replace(base, seed=seed, eval_splits=splits, max_rounds=1, min_interval_s=0.0,
                   suggest=strategy == "disagreement")


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per strategy: the mean test mAP at each spent level over seeds, the mean area under the
    mAP-vs-units curve (trapezoid, divided by the units spanned) and the final mAP; plus the
    per-seed differences of disagreement minus random when both ran."""
    by: dict[str, dict[str, Any]] = {}
    per_seed: dict[tuple[str, int], dict[str, float]] = {}
    for run in runs:
        points = [p for p in run["points"] if p["mAP"] is not None]
        if not points:
            continue
        spent = np.array([p["spent"] for p in points], dtype=float)
        maps = np.array([p["mAP"] for p in points], dtype=float)
        area = float(np.trapezoid(maps, spent) / (spent[-1] - spent[0])) if len(points) > 1 and spent[-1] > spent[0] else float(maps.mean())
        per_seed[(run["strategy"], run["seed"])] = {"area": area, "final": float(maps[-1])}
        entry = by.setdefault(run["strategy"], {"curve": {}, "areas": [], "finals": []})
        entry["areas"].append(area)
        entry["finals"].append(float(maps[-1]))
        for s, m in zip(spent.tolist(), maps.tolist()):
            entry["curve"].setdefault(s, []).append(m)
    summary: dict[str, Any] = {}
    for strategy, entry in by.items():
        summary[strategy] = {
            "spent": sorted(entry["curve"]),
            "mean_mAP": [float(np.mean(entry["curve"][s])) for s in sorted(entry["curve"])],
            "mean_area": float(np.mean(entry["areas"])), "std_area": float(np.std(entry["areas"])),
            "mean_final_mAP": float(np.mean(entry["finals"])), "std_final_mAP": float(np.std(entry["finals"])),
            "seeds": len(entry["areas"]),
        }
    seeds = sorted({seed for (_, seed) in per_seed})
    pairs = [(per_seed[("disagreement", s)], per_seed[("random", s)]) for s in seeds
             if ("disagreement", s) in per_seed and ("random", s) in per_seed]
    if pairs:
        area_diff = [d["area"] - r["area"] for d, r in pairs]
        final_diff = [d["final"] - r["final"] for d, r in pairs]
        summary["disagreement_minus_random"] = {
            "area": {"mean": float(np.mean(area_diff)), "per_seed": area_diff},
            "final_mAP": {"mean": float(np.mean(final_diff)), "per_seed": final_diff},
            "seeds_where_disagreement_wins": int(sum(d > 0 for d in area_diff)), "seeds": len(pairs),
        }
    return summary


def figure(results: Mapping[str, Any]):
    """A plotly figure: test mAP against units spent, one bold mean curve per strategy, thin per seed."""
    import plotly.graph_objects as go

    colors = {"random": "#7f7f7f", "disagreement": "#d62728", "random_boxes": "#1f77b4"}
    fig = go.Figure()
    for run in results["runs"]:
        points = [p for p in run["points"] if p["mAP"] is not None]
        fig.add_trace(go.Scatter(
            x=[p["spent"] for p in points], y=[100 * p["mAP"] for p in points], mode="lines+markers",
            line={"width": 1, "color": colors.get(run["strategy"])}, opacity=0.35, showlegend=False,
            name=f"{run['strategy']} seed {run['seed']}",
        ))
    for strategy, entry in results["summary"].items():
        if strategy in STRATEGIES:
            fig.add_trace(go.Scatter(
                x=entry["spent"], y=[100 * m for m in entry["mean_mAP"]], mode="lines+markers",
                line={"width": 3, "color": colors.get(strategy)},
                name=f"{strategy} (mean of {entry['seeds']} seed{'s' * (entry['seeds'] != 1)})",
            ))
    fig.update_layout(title="Active learning: test mAP against annotation cost", xaxis_title="annotation units spent",
                      yaxis_title="test mAP (%, IoU 0.40:0.75)", template="plotly_white")
    return fig


def write_results(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``out_dir/simulation.json`` and ``out_dir/simulation.html`` (plotly, self-contained)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "simulation.json", out / "simulation.html"
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1), encoding="utf-8")
    os.replace(tmp, json_path)
    figure(results).write_html(html_path, include_plotlyjs=True)
    return {"json": json_path, "html": html_path}
