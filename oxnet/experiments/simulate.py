"""Does the loop help? Replay it with an oracle annotator and compare selection strategies at equal cost.

Each run starts from a store whose training images are mostly unlabeled (a few full, a few weak; the
hidden labels are kept by the oracle), runs a round of the trainer (:class:`oxnet.active.loop.Trainer`), then
spends ``per_round`` annotation units on the suggestions the trainer stored, in their order (the
trainer ranks with the run's strategy, :mod:`oxnet.active.strategies`, exactly as the live queue), each
upgrade done through the store's normal edit functions (costs from :class:`~oxnet.active.strategies.CostModel`),
and repeats until ``budget`` units are spent. After every round the test split's mAP is recorded
against the units spent so far.

The same seed gives every strategy the same starting labels, split, model initialisation and batch
order, so the curves differ only by what was bought.

The store side (import, oracle edits) is behind :class:`SimulationStore`; ``app.simulate.OracleStore`` implements it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from oxnet.active.loop import LoopSettings, RoundResult, Trainer
from oxnet.active.protocol import Store
from oxnet.active.strategies import STRATEGIES as _REGISTRY
from oxnet.active.strategies import CostModel
from oxnet.data.splits import SPLITS, patient_key, split_patients
from oxnet.classes import NO_FINDING
from oxnet.files import jsonable, write_json
from oxnet.machine import describe
from oxnet.vocabulary import (
    ADD_LABELS, AP40, DRAW_BOXES, FULL, GRANULARITIES, MAP, UNLABELED, UNLABELED_TO_FULL, UNLABELED_TO_WEAK, WEAK,
    WEAK_TO_FULL,
)

__all__ = [
    "STRATEGIES",
    "Candidate",
    "CostModel",
    "SimulationConfig",
    "ORACLE",
    "SimulationStore",
    "figure",
    "hide_labels",
    "plan_labels",
    "proposals",
    "run_oracle",
    "run_simulation",
    "spend",
    "merge_simulations",
    "summarize",
    "write_results",
]

STRATEGIES = tuple(_REGISTRY)
#: The simulation-only hindsight reference (:func:`run_oracle`), not a strategy of the live queue.
ORACLE = "oracle"


@dataclass(frozen=True)
class Candidate:
    """A suggestion of the newest model version, as the store ranked it: do ``action`` on a not-full
    training image, costing ``cost`` units, expected ``gain`` (None: the strategy made no estimate)."""

    image_id: int
    granularity: str
    action: str
    cost: float
    gain: float | None = None


class SimulationStore(Store, Protocol):
    """A :class:`~oxnet.active.protocol.Store` that also lists the ranked suggestions and plays the oracle."""

    def candidates(self) -> list[Candidate]:
        """The newest ready model version's suggestions of still not-full images, in the strategy's order."""

    def reveal(self, image_id: int, action: str) -> None:
        """Upgrade the image with its hidden labels (as an annotator would save them)."""

    def granularity(self, image_id: int) -> str:
        """The image's granularity now."""


def spend(candidates: Sequence[Candidate], budget: float) -> list[Candidate]:
    """What an annotator with ``budget`` units does with the queue: the suggestions in order, each taken
    when its cost still fits (cheaper ones further down may fill the rest)."""
    chosen, left = [], budget
    for candidate in candidates:
        if candidate.cost <= left + 1e-9:
            chosen.append(candidate)
            left -= candidate.cost
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
        if granularity not in GRANULARITIES:
            raise ValueError(f"image {image['id']}: granularity must be full, weak or unlabeled, got {granularity!r}")
        image.update(split=split, granularity=granularity)
        own = boxes.get(image["id"], [])
        if "image_labels" not in image:
            image["image_labels"] = sorted({names[a["category_id"]] for a in own}) or [NO_FINDING]
        if granularity == FULL:
            annotations += own
        elif granularity == UNLABELED:
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
    ``fractions`` with the one patient split (:mod:`oxnet.data.splits`, seeded by ``split_seed``, so
    every seed shares the evaluation images; ValueError when a split with a fraction gets no patient),
    val and test are full; of the training images ``initial_full`` (picked by ``seed``) start full, the
    next ``initial_weak`` weak and the rest unlabeled."""
    images = list(coco["images"])
    keys = {image["id"]: patient_key(image.get("patient_id"), image["id"]) for image in images}
    placed = split_patients(keys.values(), seed=split_seed, fractions=fractions,
                            require=[s for s, f in zip(SPLITS, fractions) if f > 0])
    plan: dict[int, tuple[str, str]] = {}
    train: list[int] = []
    for image_id, key in keys.items():
        plan[image_id] = (placed[key], FULL)
        if placed[key] == "train":
            train.append(image_id)
    if initial_full < 1 or initial_full + initial_weak > len(train):
        raise ValueError(f"need 1 <= initial_full and initial_full + initial_weak <= {len(train)} training images, "
                         f"got {initial_full} + {initial_weak}")
    for rank, i in enumerate(np.random.default_rng(seed).permutation(len(train)).tolist()):
        granularity = FULL if rank < initial_full else WEAK if rank < initial_full + initial_weak else UNLABELED
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
        settings: the trainer's :class:`~oxnet.active.loop.LoopSettings` (its ``eval_splits`` get "test").
        min_rounds: train at least this many rounds even when nothing is left to buy (the ceiling run:
            every training image full from the start, trained as many rounds as the others).
    """

    strategies: tuple[str, ...] = ("random", "disagreement")
    seeds: tuple[int, ...] = (0,)
    budget: float = 40.0
    per_round: float = 10.0
    costs: CostModel = CostModel()
    settings: LoopSettings = field(default_factory=LoopSettings)
    min_rounds: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.strategies) - set(STRATEGIES) - {ORACLE}
        if unknown or not self.strategies:
            raise ValueError(f"strategies must be among {STRATEGIES}, got {list(self.strategies)}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if not 0 < self.per_round <= self.budget:
            raise ValueError(f"need 0 < per_round <= budget, got per_round={self.per_round}, budget={self.budget}")


def _point(result: RoundResult, spent: float, elapsed: float) -> dict[str, Any]:
    test = result.metrics.get("test", {})
    return {"round": result.round, "spent": spent, "status": result.status, "label_counts": result.label_counts,
            MAP: test.get(MAP), AP40: test.get(AP40), "val_mAP": result.metrics.get("val", {}).get(MAP),
            "seconds": round(elapsed, 1)}


def run_simulation(
    make_store: Callable[[str, int], SimulationStore],
    config: SimulationConfig,
    *,
    on_point: Callable[[dict[str, Any]], None] | None = None,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    log_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run every (strategy, seed) on a store from ``make_store(strategy, seed)``.

    Returns ``{"config", "machine", "runs": [{"strategy", "seed", "points": [{"round", "spent", "mAP",
    "AP40", "val_mAP", "label_counts", "status", "seconds", "bought"}]}], "summary"}``; ``mAP`` is the
    test split's. ``on_point`` receives every new point; ``on_update`` the results so far after every
    point (the run in progress included), so a long simulation can be watched and an interrupted one
    keeps its points. With ``log_dir``, every run appends its points and its purchases to
    ``log_dir/<strategy>-seed<seed>.jsonl``; a run whose log exists continues from its last finished
    round (``make_store`` must then reopen that run's store, not make a new one).
    """
    runs: list[dict[str, Any]] = []

    def results() -> dict[str, Any]:
        return {"config": jsonable(asdict(config)), "machine": describe(), "runs": runs, "summary": summarize(runs)}

    for seed in config.seeds:
        for strategy in config.strategies:
            log = Path(log_dir) / f"{strategy}-seed{seed}.jsonl" if log_dir is not None else None
            if strategy == ORACLE:
                points: list[dict[str, Any]] = []
                runs.append({"strategy": strategy, "seed": seed, "points": points})
                run_oracle(make_store(strategy, seed), config, seed, points=points, log=log,
                           on_point=lambda point: (on_point and on_point(point), on_update and on_update(results())))
                continue
            points, planned = _read_log(log)
            runs.append({"strategy": strategy, "seed": seed, "points": points})
            if points and points[-1].get("done"):
                continue
            store = make_store(strategy, seed)
            settings = _settings(config.settings, seed, strategy, config.per_round)
            spent = points[-1]["spent"] + sum(c["cost"] for c in planned) if points else 0.0
            if planned:  # killed while revealing: finish the purchases that were planned
                for c in planned:
                    target = WEAK if c["action"] == ADD_LABELS else FULL
                    if store.granularity(c["image_id"]) not in (target, FULL):
                        store.reveal(c["image_id"], c["action"])
            started = time.monotonic() - (points[-1]["seconds"] if points else 0.0)
            while True:
                result = Trainer(store, settings).run()[-1]
                point = {"strategy": strategy, "seed": seed, **_point(result, spent, time.monotonic() - started)}
                done = spent >= config.budget - 1e-9
                chosen = [] if done else spend(store.candidates(), min(config.per_round, config.budget - spent))
                point["bought"] = _bought(chosen)
                point["done"] = (done or not chosen) and len(points) + 1 >= config.min_rounds
                points.append(point)
                _append(log, {"point": point})
                if on_point is not None:
                    on_point(point)
                if on_update is not None:
                    on_update(results())
                if point["done"]:
                    break
                _append(log, {"plan": [asdict(c) for c in chosen]})  # before revealing: a kill can finish them
                for candidate in chosen:
                    store.reveal(candidate.image_id, candidate.action)
                    spent += candidate.cost
    return results()


def proposals(candidates: Sequence[Candidate], budget: float, costs: CostModel, rng: np.random.Generator,
              k: int = 4) -> list[list[Candidate]]:
    """``k`` batches the hindsight oracle tries (``candidates``: the not-full images, one step up):
    ``k - 2`` random orders of one-step upgrades, image-level labels only, and boxes only (weak images
    first, then unlabeled -> full); each spent with ``budget`` units."""
    if k < 3:
        raise ValueError(f"the oracle needs k >= 3 proposals, got {k}")
    out = [spend([candidates[i] for i in rng.permutation(len(candidates))], budget) for _ in range(k - 2)]
    unlabeled = [c for c in candidates if c.granularity == UNLABELED]
    weak = [c for c in candidates if c.granularity == WEAK]
    out.append(spend([Candidate(c.image_id, c.granularity, ADD_LABELS, costs.cost(UNLABELED_TO_WEAK))
                      for c in (unlabeled[i] for i in rng.permutation(len(unlabeled)))], budget))
    boxes = [Candidate(c.image_id, WEAK, DRAW_BOXES, costs.cost(WEAK_TO_FULL)) for c in (weak[i] for i in rng.permutation(len(weak)))]
    boxes += [Candidate(c.image_id, UNLABELED, DRAW_BOXES, costs.cost(UNLABELED_TO_FULL))
              for c in (unlabeled[i] for i in rng.permutation(len(unlabeled)))]
    out.append(spend(boxes, budget))
    return [batch for batch in out if batch]


def run_oracle(store: Any, config: SimulationConfig, seed: int, *, points: list[dict[str, Any]],
               log: Path | None = None, on_point: Callable[[dict[str, Any]], Any] | None = None,
               k: int = 4) -> list[dict[str, Any]]:
    """The hindsight reference: every round, try each of :func:`proposals`' ``k`` batches on a copy of
    the store (``store.clone``), train one round on each, and keep the branch whose val mAP is best
    (the test mAP is what is reported, as for the strategies). It costs ``k`` trainings per round and is
    not resumable. It bounds what choosing among these batches can gain at this budget, not what any
    strategy could: a wider search would need more training."""
    settings = _settings(config.settings, seed, "random", config.per_round)
    rng = np.random.default_rng(seed)
    spent, started, branch_root = 0.0, time.monotonic(), Path(store.models_dir).parent / "oracle-branches"
    result = Trainer(store, settings).run()[-1]
    bought: list[Candidate] = []
    while True:
        point = {"strategy": ORACLE, "seed": seed, **_point(result, spent, time.monotonic() - started),
                 "bought": {}, "done": False}
        if points:
            points[-1]["bought"] = _bought(bought)
        done = spent >= config.budget - 1e-9
        batches = [] if done else proposals(store.candidates(), min(config.per_round, config.budget - spent),
                                            config.costs, rng, k)
        point["done"] = done or not batches
        points.append(point)
        _append(log, {"point": point})
        if on_point is not None:
            on_point(point)
        if point["done"]:
            return points
        best: tuple[float, Any, RoundResult, list[Candidate]] | None = None
        for b, batch in enumerate(batches):
            branch = store.clone(branch_root / f"round{result.round}-branch{b}")
            for c in batch:
                branch.reveal(c.image_id, c.action)
            outcome = Trainer(branch, settings).run()[-1]
            value = outcome.metrics.get("val", {}).get(MAP, -1.0)
            if best is None or value > best[0]:
                if best is not None:
                    shutil.rmtree(Path(best[1].models_dir).parent, ignore_errors=True)
                best = (value, branch, outcome, batch)
            else:
                shutil.rmtree(Path(branch.models_dir).parent, ignore_errors=True)
        # batches is not empty here, so the loop kept a best branch
        _, store, result, bought = cast("tuple[float, Any, RoundResult, list[Candidate]]", best)
        spent += sum(c.cost for c in bought)


def _bought(chosen: Sequence[Candidate]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in chosen:
        key = f"{c.granularity}->{'weak' if c.action == 'add image-level labels' else 'full'}"
        out[key] = out.get(key, 0) + 1
    return out


def _append(log: Path | None, record: Mapping[str, Any]) -> None:
    if log is None:
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as f:
        f.write(json.dumps(jsonable(record)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_log(log: Path | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(points, purchases planned after the last point) of a run's log (empty when there is none)."""
    points: list[dict[str, Any]] = []
    planned: list[dict[str, Any]] = []
    if log is None or not log.is_file():
        return points, planned
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: the records before it stand
            break
        if "point" in record:
            points.append(record["point"])
            planned = []
        elif "plan" in record:
            planned = record["plan"]
    return points, planned


def _settings(base: LoopSettings, seed: int, strategy: str, per_round: float) -> LoopSettings:
    splits = tuple(dict.fromkeys((*base.eval_splits, "val", "test")))
    return replace(base, seed=seed, eval_splits=splits, max_rounds=1, min_interval_s=0.0, suggest=True,
                   strategy=strategy, batch_units=per_round)


def _units_to_reach(spent: Sequence[float], maps: Sequence[float], target: float) -> float | None:
    """The first units spent at which the (linearly interpolated) curve reaches ``target`` (None: never)."""
    for k, (x, y) in enumerate(zip(spent, maps)):
        if y >= target - 1e-12:
            if k == 0:
                return float(x)
            x0, y0 = spent[k - 1], maps[k - 1]
            return float(x0 + (x - x0) * (target - y0) / (y - y0)) if y > y0 else float(x)
    return None


def _on_common_levels(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Runs' mAP-vs-units curves on one set of levels (every level any of them has), each run's curve
    linearly interpolated between its points and held at its last mAP after its last spend (a run that
    found nothing more to buy keeps the model it has). Runs spend unequal units per round (boxes come in
    5s), so averaging only the runs that happen to have a point at a level would mix different seeds at
    neighbouring levels; on these levels the mean of the runs' curves is exact."""
    levels = np.unique(np.concatenate([spent for spent, _ in curves]))
    return {"spent": levels.tolist(), "maps": np.stack([np.interp(levels, spent, maps) for spent, maps in curves])}


def summarize(runs: Sequence[Mapping[str, Any]], *, default: str = "cost_aware") -> dict[str, Any]:
    """Per strategy: the mean and standard deviation over seeds of test mAP at every level of units any
    of its runs spent (each run's curve interpolated there: :func:`_on_common_levels`), the mean
    area under the mAP-vs-units curve (trapezoid, divided by the units spanned), the final mAP and the
    units at which the mean curve reaches random's mean final mAP; per strategy other than random, the
    paired per-seed differences against random (``<strategy>_minus_random``); and ``goal``: whether
    ``default`` beats random in area by more than twice the sd of the paired difference, reaches
    random's final mAP within 60 % of random's units, and is not below the better of random_labels and
    random_boxes in area. Runs whose last point is not done yet are left out (``in_progress``)."""
    by: dict[str, dict[str, Any]] = {}
    per_seed: dict[tuple[str, int], dict[str, float]] = {}
    in_progress = []
    for run in runs:
        points = [p for p in run["points"] if p[MAP] is not None]
        if run["points"] and run["points"][-1].get("done") is False:  # still running: not in the means yet
            in_progress.append({"strategy": run["strategy"], "seed": run["seed"], "rounds": len(run["points"])})
            continue
        if not points:
            continue
        spent = np.array([p["spent"] for p in points], dtype=float)
        maps = np.array([p[MAP] for p in points], dtype=float)
        area = float(np.trapezoid(maps, spent) / (spent[-1] - spent[0])) if len(points) > 1 and spent[-1] > spent[0] else float(maps.mean())
        per_seed[(run["strategy"], run["seed"])] = {"area": area, "final": float(maps[-1]), "spent": float(spent[-1])}
        entry = by.setdefault(run["strategy"], {"curves": [], "areas": [], "finals": []})
        entry["areas"].append(area)
        entry["finals"].append(float(maps[-1]))
        entry["curves"].append((spent, maps))
    summary: dict[str, Any] = {}
    for strategy, entry in by.items():
        curves = _on_common_levels(entry["curves"])
        summary[strategy] = {
            "spent": curves["spent"],
            "mean_mAP": curves["maps"].mean(axis=0).tolist(),
            "std_mAP": curves["maps"].std(axis=0).tolist(),
            "mean_area": float(np.mean(entry["areas"])), "std_area": float(np.std(entry["areas"])),
            "mean_final_mAP": float(np.mean(entry["finals"])), "std_final_mAP": float(np.std(entry["finals"])),
            "seeds": len(entry["areas"]),
        }
    if "random" in summary:
        target = summary["random"]["mean_final_mAP"]
        for entry in summary.values():
            entry["units_to_random_final"] = _units_to_reach(entry["spent"], entry["mean_mAP"], target)
    seeds = sorted({seed for (_, seed) in per_seed})
    for strategy in by:
        if strategy == "random":
            continue
        pairs = [(per_seed[(strategy, x)], per_seed[("random", x)]) for x in seeds
                 if (strategy, x) in per_seed and ("random", x) in per_seed]
        if not pairs:
            continue
        area_diff = [d["area"] - r["area"] for d, r in pairs]
        final_diff = [d["final"] - r["final"] for d, r in pairs]
        summary[f"{strategy}_minus_random"] = {
            "area": {"mean": float(np.mean(area_diff)), "sd": float(np.std(area_diff, ddof=1)) if len(pairs) > 1 else None,
                     "per_seed": area_diff},
            "final_mAP": {"mean": float(np.mean(final_diff)), "per_seed": final_diff},
            "seeds_where_it_wins": int(sum(d > 0 for d in area_diff)), "seeds": len(pairs),
        }
    diff = summary.get(f"{default}_minus_random")
    if diff is not None and "random" in summary and default in summary:
        sd = diff["area"]["sd"]
        reach = summary[default]["units_to_random_final"]
        random_units = summary["random"]["spent"][-1]
        controls = [summary[c]["mean_area"] for c in ("random_labels", "random_boxes") if c in summary]
        summary["goal"] = {
            "strategy": default,
            "area_beats_random_by_2sd": bool(sd is not None and diff["area"]["mean"] > 2 * sd),
            "reaches_random_final_within_60pct": bool(reach is not None and reach <= 0.6 * random_units),
            "not_below_best_control": bool(controls) and summary[default]["mean_area"] >= max(controls),
            "controls_ran": [c for c in ("random_labels", "random_boxes") if c in summary],
        }
    if in_progress:
        summary["in_progress"] = in_progress
    return summary


def figure(results: Mapping[str, Any]):
    """A plotly figure: test mAP against units spent, one bold mean curve per strategy, thin per seed."""
    import plotly.graph_objects as go

    colors = {"random": "#7f7f7f", "disagreement": "#d62728", "random_boxes": "#1f77b4", "random_labels": "#17becf",
              "uncertainty": "#ff7f0e", "diversity": "#9467bd", "uncertainty_diversity": "#8c564b",
              "cost_aware": "#2ca02c"}
    fig = go.Figure()
    for run in results["runs"]:
        points = [p for p in run["points"] if p[MAP] is not None]
        fig.add_trace(go.Scatter(
            x=[p["spent"] for p in points], y=[100 * p[MAP] for p in points], mode="lines+markers",
            line={"width": 1, "color": colors.get(run["strategy"])}, opacity=0.35, showlegend=False,
            name=f"{run['strategy']} seed {run['seed']}",
        ))
    for strategy, entry in results["summary"].items():
        if strategy in STRATEGIES:
            fig.add_trace(go.Scatter(
                x=entry["spent"], y=[100 * m for m in entry["mean_mAP"]], mode="lines+markers",
                error_y={"type": "data", "array": [100 * v for v in entry.get("std_mAP", [])], "visible": True},
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
    write_json(json_path, results)
    figure(results).write_html(html_path, include_plotlyjs=True)
    return {"json": json_path, "html": html_path}


#: How a run was executed, not what it measured: may differ between the parts of one merged simulation.
_WHERE_IT_RAN = ("device", "num_workers")
#: Dataset fields a simulation written before they existed ran with.
_DATASET_DEFAULTS = {"ceiling": False, "plan_seed": None}


def merge_simulations(paths: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Combine simulations of one study that ran apart (one process per seed or per strategy) into one
    ``simulation.json`` / ``simulation.html`` in ``out_dir``, with the summary over all their runs.

    The parts must agree on the dataset (incl. ``ceiling`` and ``plan_seed``: a ceiling or a noise floor
    is another study) and on the config except the strategies and seeds they ran and where they ran;
    a (strategy, seed) run may appear only once. Each part's machine is kept in ``merged_from``.
    Raises ValueError naming the file and what differs."""
    if len(paths) < 2:
        raise ValueError("merge needs at least two simulation.json files")
    parts = []
    for path in map(Path, paths):
        try:
            part = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable simulation.json ({exc})") from exc
        if not isinstance(part, dict) or not all(k in part for k in ("config", "runs", "dataset")):
            raise ValueError(f"{path}: not a simulation.json (needs config, runs and dataset)")
        parts.append((path, part))

    def study(part: Mapping[str, Any]) -> dict[str, Any]:
        config = {k: v for k, v in part["config"].items() if k not in ("strategies", "seeds")}
        config["settings"] = {k: v for k, v in config.get("settings", {}).items()
                              if k not in ("strategy", "seed", *_WHERE_IT_RAN)}
        return {**config, "dataset": {**_DATASET_DEFAULTS, **part["dataset"]}}

    first_path, first = parts[0]
    theirs = study(first)
    owner: dict[tuple[str, int], Path] = {}
    for path, part in parts:
        if (mine := study(part)) != theirs:
            differ = sorted({*mine, *theirs} - {k for k in mine if mine.get(k) == theirs.get(k)})
            raise ValueError(f"{path} and {first_path} are not the same study: their {', '.join(differ)} differ")
        for run in part["runs"]:
            key = (run["strategy"], int(run["seed"]))
            if key in owner:
                raise ValueError(f"{path} and {owner[key]} both hold the run {key[0]} seed {key[1]}")
            owner[key] = path
    runs = sorted((run for _, part in parts for run in part["runs"]), key=lambda r: (r["seed"], r["strategy"]))
    results = {
        "config": {**first["config"],
                   "strategies": sorted({s for _, part in parts for s in part["config"]["strategies"]}),
                   "seeds": sorted({int(s) for _, part in parts for s in part["config"]["seeds"]})},
        "machine": first.get("machine"),
        "merged_from": [{"path": str(path), "machine": part.get("machine"),
                         "runs": [f"{r['strategy']} seed {r['seed']}" for r in part["runs"]]} for path, part in parts],
        "runs": runs,
        "summary": summarize(runs),
        "dataset": first["dataset"],
    }
    write_results(results, out_dir)
    return results
