"""The granularity study (the paper's Tables 1 and 2): mAP against the annotation mix, per method.

A fully annotated pool is relabelled into mixes: for each fraction ``f`` and seed, ``f`` of the pool
keeps its boxes (full), the rest keeps only image-level labels (weak) or nothing (unlabeled). Optional
extra weak and unlabeled files join every mix. Each method trains on each mix; all methods of a
(mix, seed) share the same selection and, with ``pretrain_epochs``, start from the same RetinaNet
pre-training (the authors' recipe): its best epoch's weights and Adam state; the RetinaNet baseline
continues from it on the full images for the same epochs as every other method. Model selection uses
a validation split held out of the pool; the reported metrics are on a patient-disjoint test set.

Results (``results.json``, ``results.csv``, ``figure.html`` in ``out_dir``) are rewritten after every
run, so a long sweep can be watched, interrupted and resumed (finished runs are skipped). Sweeps of the
same study run in parallel (other mixes or seeds, in other processes or on other machines) combine into
one with :func:`merge_results` (``python scripts/sweep.py merge A/results.json B/results.json --out C``).

``results.json`` schema ("oxnet.sweep/1")::

    {"schema": "oxnet.sweep/1", "config": {...SweepConfig...}, "machine": {...}, "classes": [...],
     "pool": {"images": int, "val_images": int, "test_images": int, "extra_weak": int, "extra_unlabeled": int},
     "started": iso time, "updated": iso time, "wall_seconds": float,
     "rows": [{"method", "full_fraction", "seed", "n_full", "n_weak", "n_unlabeled", "batch_size", "train_seconds",
               "epochs_trained", "best_epoch", "val_mAP", "mAP", "AP40", "AP50", "AP75", "AP_S", "AP_M", "AP_L",
               "mean_image_auc", "per_class_AP": {...}, "teacher_mAP"}],
     "summary": [{"method", "full_fraction", "n_full", "n_weak", "n_unlabeled", "seeds",
                  "mAP_mean", "mAP_std", "AP40_mean", "AP75_mean"}],
     "merged_from": [{"path", "machine", "wall_seconds", "device", "num_workers"}]}
                   (merged results only; the top-level wall_seconds is their sum)

Metrics are fractions in [0, 1] (the figure shows percent); ``n_*`` count the images the mix offered
(a method uses those of the granularities it can learn from); ``teacher_mAP`` is the EMA teacher's
test mAP for methods with a teacher, else null.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, UTC
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from oxnet.data.records import Record, Records
from oxnet.data.splits import patient_key, split_patients
from oxnet.training.settings import METHODS, TrainConfig
from oxnet.files import atomic_write, jsonable, write_json, write_text
from oxnet.machine import describe
from oxnet.vocabulary import AP40, AP75, FULL, GRANULARITIES, MAP, METRIC_KEYS, PER_CLASS_AP, UNLABELED, WEAK, Granularity

logger = logging.getLogger(__name__)
SCHEMA = "oxnet.sweep/1"


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep and the training budget of every run.

    Args:
        full_fractions: fractions of the training pool that keep their boxes.
        weak_fraction: share of the rest of the pool that keeps image-level labels (the remainder
            becomes unlabeled); 1.0 = the paper's Table 2 upper rows.
        methods: names of :data:`oxnet.training.settings.METHODS`.
        seeds: one run per seed and mix; the seed picks the full images and seeds training.
        train: the :class:`TrainConfig` template of every run (preset, epochs, pretrain_epochs,
            batch_size, steps_per_epoch, lr, ...); ``method``, ``seed`` and ``out_dir`` are set per run.
        out_dir: where results and checkpoints go.
        equal_full_per_step: every method sees as many box-labelled images per step as RetinaNet's
            batch holds (``train.batch_size``); methods that also learn from weak/unlabeled images get
            their share of those on top (a larger batch). Without it a mixed batch of the same size
            would halve the box supervision per step, confounding "more granularities" with "fewer
            boxes" at a fixed budget.
    """

    full_fractions: tuple[float, ...] = (0.1, 0.25, 0.5)
    weak_fraction: float = 1.0
    methods: tuple[str, ...] = ("retinanet", "oxnet")
    seeds: tuple[int, ...] = (0, 1, 2)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs/sweep"
    equal_full_per_step: bool = True

    def __post_init__(self) -> None:
        if not self.full_fractions or any(not 0 < f <= 1 for f in self.full_fractions):
            raise ValueError(f"full_fractions must be in (0, 1], got {self.full_fractions}")
        if not 0 <= self.weak_fraction <= 1:
            raise ValueError(f"weak_fraction must be in [0, 1], got {self.weak_fraction}")
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise ValueError(f"methods must be among {sorted(METHODS)}, got {list(self.methods)}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")


def relabel(
    pool: Sequence[Record],
    full_fraction: float,
    *,
    weak_fraction: float = 1.0,
    seed: int = 0,
    weak_labels: Mapping[int, Sequence[int]] | None = None,
) -> list[Record]:
    """Relabel a fully annotated pool into a full / weak / unlabeled mix.

    ``round(full_fraction * len(pool))`` images (at least one), picked by ``seed``, keep their boxes;
    ``weak_fraction`` of the others keep image-level labels (``weak_labels[image_id]`` when given, for
    example NIH's text-mined findings, else the classes of their boxes) and drop their boxes; the rest
    drop everything. Records are new objects; the pool is unchanged.
    """
    if any(r.granularity != FULL for r in pool):
        raise ValueError("the pool must be fully labeled (every record 'full')")
    order = np.random.default_rng(seed).permutation(len(pool))
    n_full = max(1, round(full_fraction * len(pool)))
    n_weak = round(weak_fraction * (len(pool) - n_full))
    out = []
    for rank, i in enumerate(order.tolist()):
        r = pool[i]
        if rank < n_full:
            out.append(r)
            continue
        if rank < n_full + n_weak:
            labels = tuple(weak_labels[r.image_id]) if weak_labels is not None else r.image_labels
            out.append(Record(r.image_id, r.path, WEAK, r.width, r.height, image_labels=labels,
                              patient_id=r.patient_id, negative=not labels))
        else:
            out.append(Record(r.image_id, r.path, UNLABELED, r.width, r.height, patient_id=r.patient_id))
    return out


def batch_with_full(
    full_per_batch: int, proportions: Mapping[str, float], granularities: Sequence[str], counts: Mapping[str, int]
) -> int:
    """Batch size whose full share (the proportions renormalised over the granularities a method uses and
    the mix offers, as :class:`oxnet.data.MixedBatchSampler` does) holds ``full_per_batch`` images."""
    used = [g for g in granularities if counts.get(g, 0) and proportions.get(g, 0) > 0]
    total = sum(proportions[g] for g in used)
    if FULL not in used or total <= 0:
        raise ValueError(f"the mix offers no full images to this method ({dict(counts)})")
    return math.ceil(full_per_batch * total / proportions[FULL] - 1e-9)


def split_by_patient(records: Sequence[Record], fraction: float, *, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(rest, held_out): about ``fraction`` of the patients (all their images) are held out, placed by
    the one patient split (:mod:`oxnet.data.splits`: the store's rule, as its val split). ValueError
    when no patient is held out (too few patients for ``fraction``)."""
    keys = [patient_key(r.patient_id, r.image_id) for r in records]
    placed = split_patients(keys, seed=seed, fractions=(1.0 - fraction, fraction, 0.0), require=("val",))
    return ([r for r, k in zip(records, keys, strict=True) if placed[k] != "val"],
            [r for r, k in zip(records, keys, strict=True) if placed[k] == "val"])


def check_patient_disjoint(a: Sequence[Record], b: Sequence[Record], what: str) -> None:
    shared = {r.patient_id for r in a if r.patient_id is not None} & {r.patient_id for r in b if r.patient_id is not None}
    if shared:
        raise ValueError(f"{what} share {len(shared)} patients (e.g. {sorted(map(str, shared))[:3]}): the test must be patient-disjoint")


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds, per (method, full fraction)."""
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["full_fraction"]), []).append(row)
    summary = []
    for (method, fraction), group in sorted(groups.items()):
        maps = [g[MAP] for g in group if g[MAP] is not None]
        summary.append({
            "method": method, "full_fraction": fraction, "n_full": group[0]["n_full"], "n_weak": group[0]["n_weak"],
            "n_unlabeled": group[0]["n_unlabeled"], "seeds": len(group),
            "mAP_mean": statistics.fmean(maps) if maps else None,
            "mAP_std": statistics.stdev(maps) if len(maps) > 1 else 0.0 if maps else None,
            "AP40_mean": _mean(g[AP40] for g in group), "AP75_mean": _mean(g[AP75] for g in group),
        })
    return summary


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def figure(results: Mapping[str, Any]):
    """plotly figure: test mAP (%) against the number of full images, one line per method, error
    bars = standard deviation over seeds."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for method in dict.fromkeys(s["method"] for s in results["summary"]):
        points = sorted((s for s in results["summary"] if s["method"] == method and s["mAP_mean"] is not None),
                        key=lambda s: s["n_full"])
        fig.add_trace(go.Scatter(
            x=[s["n_full"] for s in points], y=[100 * s["mAP_mean"] for s in points],
            error_y={"type": "data", "array": [100 * s["mAP_std"] for s in points]},
            mode="lines+markers", name=method,
            customdata=[[s["n_weak"], s["n_unlabeled"], s["seeds"]] for s in points],
            hovertemplate="%{x} full, %{customdata[0]} weak, %{customdata[1]} unlabeled<br>"
                          "mAP %{y:.2f} (%{customdata[2]} seeds)<extra>" + method + "</extra>",
        ))
    preset = results["config"]["train"]["preset"]
    fig.update_layout(
        title=f"Test mAP (IoU 0.40:0.75) against annotation granularity - preset {preset}",
        xaxis_title="fully labeled (box) training images", yaxis_title="mAP (%)", template="plotly_white",
    )
    return fig


def _write(results: dict[str, Any], out_dir: Path) -> None:
    """results.json, results.csv and figure.html, each replaced atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)

    write_json(out_dir / "results.json", results, indent=2)
    columns = ["method", "full_fraction", "seed", "n_full", "n_weak", "n_unlabeled", "batch_size", "epochs_trained", "best_epoch",
               "train_seconds", "val_mAP", *METRIC_KEYS, "teacher_mAP"]

    with atomic_write(out_dir / "results.csv") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["rows"])
    if results["summary"]:
        write_text(out_dir / "figure.html", figure(results).to_html(include_plotlyjs=True))


def run_sweep(
    pool: Records,
    val: Sequence[Record],
    test: Sequence[Record],
    config: SweepConfig,
    *,
    extra_weak: Sequence[Record] = (),
    extra_unlabeled: Sequence[Record] = (),
    weak_labels: Mapping[int, Sequence[int]] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train every method on every mix and seed; evaluate on ``test``. Returns the results dict (and
    writes it to ``config.out_dir`` after every run). ``on_row`` receives each new row (e.g. to store it)."""
    from oxnet.training.checkpoint import load_checkpoint, model_from_state
    from oxnet.evaluation.predict import evaluate_model
    from oxnet.training.distributed import resolve_device
    from oxnet.training.engine import fit

    classes = list(pool.classes)
    check_patient_disjoint(list(pool) + list(val), test, "training/validation and test images")
    out_dir = Path(config.out_dir)
    path = out_dir / "results.json"
    previous = json.loads(path.read_text()) if path.is_file() else None
    results = {
        "schema": SCHEMA,
        "config": jsonable(asdict(config)),
        "machine": describe(),
        "classes": classes,
        "pool": {"images": len(pool), "val_images": len(val), "test_images": len(test),
                 "extra_weak": len(extra_weak), "extra_unlabeled": len(extra_unlabeled)},
        "started": previous["started"] if previous else _now(),
        "wall_seconds": previous["wall_seconds"] if previous else 0.0,
        "rows": previous["rows"] if previous else [],
    }
    if previous and _with_train_defaults(previous["config"]) != results["config"]:
        raise ValueError(f"{path} belongs to a sweep with other settings; use another out_dir")
    done = {(r["method"], r["full_fraction"], r["seed"]) for r in results["rows"]}
    device = resolve_device(config.train.device)
    started = time.perf_counter()
    base_wall = results["wall_seconds"]

    for fraction in config.full_fractions:
        for seed in config.seeds:
            mix = relabel(pool, fraction, weak_fraction=config.weak_fraction, seed=seed, weak_labels=weak_labels)
            train = Records(mix + list(extra_weak) + list(extra_unlabeled), classes=classes)
            counts: dict[str, int] = {g: sum(r.granularity == g for r in train) for g in GRANULARITIES}
            run_dir = out_dir / f"full{fraction:g}_seed{seed}"
            template = replace(config.train, seed=seed)
            pretrain = run_dir / "pretrain.pt"
            needs_pretrain = template.pretrain_epochs > 0 and any(m != "retinanet" for m in config.methods)
            if needs_pretrain and not pretrain.is_file() and any(
                (m, fraction, seed) not in done for m in config.methods if m != "retinanet"
            ):
                # RetinaNet on the full images: its best epoch starts every method of this mix.
                leg = replace(template, method="retinanet", epochs=template.pretrain_epochs, pretrain_epochs=0,
                              out_dir=str(run_dir / "pretrain"))
                history = fit(train, val, leg, classes=classes, progress=progress)
                shutil.copyfile(history.best_checkpoint or history.last_checkpoint, pretrain)
            for method in config.methods:
                if (method, fraction, seed) in done:
                    continue
                if method == "retinanet" and not needs_pretrain:
                    run = replace(template, method=method, epochs=template.pretrain_epochs + template.epochs,
                                  pretrain_epochs=0, out_dir=str(run_dir / "retinanet"))
                else:  # every method, RetinaNet too, continues from the same pre-training (weights and Adam state)
                    batch = template.batch_size
                    if config.equal_full_per_step:
                        batch = batch_with_full(template.batch_size, template.proportions, METHODS[method]["granularities"], counts)
                    run = replace(template, method=method, pretrain_epochs=0, out_dir=str(run_dir / method),
                                  init_checkpoint=str(pretrain) if needs_pretrain else None, batch_size=batch)
                t0 = time.perf_counter()
                history = fit(train, val, run, classes=classes, progress=progress)
                seconds = time.perf_counter() - t0
                state = load_checkpoint(history.best_checkpoint or history.last_checkpoint)
                metrics = evaluate_model(model_from_state(state).to(device), test, classes, device=device)
                teacher_map = None
                if state.get("teacher") is not None:
                    teacher = model_from_state(state, weights="teacher").to(device)
                    teacher_map = evaluate_model(teacher, test, classes, device=device)[MAP]
                row = {
                    "method": method, "full_fraction": fraction, "seed": seed,
                    "n_full": counts[FULL], "n_weak": counts[WEAK], "n_unlabeled": counts[UNLABELED],
                    "batch_size": run.batch_size,
                    "train_seconds": round(seconds, 1), "epochs_trained": len(history.epochs),
                    "best_epoch": history.best_epoch, "val_mAP": history.best_metric,
                    **{k: metrics.get(k) for k in METRIC_KEYS},
                    PER_CLASS_AP: metrics.get(PER_CLASS_AP), "teacher_mAP": teacher_map,
                }
                results["rows"].append(row)
                results["summary"] = summarize(results["rows"])
                results["updated"] = _now()
                results["wall_seconds"] = round(base_wall + time.perf_counter() - started, 1)
                _write(results, out_dir)
                logger.info("%s full=%g seed=%d: test mAP %.4f (%.0f s)", method, fraction, seed, row[MAP] or 0, seconds)
                if on_row is not None:
                    on_row(row)
    results["summary"] = summarize(results["rows"])
    results["updated"] = _now()
    results["wall_seconds"] = round(base_wall + time.perf_counter() - started, 1)
    _write(results, out_dir)
    return results


_WHERE_IT_RAN = ("device", "num_workers")  # how a sweep ran, not what it measured


def _with_train_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """A stored sweep config with the :class:`TrainConfig` fields added since it was written at their
    defaults (its runs trained with them), so that an older sweep still resumes and merges."""
    return {**config, "train": {**jsonable(TrainConfig().to_dict()), **config["train"]}}


def merge_results(paths: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Combine the results of sweeps of one study that ran apart (other mixes or seeds) into one
    results.json / results.csv / figure.html in ``out_dir``. Their settings must agree except for the
    fractions and seeds swept, out_dir and where they ran (device, loader workers: each part's are kept
    in ``merged_from``); a (method, fraction, seed) run may appear only once."""
    if len(paths) < 2:
        raise ValueError("merge needs at least two results.json files")
    parts = []
    for path in map(Path, paths):
        try:
            part = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable results.json ({exc})") from exc
        if part.get("schema") != SCHEMA:
            raise ValueError(f"{path}: schema {part.get('schema')!r}, expected {SCHEMA!r}")
        parts.append((path, part))

    def study(part: Mapping[str, Any]) -> dict[str, Any]:
        config = {k: v for k, v in _with_train_defaults(part["config"]).items() if k not in ("full_fractions", "seeds", "out_dir")}
        config["train"] = {k: v for k, v in config["train"].items() if k not in _WHERE_IT_RAN}
        return {"config": config, "classes": part["classes"], "pool": part["pool"]}

    first_path, first = parts[0]
    owner: dict[tuple, Path] = {}
    for path, part in parts:
        if study(part) != study(first):
            differ = sorted(k for k, v in study(part)["config"].items() if v != study(first)["config"].get(k))
            what = f"config ({', '.join(differ)})" if differ else "classes or pool"
            raise ValueError(f"{path} and {first_path} are not the same study: their {what} differ")
        for row in part["rows"]:
            key = (row["method"], row["full_fraction"], row["seed"])
            if key in owner:
                raise ValueError(f"{path} and {owner[key]} both hold the run {key}")
            owner[key] = path
    rows = sorted((row for _, part in parts for row in part["rows"]),
                  key=lambda r: (r["full_fraction"], r["seed"], r["method"]))
    results = {
        "schema": SCHEMA,
        "config": {
            **first["config"],
            "full_fractions": sorted({f for _, part in parts for f in part["config"]["full_fractions"]}),
            "seeds": sorted({s for _, part in parts for s in part["config"]["seeds"]}),
            "out_dir": str(out_dir),
        },
        "machine": first["machine"],
        "classes": first["classes"],
        "pool": first["pool"],
        "started": min(part["started"] for _, part in parts),
        "updated": _now(),
        "wall_seconds": round(sum(part["wall_seconds"] for _, part in parts), 1),
        "rows": rows,
        "summary": summarize(rows),
        "merged_from": [{"path": str(path), "machine": part["machine"], "wall_seconds": part["wall_seconds"],
                         **{k: part["config"]["train"][k] for k in _WHERE_IT_RAN}} for path, part in parts],
    }
    _write(results, Path(out_dir))
    return results


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# Loading a study and the command line (scripts/sweep.py)
# --------------------------------------------------------------------------------------------------
@dataclass
class Study:
    pool: Records
    val: list[Record]
    test: list[Record]
    extra_weak: list[Record]
    extra_unlabeled: list[Record]
    weak_labels: dict[int, tuple[int, ...]] | None


def load_study(
    dataset: str | Path,
    *,
    images: str | Path | None = None,
    test: str | Path | None = None,
    test_fold: int | None = None,
    pool_folds: Sequence[int] | None = None,
    val: str | Path | None = None,
    val_fraction: float = 0.15,
    extra_weak: Sequence[str | Path] = (),
    extra_unlabeled: Sequence[str | Path] = (),
    weak_labels: str = "boxes",
    seed: int = 0,
) -> Study:
    """Read the pool, validation, test and extra files of a study.

    Args:
        dataset: fully labeled COCO file (the pool). Its images may carry ``suggested_fold`` (nih-cxr).
        images: image folder of every file (default: each file's folder).
        test / test_fold: an explicit test file, or the pool's images with ``suggested_fold == test_fold``.
        pool_folds: keep only pool images of these folds (after taking the test fold out).
        val / val_fraction: an explicit validation file, or that fraction of the pool's patients held out.
        extra_weak / extra_unlabeled: COCO files added to every mix as weak / unlabeled images.
        weak_labels: "boxes" (a relabelled weak image keeps the classes of its boxes) or "nih" (it keeps
            its ``nih_finding_labels`` restricted to the pool's classes, i.e. report-mined labels).
    """
    from oxnet.data.records import records_from_coco

    if (test is None) == (test_fold is None):
        raise ValueError("give exactly one of test (a file) and test_fold (a fold of the pool)")
    if weak_labels not in ("boxes", "nih"):
        raise ValueError(f"weak_labels must be 'boxes' or 'nih', got {weak_labels!r}")
    coco = json.loads(Path(dataset).read_text())
    root = images if images is not None else Path(dataset).parent
    everything = records_from_coco(dataset, image_root=root)
    classes = list(everything.classes)
    folds = {im["id"]: im.get("suggested_fold") for im in coco["images"]}
    if test is None:  # then test_fold is given (exactly one of them is)
        if all(f is None for f in folds.values()):
            raise ValueError(f"{dataset}: no image has 'suggested_fold'; pass an explicit test file")
        test_records = [r for r in everything if folds[r.image_id] == test_fold]
        rest = [r for r in everything if folds[r.image_id] != test_fold]
    else:
        test_records = list(records_from_coco(test, image_root=images if images is not None else Path(test).parent,
                                              classes=classes))
        rest = list(everything)
    if pool_folds is not None:
        rest = [r for r in rest if folds[r.image_id] in set(pool_folds)]
    if val is not None:
        val_records = list(records_from_coco(val, image_root=images if images is not None else Path(val).parent,
                                             classes=classes))
        pool = rest
    else:
        pool, val_records = split_by_patient(rest, val_fraction, seed=seed)
    check_patient_disjoint(pool, test_records, "pool and test")
    check_patient_disjoint(val_records, test_records, "validation and test")

    def extra(files: Sequence[str | Path], granularity: Granularity) -> list[Record]:
        out: list[Record] = []
        for f in files:
            out += records_from_coco(f, granularity=granularity, classes=classes,
                                     image_root=images if images is not None else Path(f).parent)
        return out

    nih = None
    if weak_labels == "nih":
        index = {name: i for i, name in enumerate(classes)}
        nih = {im["id"]: tuple(sorted(index[n] for n in im.get("nih_finding_labels", []) if n in index))
               for im in coco["images"]}
        missing = [im["id"] for im in coco["images"] if "nih_finding_labels" not in im]
        if missing:
            raise ValueError(f"{dataset}: weak_labels='nih' but images {missing[:3]} have no 'nih_finding_labels'")
    return Study(Records(pool, classes=classes), val_records, test_records,
                 extra(extra_weak, WEAK), extra(extra_unlabeled, UNLABELED), nih)


def _numbers(value: str, kind=float) -> tuple:
    return tuple(kind(v) for v in value.split(",") if v)


def _seeds(value: str) -> tuple[int, ...]:
    """"3" -> (0, 1, 2); "0,4" -> (0, 4)."""
    return tuple(range(int(value))) if "," not in value else _numbers(value, int)


def build_parser():
    import argparse

    from oxnet.cli import add_recipe_options, key_value
    from oxnet.modeling.config import PRESETS

    p = argparse.ArgumentParser(
        prog="python scripts/sweep.py",
        description="The granularity study (the paper's Table 2): relabel a fully annotated pool into "
        "full/weak/unlabeled mixes, train each method on each mix and seed, and report test mAP.",
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", required=True, help="fully labeled COCO file: the pool to relabel")
    d.add_argument("--images", help="image folder (default: each file's folder)")
    d.add_argument("--test", help="test COCO file (patient-disjoint from the pool)")
    d.add_argument("--test-fold", type=int, help="use the pool's images with suggested_fold == K as the test set")
    d.add_argument("--pool-folds", type=lambda v: _numbers(v, int), help="keep only these folds in the pool, e.g. 0,1,2")
    d.add_argument("--val", help="validation COCO file (default: hold out --val-fraction of the pool's patients)")
    d.add_argument("--val-fraction", type=float, default=0.15)
    d.add_argument("--extra-weak", action="append", default=[], help="COCO file added to every mix as weak images")
    d.add_argument("--extra-unlabeled", action="append", default=[], help="COCO file added as unlabeled images")
    d.add_argument("--weak-labels", choices=("boxes", "nih"), default="boxes",
                   help="labels a relabelled weak image keeps: its box classes, or its NIH report-mined findings")
    s = p.add_argument_group("sweep")
    s.add_argument("--full", type=_numbers, default=(0.1, 0.25, 0.5), help="fractions of the pool keeping boxes")
    s.add_argument("--weak-fraction", type=float, default=1.0, help="share of the rest that keeps image-level labels")
    s.add_argument("--methods", type=lambda v: tuple(v.split(",")), default=("retinanet", "oxnet"),
                   help=f"comma list of {','.join(METHODS)}")
    s.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="a count (3) or a list (0,1,2)")
    t = p.add_argument_group("training budget (every run)")
    t.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    t.add_argument("--weights", help="backbone start of every run: a torchvision ResNet state_dict (e.g. from oxnet "
                   "pretrain), random or imagenet (default: the preset's)")
    t.add_argument("--model-option", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="a ModelConfig field of every run (repeatable), e.g. backbone_norm=group or "
                        "anchor_sizes=(24,48,96,192,384); as oxnet train --model-option")
    t.add_argument("--epochs", type=int, default=6, help="epochs of each method after the shared pre-training")
    t.add_argument("--pretrain-epochs", type=int, default=4, help="RetinaNet epochs on the full images that start every method")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--steps-per-epoch", type=int, help="same number of steps for every method (recommended)")
    t.add_argument("--lr", type=float, default=1e-4,
                   help="Adam learning rate of every run (from scratch; the same for every method)")
    t.add_argument("--early-stop-patience", type=int)
    add_recipe_options(t)
    t.add_argument("--num-workers", type=int, default=0)
    t.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/sweep", help="results.json, results.csv, figure.html and checkpoints")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    return p


def config_from_args(args) -> SweepConfig:
    from oxnet.cli import recipe_options

    train = TrainConfig(
        preset=args.preset, epochs=args.epochs, pretrain_epochs=args.pretrain_epochs, batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch, lr=args.lr, early_stop_patience=args.early_stop_patience,
        num_workers=args.num_workers, device=args.device, plateau_patience=2,
        model={**dict(args.model_option), **({"weights": args.weights} if args.weights else {})}, **recipe_options(args),
    )
    train.model_config(num_classes=1)  # a bad model option fails here, before the data is read
    return SweepConfig(full_fractions=args.full, weak_fraction=args.weak_fraction, methods=args.methods,
                       seeds=args.seeds, train=train, out_dir=args.out)


def main(argv: Sequence[str] | None = None, *, on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    argv = list(argv if argv is not None else sys.argv[1:])
    if argv[:1] == ["merge"]:
        import argparse

        p = argparse.ArgumentParser(prog="python scripts/sweep.py merge",
                                    description="combine the results.json of sweeps of one study run apart")
        p.add_argument("results", nargs="+", help="results.json files")
        p.add_argument("--out", required=True, help="folder for the merged results.json, results.csv, figure.html")
        args = p.parse_args(argv[1:])
        try:
            return merge_results(args.results, args.out)
        except ValueError as exc:
            p.error(str(exc))
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    study = load_study(
        args.dataset, images=args.images, test=args.test, test_fold=args.test_fold, pool_folds=args.pool_folds,
        val=args.val, val_fraction=args.val_fraction, extra_weak=args.extra_weak,
        extra_unlabeled=args.extra_unlabeled, weak_labels=args.weak_labels,
    )
    return run_sweep(study.pool, study.val, study.test, config, extra_weak=study.extra_weak,
                     extra_unlabeled=study.extra_unlabeled, weak_labels=study.weak_labels, on_row=on_row,
                     progress=args.progress)
