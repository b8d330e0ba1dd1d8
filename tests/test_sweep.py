"""The granularity study: relabelling, patient-disjoint splits, summaries, and a tiny end-to-end sweep."""

import json

import numpy as np
import pytest

from oxnet.experiments import sweep
from oxnet.files import jsonable
from oxnet.training.checkpoint import load_checkpoint
from oxnet.data.records import Record, Records
from oxnet.data.synthetic import write_coco
from oxnet.training.settings import TrainConfig

pytestmark = pytest.mark.slow  # processes, whole training runs: deselect with -m 'not slow'


def pool_records(n=20):
    return [
        Record(i, f"/x/{i}.png", "full", 64, 64, boxes=[[1, 1, 9, 9]], labels=[i % 3], patient_id=f"p{i // 2}")
        for i in range(n)
    ]


def test_relabel_keeps_boxes_for_the_full_fraction_and_labels_for_weak():
    pool = pool_records()
    mix = sweep.relabel(pool, 0.25, weak_fraction=0.6, seed=1)
    kinds = [r.granularity for r in mix]
    assert kinds.count("full") == 5 and kinds.count("weak") == 9 and kinds.count("unlabeled") == 6
    by_id = {r.image_id: r for r in pool}
    for r in mix:
        original = by_id[r.image_id]
        if r.granularity == "full":
            assert r is original
        elif r.granularity == "weak":
            assert len(r.boxes) == 0 and r.image_labels == original.image_labels
        else:
            assert len(r.boxes) == 0 and r.image_labels == ()
    assert all(r.granularity == "full" for r in pool)  # the pool is not modified
    same = sweep.relabel(pool, 0.25, weak_fraction=0.6, seed=1)
    other = sweep.relabel(pool, 0.25, weak_fraction=0.6, seed=2)
    full_ids = lambda m: {r.image_id for r in m if r.granularity == "full"}  # noqa: E731
    assert full_ids(mix) == full_ids(same) and full_ids(mix) != full_ids(other)


def test_relabel_with_report_labels_and_explicit_negatives():
    pool = pool_records(4)
    labels = {0: (1, 2), 1: (), 2: (0,), 3: (2,)}
    mix = sweep.relabel(pool, 0.25, seed=0, weak_labels=labels)
    for r in mix:
        if r.granularity == "weak":
            assert r.image_labels == labels[r.image_id]
            assert r.negative == (labels[r.image_id] == ())
    with pytest.raises(ValueError, match="fully labeled"):
        sweep.relabel(mix, 0.5)


def test_batch_with_full_keeps_the_box_images_per_step():
    props = {"full": 0.5, "weak": 0.25, "unlabeled": 0.25}
    every = {"full": 10, "weak": 10, "unlabeled": 10}
    assert sweep.batch_with_full(8, props, ("full",), every) == 8
    assert sweep.batch_with_full(8, props, ("full", "weak", "unlabeled"), every) == 16
    assert sweep.batch_with_full(8, props, ("full", "weak"), every) == 12
    assert sweep.batch_with_full(8, props, ("full", "weak", "unlabeled"), {"full": 5, "weak": 5}) == 12
    with pytest.raises(ValueError, match="no full images"):
        sweep.batch_with_full(8, props, ("weak",), every)


def test_split_by_patient_never_splits_a_patient():
    rest, held = sweep.split_by_patient(pool_records(), 0.3, seed=0)
    assert len(rest) + len(held) == 20 and held
    assert not {r.patient_id for r in rest} & {r.patient_id for r in held}
    with pytest.raises(ValueError, match="patient-disjoint"):
        sweep.check_patient_disjoint(rest + held[:1], held, "pool and test")


def test_summary_is_mean_and_sample_std_over_seeds():
    rows = [
        {"method": "oxnet", "full_fraction": 0.5, "seed": s, "n_full": 10, "n_weak": 10, "n_unlabeled": 0,
         "mAP": m, "AP40": m, "AP75": 0.0}
        for s, m in enumerate([0.1, 0.2, 0.3])
    ]
    (summary,) = sweep.summarize(rows)
    assert summary["seeds"] == 3
    assert summary["mAP_mean"] == pytest.approx(0.2)
    assert summary["mAP_std"] == pytest.approx(np.std([0.1, 0.2, 0.3], ddof=1))


def test_config_is_validated():
    with pytest.raises(ValueError, match="methods"):
        sweep.SweepConfig(methods=("yolo",))
    with pytest.raises(ValueError, match="full_fractions"):
        sweep.SweepConfig(full_fractions=(0.0,))


def test_schedule_and_class_balancing_options_reach_every_run():
    def train(*options):
        return sweep.config_from_args(sweep.build_parser().parse_args(["--dataset", "d.json", *options])).train

    assert (train().warmup_steps, train().schedule, train().repeat_threshold) == (0, "plateau", None)
    cosine = train("--warmup-steps", "50", "--schedule", "cosine", "--class-balanced", "--repeat-threshold", "0.2")
    assert (cosine.warmup_steps, cosine.schedule, cosine.repeat_threshold) == (50, "cosine", 0.2)


def test_model_options_reach_every_run_and_are_checked_before_the_data_is_read():
    base = ["--dataset", "unused.json", "--test-fold", "0", "--preset", "tiny"]
    args = sweep.build_parser().parse_args(base + ["--model-option", "backbone_norm=group", "--model-option",
                                                   "anchor_sizes=(8,16,32)", "--weights", "random"])
    config = sweep.config_from_args(args)
    assert config.train.model == {"backbone_norm": "group", "anchor_sizes": (8, 16, 32), "weights": "random"}
    model = config.train.model_config(num_classes=2, method="retinanet")
    assert model.backbone_norm == "group" and model.anchor_sizes == (8.0, 16.0, 32.0)
    with pytest.raises(ValueError, match="backbone_norm must be one of"):
        sweep.config_from_args(sweep.build_parser().parse_args(base + ["--model-option", "backbone_norm=batchy"]))
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        sweep.config_from_args(sweep.build_parser().parse_args(base + ["--model-option", "anchor_size=(8,16,32)"]))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    files = write_coco(root, 24, size=64, seed=3, splits={"pool": 0.75, "test": 0.25})
    return root, files


def test_tiny_sweep_end_to_end_writes_results_and_resumes(synthetic, tmp_path, monkeypatch):
    root, files = synthetic
    study = sweep.load_study(files["pool"], images=root / "images", test=files["test"], val_fraction=0.25)
    config = sweep.SweepConfig(
        full_fractions=(0.5,), methods=("retinanet", "daa", "oxnet"), seeds=(0,), out_dir=str(tmp_path / "out"),
        train=TrainConfig(preset="tiny", model={"image_size": 64}, epochs=1, pretrain_epochs=1, batch_size=4,
                          steps_per_epoch=1, early_stop_patience=None, lr=1e-4),
    )
    rows = []
    results = sweep.run_sweep(study.pool, study.val, study.test, config, on_row=rows.append)
    assert [r["method"] for r in results["rows"]] == ["retinanet", "daa", "oxnet"] and len(rows) == 3
    n_pool = len(study.pool)
    for row in results["rows"]:
        assert row["n_full"] == round(0.5 * n_pool) and row["n_weak"] == n_pool - row["n_full"]
        assert 0.0 <= row["mAP"] <= 1.0
    by_method = {r["method"]: r for r in results["rows"]}
    # Every method, RetinaNet too, continues the shared pre-training (1 step): its weights and Adam state.
    assert all(by_method[m]["epochs_trained"] == 1 for m in by_method)
    for method in by_method:
        state = load_checkpoint(tmp_path / "out" / "full0.5_seed0" / method / "last.pt")
        assert state["optimizer"]["state"][0]["step"] == 2, method
    assert by_method["oxnet"]["teacher_mAP"] is not None and by_method["daa"]["teacher_mAP"] is None
    # as many box images per step as RetinaNet's batch of 4, weak images on top (the mix has no unlabeled)
    assert [by_method[m]["batch_size"] for m in ("retinanet", "daa", "oxnet")] == [4, 6, 6]
    out = tmp_path / "out"
    stored = json.loads((out / "results.json").read_text())
    assert stored["schema"] == sweep.SCHEMA and len(stored["summary"]) == 3
    assert (out / "results.csv").read_text().count("\n") == 4
    assert "plotly" in (out / "figure.html").read_text()[:5000].lower()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("oxnet.training.engine.fit", no_training)
    again = sweep.run_sweep(study.pool, study.val, study.test, config)
    assert len(again["rows"]) == 3
    with pytest.raises(ValueError, match="other settings"):
        sweep.run_sweep(study.pool, study.val, study.test, sweep.SweepConfig(
            full_fractions=(0.25,), methods=("retinanet",), seeds=(0,), out_dir=str(out), train=config.train))


def test_load_study_folds_and_report_labels(tmp_path, synthetic):
    root, files = synthetic
    coco = json.loads(files["pool"].read_text())
    for k, image in enumerate(coco["images"]):
        image["suggested_fold"] = k % 3
        image["patient_id"] = f"p{k}"
        image["nih_finding_labels"] = ["Nodule", "Edema"]
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(coco))
    study = sweep.load_study(path, images=root / "images", test_fold=2, pool_folds=(0,), val_fraction=0.2,
                             weak_labels="nih")
    assert len(study.test) == sum(1 for k in range(len(coco["images"])) if k % 3 == 2)
    assert len(study.pool) + len(study.val) == sum(1 for k in range(len(coco["images"])) if k % 3 == 0)
    nodule = list(study.pool.classes).index("Nodule")
    assert set(study.weak_labels.values()) == {(nodule,)}  # "Edema" is not one of the classes
    with pytest.raises(ValueError, match="exactly one"):
        sweep.load_study(path, images=root / "images")
    del coco["images"][0]["nih_finding_labels"]
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="nih_finding_labels"):
        sweep.load_study(path, images=root / "images", test_fold=2, weak_labels="nih")


def test_records_of_the_real_nih_pool_split_patient_disjoint():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nih-cxr"
    if not root.is_dir():
        pytest.skip("../shared/data/nih-cxr is absent")
    study = sweep.load_study(root / "annotations/boxes.json", images=root / "images", test_fold=3,
                             weak_labels="nih")
    assert len(study.test) == 170 and len(study.pool) + len(study.val) == 534
    assert isinstance(study.pool, Records) and len(study.pool.classes) == 8
    sweep.check_patient_disjoint(study.pool, study.test, "pool and test")


def _results(tmp_path, name, fractions, seeds, *, lr=1e-4, maps=None, device="auto", schedule="plateau"):
    """A results.json as run_sweep writes it, with one retinanet and one oxnet row per (fraction, seed)."""
    config = sweep.SweepConfig(full_fractions=fractions, seeds=seeds, out_dir=str(tmp_path / name),
                               train=TrainConfig(preset="tiny", lr=lr, device=device, schedule=schedule))
    rows = [
        {"method": m, "full_fraction": f, "seed": s, "n_full": int(100 * f), "n_weak": 50, "n_unlabeled": 10,
         "batch_size": 8, "train_seconds": 1.0, "epochs_trained": 2, "best_epoch": 1, "val_mAP": 0.2,
         **{k: (maps or {}).get((m, f, s), 0.3) for k in sweep.METRIC_KEYS}, "per_class_AP": {}, "teacher_mAP": None}
        for f in fractions for s in seeds for m in ("retinanet", "oxnet")
    ]
    results = {"schema": sweep.SCHEMA, "config": jsonable(sweep.asdict(config)), "machine": {"device": name},
               "classes": ["a", "b"], "pool": {"images": 100}, "started": f"2026-01-0{len(seeds)}",
               "wall_seconds": 10.0, "rows": rows, "summary": sweep.summarize(rows)}
    path = tmp_path / name / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(results))
    return path


def test_merge_combines_sweeps_run_apart_and_refuses_other_studies(tmp_path):
    a = _results(tmp_path, "a", (0.25,), (0, 1), maps={("oxnet", 0.25, 0): 0.5, ("oxnet", 0.25, 1): 0.7})
    b = _results(tmp_path, "b", (0.25,), (2,), maps={("oxnet", 0.25, 2): 0.9})
    c = _results(tmp_path, "c", (0.5,), (0, 1, 2), device="cuda")  # run on another machine
    merged = sweep.main(["merge", str(a), str(b), str(c), "--out", str(tmp_path / "m")])
    assert merged["config"]["full_fractions"] == [0.25, 0.5] and merged["config"]["seeds"] == [0, 1, 2]
    assert len(merged["rows"]) == 12 and merged["wall_seconds"] == 30.0
    assert [m["machine"]["device"] for m in merged["merged_from"]] == ["a", "b", "c"]
    assert [m["device"] for m in merged["merged_from"]] == ["auto", "auto", "cuda"]
    ox = next(s for s in merged["summary"] if s["method"] == "oxnet" and s["full_fraction"] == 0.25)
    assert ox["seeds"] == 3 and ox["mAP_mean"] == pytest.approx(0.7) and ox["mAP_std"] == pytest.approx(0.2)
    stored = json.loads((tmp_path / "m" / "results.json").read_text())
    assert stored == json.loads(json.dumps(merged))
    assert (tmp_path / "m" / "results.csv").read_text().count("\n") == 13
    assert (tmp_path / "m" / "figure.html").is_file()
    with pytest.raises(ValueError, match=r"both hold the run \('retinanet', 0.25, 0\)"):
        sweep.merge_results([a, a], tmp_path / "m2")
    other = _results(tmp_path, "d", (0.1,), (0,), lr=1e-3)
    with pytest.raises(ValueError, match=r"not the same study: their config \(train\) differ"):
        sweep.merge_results([a, other], tmp_path / "m2")
    # A sweep written before a TrainConfig field existed trained with its default: the same study.
    older = json.loads(b.read_text())
    for new_field in ("warmup_steps", "schedule", "repeat_threshold"):
        del older["config"]["train"][new_field]
    b.write_text(json.dumps(older))
    assert len(sweep.merge_results([a, b], tmp_path / "m3")["rows"]) == 6
    cosine = _results(tmp_path, "e", (0.1,), (0,), schedule="cosine")
    with pytest.raises(ValueError, match=r"their config \(train\) differ"):
        sweep.merge_results([a, cosine], tmp_path / "m2")
    with pytest.raises(SystemExit):  # the CLI names the problem and exits non-zero
        sweep.main(["merge", str(a), str(tmp_path / "missing.json"), "--out", str(tmp_path / "m2")])
    assert not (tmp_path / "m2").exists()


def test_store_puts_a_sweep_in_the_workbench_store_once(tmp_path, db_sessionmaker, db_url):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from db.projects import ensure_project
    from db.service import sweep_results

    with db_sessionmaker.begin() as s:
        ensure_project(s)
    a = _results(tmp_path, "a", (0.25,), (0, 1), maps={("oxnet", 0.25, 0): 0.5})
    b = _results(tmp_path, "b", (0.5,), (0,))
    merged = tmp_path / "m"
    sweep.merge_results([a, b], merged)
    script = Path(__file__).resolve().parents[1] / "scripts" / "sweep.py"

    def run(*files):
        return subprocess.run([sys.executable, str(script), "store", *map(str, files)], capture_output=True, text=True,
                              env={**os.environ, "OXNET_DB_URL": db_url})

    first = run(a)
    assert first.returncode == 0, first.stderr
    assert "stored 4 runs, 0 already in the store" in first.stdout
    second = run(merged / "results.json")  # the merged file holds a's runs again, and b's
    assert "stored 2 runs, 4 already in the store" in second.stdout
    with db_sessionmaker() as s:
        stored = sweep_results(s)
    assert len(stored) == 6
    ox = [r for r in stored if r["method"] == "oxnet" and r["seed"] == 0 and r["n_full"] == 25]
    assert [r["metrics"]["mAP"] for r in ox] == [0.5]
    # A bad row anywhere: nothing of that call is stored, and the error names the file and row.
    bad = json.loads(b.read_text())
    del bad["rows"][1]["n_weak"]
    bad_path = tmp_path / "bad.json"
    bad_path.write_text(json.dumps(bad))
    c = _results(tmp_path, "c", (0.1,), (0,))
    failed = run(c, bad_path)
    assert failed.returncode != 0 and f"{bad_path}: rows[1] lacks ['n_weak']" in failed.stderr
    with db_sessionmaker() as s:
        assert len(sweep_results(s)) == 6
    not_sweep = tmp_path / "other.json"
    not_sweep.write_text(json.dumps({"images": []}))
    assert "not a sweep results file" in run(not_sweep).stderr
