"""A synthetic control of ``oxnet pretrain``: RetinaNet from random weights vs from SimSiam weights.

    python -m oxnet.experiments.pretrain_control --out runs/ssl_control      # scaled down: see --help

1. ``--unlabeled`` generated unlabeled chest X-rays (a seed of their own, so none is a test image) ->
   :func:`oxnet.training.pretrain.pretrain` (SimSiam, labels unused).
2. The granularity study's synthetic set (``write_coco(1200, size=128, seed=2026)``: 720 pool, 180 val,
   300 test) with ``--full`` pool images keeping their boxes (72 = the study's smallest mix).
3. Plain RetinaNet (``tiny`` preset) on those box images from each start, the same steps, batch and
   learning rate (BatchNorm trained in both), best validation epoch evaluated on the test images.

Writes ``OUT/results.json`` after every run (resumes: finished runs are kept, the pretraining resumes
after its last finished epoch).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from oxnet.data import records_from_coco
from oxnet.data.synthetic import write_coco
from oxnet.files import write_json
from oxnet.machine import describe
from oxnet.training.checkpoint import load_checkpoint, load_model
from oxnet.evaluation.predict import evaluate_model
from oxnet.training.engine import fit
from oxnet.training.pretrain import PretrainConfig, images_from_records, pretrain
from oxnet.training.settings import TrainConfig
from oxnet.vocabulary import UNLABELED

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ssl_control")
    p.add_argument("--unlabeled", type=int, default=2000, help="generated images for the pretraining")
    p.add_argument("--ssl-epochs", type=int, default=2)
    p.add_argument("--ssl-size", type=int, default=96, help="SimSiam crop side")
    p.add_argument("--ssl-batch", type=int, default=16)
    p.add_argument("--full", type=int, default=72, help="pool images keeping their boxes")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--steps-per-epoch", type=int, default=25)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr of both starts")
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",") if x], default=[0])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    started = time.perf_counter()
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}}
    results.update(config=vars(args), machine=describe(), python=platform.python_version(),
                   label="scaled-down synthetic control (not the issue's 20,000-image protocol)")

    unl_dir = out / UNLABELED
    if not (unl_dir / "annotations" / f"{UNLABELED}.json").is_file():
        write_coco(unl_dir, args.unlabeled, size=128, seed=777, splits={UNLABELED: 1.0})
    unlabeled = records_from_coco(unl_dir / "annotations" / f"{UNLABELED}.json", granularity=UNLABELED,
                                  image_root=unl_dir / "images")
    clock = time.perf_counter()
    ssl = pretrain(images_from_records(unlabeled), out / "pretrain",
                   PretrainConfig(depth=18, image_size=args.ssl_size, epochs=args.ssl_epochs, batch_size=args.ssl_batch,
                                  device="cpu"), progress=False)
    results["pretrain"] = {"weights": str(ssl.weights), "description": ssl.description, "history": ssl.history,
                           "seconds_this_call": round(time.perf_counter() - clock, 1)}
    write_json(results_path, results)

    data = out / "synth1200"
    if not (data / "annotations" / "test.json").is_file():
        write_coco(data, 1200, size=128, seed=2026, splits={"pool": 0.6, "val": 0.15, "test": 0.25})
    read = {s: records_from_coco(data / "annotations" / f"{s}.json", image_root=data / "images") for s in ("pool", "val", "test")}
    classes = read["val"].classes
    for seed in args.seeds:
        order = np.random.default_rng(seed).permutation(len(read["pool"]))
        full = [read["pool"][int(i)] for i in order[: args.full]]
        for start, weights in (("random", "random"), ("simsiam", str(ssl.weights))):
            key = f"{start}_seed{seed}"
            if key in results["runs"]:
                continue
            clock = time.perf_counter()
            config = TrainConfig(method="retinanet", preset="tiny", model={"weights": weights}, epochs=args.epochs,
                                 steps_per_epoch=args.steps_per_epoch, batch_size=8, lr=args.lr, seed=seed,
                                 early_stop_patience=None, plateau_patience=2, device="cpu", out_dir=str(out / key))
            history = fit(full, read["val"], config, classes=classes, progress=False)
            best = cast(Path, history.best_checkpoint)  # fit with a validation set always has a best epoch
            model = load_model(best)
            recorded = load_checkpoint(best).get("backbone_start")
            test = evaluate_model(model, read["test"], classes)
            results["runs"][key] = {
                "start": start, "seed": seed, "backbone_start": recorded,
                "best_epoch": history.best_epoch, "val_mAP": history.best_metric,
                "test_mAP": test["mAP"], "test_AP40": test["AP40"], "test_AP75": test["AP75"],
                "seconds": round(time.perf_counter() - clock, 1),
            }
            logger.info("%s: test mAP %.4f", key, test["mAP"])
            write_json(results_path, results)
    results["wall_seconds_this_call"] = round(time.perf_counter() - started, 1)
    write_json(results_path, results)
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1))
    return results


if __name__ == "__main__":
    main()
