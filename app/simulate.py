"""Does the loop help? Replay it with an oracle annotator: ``oxnet-simulate`` (``python -m app.simulate``,
``scripts/simulate.py``). The simulation's logic is :mod:`oxnet.experiments.simulate`; this module joins it
to the store: :class:`OracleStore` (a :class:`db.workbench.SqlStore` whose oracle reveals the hidden labels)
implements :class:`oxnet.experiments.simulate.SimulationStore`.

    oxnet-simulate --dataset synth/annotations/synthetic.json --images synth/images \
        --strategy random,cost_aware --budget 40 --per-round 10 --seeds 0,1 --preset tiny --out runs/sim

Writes OUT/simulation.json (every round: units spent, test mAP, label mix, what was bought) and
OUT/simulation.html (plotly, test mAP against units spent, one curve per strategy). One SQLite store and
one log (OUT/logs/<strategy>-seed<seed>.jsonl) per run: started again with the same OUT, a run continues
from its last finished round (``--fresh`` starts over). Parts run apart (one process per seed) become one
study with ``oxnet-simulate merge A/simulation.json B/simulation.json --out C``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.engine import init_db, make_sessionmaker
from db.importers import import_coco
from db.lifecycle import BoxInput, mark_boxes_complete, set_boxes, set_image_labels
from db.models import Granularity, Image, ModelVersion, Suggestion
from db.projects import DEFAULT_PROJECT, class_names, get_project
from db.versions import serving_model_version
from db.workbench import SqlStore
from oxnet.active.loop import TRAINER_PRESETS
from oxnet.experiments.simulate import (
    ORACLE, STRATEGIES, Candidate, CostModel, SimulationConfig, hide_labels, merge_simulations, plan_labels, run_simulation,
    write_results,
)
from oxnet.vocabulary import ADD_LABELS, FULL, UNLABELED, UNLABELED_TO_FULL, WEAK, WEAK_TO_FULL

__all__ = ["OracleStore", "main", "reopen_simulation_store", "simulation_store"]


DEFAULT_COSTS = CostModel()  # frozen: one shared default is safe


class OracleStore(SqlStore):
    """:class:`SqlStore` plus the simulation's oracle annotator (:class:`oxnet.experiments.simulate.SimulationStore`).

    ``truth`` maps an image's stored path to its hidden annotation: (present class names, boxes as
    ``(class, x1, y1, x2, y2)`` in original pixels). Upgrades go through :mod:`db.lifecycle`, so the
    audit log and granularities stay right. Only the newest model version keeps its checkpoint file
    (a simulation makes many).
    """

    def __init__(self, sessions: sessionmaker[Session], *, truth: Mapping[str, tuple[list[str], list[BoxInput]]],
                 annotator: str = "oracle", costs: CostModel = DEFAULT_COSTS, **kwargs: Any) -> None:
        super().__init__(sessions, **kwargs)
        self.truth = dict(truth)
        self.annotator = annotator
        self.costs = costs

    def annotation_costs(self) -> CostModel:
        """The simulation's costs (its oracle takes no time)."""
        return self.costs

    def candidates(self) -> list[Candidate]:
        """The serving version's ranked suggestions, as the live queue shows them: an image already at or
        past the suggestion's target (labelled since that version ranked it, e.g. when newer versions
        stayed candidates) is not offered, so no unit is spent on an upgrade that changes nothing."""
        with self.sessions.begin() as session:
            version = serving_model_version(session, self.project)
            query = (
                select(Image.id, Image.granularity, Suggestion.action, Suggestion.reason)
                .join(Suggestion, Suggestion.image_id == Image.id)
                .where(Suggestion.model_version_id == (version.id if version else -1),
                       Image.granularity != Granularity.FULL)
                .order_by(Suggestion.score.desc(), Suggestion.id)
            )
            return [Candidate(i, g.value, a.value, float((r or {}).get("cost") or self.costs.of(a.value, g.value)),
                              (r or {}).get("gain")) for i, g, a, r in session.execute(query) if g.rank < a.target.rank]

    def granularity(self, image_id: int) -> str:
        with self.sessions.begin() as session:
            image = session.get(Image, image_id)
            if image is None:
                raise ValueError(f"no image with id {image_id}")
            return image.granularity.value

    def clone(self, folder: str | Path) -> OracleStore:
        """A copy of this SQLite store and its newest checkpoint in ``folder`` (a what-if branch of the
        simulation's hindsight oracle); the copy's model versions point at the copied checkpoint."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "store.db"
        source = self.sessions.kw["bind"]
        if source.dialect.name != "sqlite":
            raise ValueError(f"clone needs a SQLite store, not {source.dialect.name}")
        with source.connect() as connection:
            connection.exec_driver_sql(f"VACUUM INTO '{target}'")
        sessions = make_sessionmaker(init_db(f"sqlite:///{target}"))
        models = folder / "models"
        with sessions.begin() as session:
            for version in session.scalars(select(ModelVersion).where(ModelVersion.checkpoint_path.is_not(None))):
                assert version.checkpoint_path is not None  # the query keeps only versions with a checkpoint
                old = Path(version.checkpoint_path)
                if old.is_file():
                    new = models / old.parent.name / old.name
                    new.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(old, new)
                    version.checkpoint_path = str(new)
        return OracleStore(sessions, truth=self.truth, annotator=self.annotator, costs=self.costs, project=self.project,
                           models_dir=models)

    def reveal(self, image_id: int, action: str) -> None:
        """Upgrade with the hidden labels: image-level labels, or boxes (an unlabeled image gets its
        image-level labels first, as the Annotate page saves them together)."""
        with self.sessions.begin() as session:
            image = session.get(Image, image_id)
            if image is None:
                raise ValueError(f"no image with id {image_id}")
            labels, boxes = self.truth[image.path]
            if action == ADD_LABELS or image.granularity == Granularity.UNLABELED:
                # the oracle assesses every class: the ones it does not name are absent, not unknown
                every = class_names(session, get_project(session, self.project))
                set_image_labels(session, image_id, {name: name in labels for name in every},
                                 annotator=self.annotator, no_finding=not labels)
            if action != ADD_LABELS:
                if boxes:
                    set_boxes(session, image_id, boxes, annotator=self.annotator, complete=True)
                else:
                    mark_boxes_complete(session, image_id, annotator=self.annotator)

    def finish_version(self, version_id: int, checkpoint: str, metrics: Mapping[str, Mapping[str, float]],
                       config: Mapping[str, Any], **kwargs: Any) -> None:
        super().finish_version(version_id, checkpoint, metrics, config, **kwargs)
        for old in self.models_dir.glob("version-*/model.pt"):
            if old != Path(checkpoint):
                old.unlink()


def _truth(coco: Mapping[str, Any], root: Path) -> dict[str, tuple[list[str], list[BoxInput]]]:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    boxes: dict[int, list[BoxInput]] = {}
    for ann in coco.get("annotations", []):
        x, y, w, h = ann["bbox"]
        boxes.setdefault(ann["image_id"], []).append((names[ann["category_id"]], x, y, x + w, y + h))
    truth = {}
    for image in coco["images"]:
        own = boxes.get(image["id"], [])
        labels = [n for n in image.get("image_labels", []) if n in names.values()] or sorted({b[0] for b in own})
        truth[str((root / image["file_name"]).resolve())] = (sorted(set(labels) | {b[0] for b in own}), own)
    return truth


def reopen_simulation_store(url: str, coco: Mapping[str, Any], images: str | Path, *, models_dir: str | Path,
                            project: str = DEFAULT_PROJECT, costs: CostModel = DEFAULT_COSTS) -> OracleStore:
    """The simulation store at ``url`` made earlier by :func:`simulation_store` (a resumed run)."""
    truth = _truth(coco, Path(images).expanduser().resolve())
    return OracleStore(make_sessionmaker(init_db(url)), truth=truth, project=project, models_dir=models_dir, costs=costs)


def simulation_store(url: str, coco: Mapping[str, Any], images: str | Path, plan: Mapping[int, tuple[str, str]],
                     *, models_dir: str | Path, project: str = DEFAULT_PROJECT, costs: CostModel = DEFAULT_COSTS) -> OracleStore:
    """A new store at ``url`` holding the fully labeled ``coco`` (file names relative to ``images``)
    with the labels hidden as ``plan`` says (:func:`oxnet.experiments.simulate.hide_labels`), and its oracle."""
    root = Path(images).expanduser().resolve()
    truth = _truth(coco, root)
    engine = init_db(url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        report = import_coco(session, hide_labels(coco, plan), images=root, project=project, annotator="import:simulation")
        if report.errors:
            raise ValueError(f"simulation import failed: {report.errors[:3]}")
    return OracleStore(sessions, truth=truth, project=project, models_dir=models_dir, costs=costs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a fully labeled COCO JSON (boxes; image_labels optional)")
    parser.add_argument("--images", help="folder of the file names (default: the JSON's folder)")
    parser.add_argument("--strategy", default="random,cost_aware",
                        help=f"comma-separated, among {', '.join(STRATEGIES)}, "
                             f"or {ORACLE} (best of 4 batches in hindsight; 4x the training)")
    parser.add_argument("--budget", type=float, default=40.0, help="annotation units per run")
    parser.add_argument("--per-round", type=float, default=10.0, help="units spent between two rounds")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--cost-labels", type=float, default=1.0, help="units of image-level labels (default 1)")
    parser.add_argument("--cost-boxes", type=float, default=5.0, help="units of boxes (default 5)")
    parser.add_argument("--initial-full", type=int, default=4)
    parser.add_argument("--initial-weak", type=int, default=4)
    parser.add_argument("--fractions", default="0.6,0.2,0.2", help="train,val,test shares of the patients")
    parser.add_argument("--limit", type=int, help="use only the first N images of the dataset")
    parser.add_argument("--preset", choices=sorted(TRAINER_PRESETS), default="tiny")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--steps-per-epoch", type=int)
    parser.add_argument("--pretrain-epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="Adam learning rate of every round (default: the preset's)")
    parser.add_argument("--image-size", type=int, help="network input side")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/simulation")
    parser.add_argument("--ceiling", action="store_true",
                        help="every training image full from the start, trained budget/per-round + 1 rounds (the ceiling)")
    parser.add_argument("--plan-seed", type=int,
                        help="seed of the label plan (which images start full or weak) for every run; default: each "
                             "run's seed. Fixed, the seeds differ in training only: the noise floor of one label plan")
    parser.add_argument("--fresh", action="store_true", help="start every run over (default: continue finished rounds)")
    return parser


def merge(argv: list[str]) -> int:
    """``merge A/simulation.json B/simulation.json ... --out C``: parts of one study run apart (one process
    per seed or strategy) as one simulation.json / simulation.html with the summary over all runs."""
    parser = argparse.ArgumentParser(prog="oxnet-simulate merge", description=merge.__doc__)
    parser.add_argument("parts", nargs="+", help="simulation.json files of one study")
    parser.add_argument("--out", required=True, help="folder of the merged simulation.json and simulation.html")
    args = parser.parse_args(argv)
    try:
        results = merge_simulations(args.parts, args.out)
    except (ValueError, OSError) as exc:  # a part that is no study of the others, or an unwritable --out
        parser.error(str(exc))
    print(json.dumps({"summary": results["summary"], "runs": len(results["runs"]), "out": args.out}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        return merge(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dataset = Path(args.dataset)
    coco = json.loads(dataset.read_text(encoding="utf-8"))
    if args.limit:
        coco["images"] = coco["images"][: args.limit]
        kept = {image["id"] for image in coco["images"]}
        coco["annotations"] = [a for a in coco.get("annotations", []) if a["image_id"] in kept]
    images = Path(args.images) if args.images else dataset.parent
    shares = [float(f) for f in args.fractions.split(",")]
    if len(shares) != 3:
        raise ValueError(f"--fractions needs three shares (train,val,test), got {args.fractions!r}")
    fractions = (shares[0], shares[1], shares[2])
    settings = TRAINER_PRESETS[args.preset]
    overrides = {k: v for k, v in {"epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch,
                                   "pretrain_epochs": args.pretrain_epochs, "batch_size": args.batch_size,
                                   "lr": args.lr}.items()
                 if v is not None}
    model = {**settings.model, **({"image_size": args.image_size} if args.image_size else {})}
    settings = replace(settings, model=model, device=args.device, **overrides)
    config = SimulationConfig(
        strategies=tuple(args.strategy.split(",")), seeds=tuple(int(s) for s in args.seeds.split(",")),
        budget=args.budget, per_round=args.per_round, costs=CostModel(args.cost_labels, args.cost_boxes),
        settings=settings, min_rounds=int(args.budget // args.per_round) + 1 if args.ceiling else 0,
    )
    out = Path(args.out)
    stores, logs = out / "stores", out / "logs"
    if args.fresh:
        shutil.rmtree(stores, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)

    def make_store(strategy: str, seed: int):
        folder = stores / f"{strategy}-seed{seed}"
        url = f"sqlite:///{folder / 'store.db'}"
        if strategy == ORACLE:  # not resumable: always from the start
            (logs / f"{strategy}-seed{seed}.jsonl").unlink(missing_ok=True)
        elif (logs / f"{strategy}-seed{seed}.jsonl").is_file() and (folder / "store.db").is_file():
            return reopen_simulation_store(url, coco, images, models_dir=folder / "models", costs=config.costs)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        plan = plan_labels(coco, seed=seed if args.plan_seed is None else args.plan_seed, initial_full=args.initial_full, initial_weak=args.initial_weak,
                           fractions=fractions)
        if args.ceiling:
            plan = {i: (split, FULL) for i, (split, _) in plan.items()}
        return simulation_store(url, coco, images, plan, models_dir=folder / "models", costs=config.costs)

    def on_point(point: dict) -> None:
        logging.info("simulation point: %s", json.dumps(point))

    described = {"path": str(dataset), "images": len(coco["images"]), "initial_full": args.initial_full,
                 "initial_weak": args.initial_weak, "fractions": list(fractions), "ceiling": args.ceiling,
                 "plan_seed": args.plan_seed}
    if args.ceiling:  # what boxing every training image costs, from the label plan's start
        start = [g for split, g in plan_labels(coco, seed=0, initial_full=args.initial_full, initial_weak=args.initial_weak,
                                                fractions=fractions).values() if split == "train"]
        described["ceiling_units"] = (start.count(UNLABELED) * config.costs.cost(UNLABELED_TO_FULL)
                                      + start.count(WEAK) * config.costs.cost(WEAK_TO_FULL))
    def on_update(partial: dict[str, Any]) -> None:
        write_results({**partial, "dataset": described}, out)

    results = run_simulation(make_store, config, on_point=on_point, log_dir=logs, on_update=on_update)
    paths = write_results({**results, "dataset": described}, out)
    print(json.dumps({"summary": results["summary"], **{k: str(v) for k, v in paths.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
