"""Does the loop help? Replay it with an oracle annotator (logic: oxnet.experiments.simulate; store: db.workbench).

    python scripts/simulate.py --dataset synth/annotations/synthetic.json --images synth/images \
        --strategy random,cost_aware --budget 40 --per-round 10 --seeds 0,1 --preset tiny --out runs/sim

Writes OUT/simulation.json (every round: units spent, test mAP, label mix, what was bought) and
OUT/simulation.html (plotly, test mAP against units spent, one curve per strategy). One SQLite store and
one log (OUT/logs/<strategy>-seed<seed>.jsonl) per run: started again with the same OUT, a run continues
from its last finished round (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from db.workbench import reopen_simulation_store as reopen
from db.workbench import simulation_store
from oxnet.active.loop import TRAINER_PRESETS
from oxnet.experiments.simulate import ORACLE, STRATEGIES, CostModel, SimulationConfig, plan_labels, run_simulation, write_results
from oxnet.vocabulary import FULL, UNLABELED, UNLABELED_TO_FULL, WEAK, WEAK_TO_FULL


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a fully labeled COCO JSON (boxes; image_labels optional)")
    parser.add_argument("--images", help="folder of the file names (default: the JSON's folder)")
    parser.add_argument("--strategy", default="random,cost_aware", help=f"comma-separated, among {', '.join(STRATEGIES)}, or {ORACLE} (best of 4 batches in hindsight; 4x the training)")
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
    parser.add_argument("--fresh", action="store_true", help="start every run over (default: continue finished rounds)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dataset = Path(args.dataset)
    coco = json.loads(dataset.read_text(encoding="utf-8"))
    if args.limit:
        coco["images"] = coco["images"][: args.limit]
        kept = {image["id"] for image in coco["images"]}
        coco["annotations"] = [a for a in coco.get("annotations", []) if a["image_id"] in kept]
    images = Path(args.images) if args.images else dataset.parent
    fractions = tuple(float(f) for f in args.fractions.split(","))
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
            return reopen(url, coco, images, models_dir=folder / "models", costs=config.costs)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        plan = plan_labels(coco, seed=seed, initial_full=args.initial_full, initial_weak=args.initial_weak,
                           fractions=fractions)
        if args.ceiling:
            plan = {i: (split, FULL) for i, (split, _) in plan.items()}
        return simulation_store(url, coco, images, plan, models_dir=folder / "models", costs=config.costs)

    def on_point(point: dict) -> None:
        logging.info("simulation point: %s", json.dumps(point))

    described = {"path": str(dataset), "images": len(coco["images"]), "initial_full": args.initial_full,
                 "initial_weak": args.initial_weak, "fractions": list(fractions), "ceiling": args.ceiling}
    if args.ceiling:  # what boxing every training image costs, from the label plan's start
        start = [g for split, g in plan_labels(coco, seed=0, initial_full=args.initial_full, initial_weak=args.initial_weak,
                                                fractions=fractions).values() if split == "train"]
        described["ceiling_units"] = (start.count(UNLABELED) * config.costs.cost(UNLABELED_TO_FULL)
                                      + start.count(WEAK) * config.costs.cost(WEAK_TO_FULL))
    results = run_simulation(make_store, config, on_point=on_point, log_dir=logs,
                             on_update=lambda partial: write_results({**partial, "dataset": described}, out))
    paths = write_results({**results, "dataset": described}, out)
    print(json.dumps({"summary": results["summary"], **{k: str(v) for k, v in paths.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
