"""The simulation's pure parts (cost model, strategies, label plan) and its oracle store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from db.lifecycle import replay_audit
from db.models import AuditEntry, Granularity, Image
from db.versions import create_model_version, finish_model_version, write_suggestions
from app.simulate import simulation_store
from oxnet.data.synthetic import write_coco
from oxnet.experiments.simulate import (
    STRATEGIES,
    Candidate,
    CostModel,
    SimulationConfig,
    hide_labels,
    plan_labels,
    proposals,
    run_simulation,
    spend,
    summarize,
)
from oxnet.vocabulary import ADD_LABELS, DRAW_BOXES

pytestmark = pytest.mark.slow  # processes, whole training runs: deselect with -m 'not slow'

COSTS = CostModel(labels=1, boxes=5)
CANDIDATES = [Candidate(2, "weak", DRAW_BOXES, 5.0), Candidate(3, "unlabeled", ADD_LABELS, 1.0),
              Candidate(1, "unlabeled", DRAW_BOXES, 6.0), Candidate(5, "unlabeled", ADD_LABELS, 1.0)]


def test_spend_takes_the_queue_in_order_while_the_cost_fits():
    chosen = spend(CANDIDATES, 7)
    assert [c.image_id for c in chosen] == [2, 3, 5]  # 5 + 1 (6 does not fit after them) + 1
    assert sum(c.cost for c in chosen) == 7
    assert [c.image_id for c in spend(CANDIDATES, 0.5)] == []
    assert COSTS.of(ADD_LABELS, "unlabeled") == 1 and COSTS.of(DRAW_BOXES, "weak") == 5
    assert COSTS.of(DRAW_BOXES, "unlabeled") == 6
    with pytest.raises(ValueError, match="upgrade"):
        COSTS.of(ADD_LABELS, "weak")


def test_every_registered_strategy_can_be_simulated():
    assert set(STRATEGIES) >= {"random", "random_labels", "random_boxes", "disagreement", "uncertainty", "diversity",
                               "uncertainty_diversity", "cost_aware"}
    with pytest.raises(ValueError, match="strategies"):
        SimulationConfig(strategies=("greedy",))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sim")
    path = write_coco(folder, 20, size=64, seed=5)["synthetic"]
    return json.loads(path.read_text()), folder / "images"


def test_plan_shares_evaluation_splits_across_seeds(dataset):
    coco, _ = dataset
    plans = [plan_labels(coco, seed=s, initial_full=2, initial_weak=3) for s in (0, 1)]
    for plan in plans:
        train = [g for split, g in plan.values() if split == "train"]
        assert train.count("full") == 2 and train.count("weak") == 3
        assert all(g == "full" for split, g in plan.values() if split != "train")
    evaluation = [{i: p for i, p in plan.items() if p[0] != "train"} for plan in plans]
    assert evaluation[0] == evaluation[1]
    assert plans[0] != plans[1]
    hidden = hide_labels(coco, plans[0])
    by_id = {image["id"]: image for image in hidden["images"]}
    assert {a["image_id"] for a in hidden["annotations"]} <= {i for i, (_, g) in plans[0].items() if g == "full"}
    assert all("image_labels" not in by_id[i] for i, (_, g) in plans[0].items() if g == "unlabeled")


def test_oracle_upgrades_through_the_lifecycle(dataset, tmp_path):
    coco, images = dataset
    plan = plan_labels(coco, seed=0, initial_full=2, initial_weak=3)
    store = simulation_store(f"sqlite:///{tmp_path / 's.db'}", coco, images, plan, models_dir=tmp_path / "models")
    assert store.candidates() == []  # no model version has ranked anything yet
    with store.sessions.begin() as session:
        unlabeled = session.scalars(select(Image.id).where(Image.granularity == Granularity.UNLABELED)).all()
    store.reveal(unlabeled[0], ADD_LABELS)
    assert store.granularity(unlabeled[0]) == "weak"
    store.reveal(unlabeled[0], DRAW_BOXES)
    store.reveal(unlabeled[1], DRAW_BOXES)  # unlabeled -> full in one save: labels, then boxes
    assert store.granularity(unlabeled[1]) == "full"
    with store.sessions.begin() as session:
        image = session.get(Image, unlabeled[0])
        assert image.granularity is Granularity.FULL
        truth = next(i for i in coco["images"] if images.joinpath(i["file_name"]).resolve() == Path(image.path))
        boxes = [a for a in coco["annotations"] if a["image_id"] == truth["id"]]
        assert len(image.boxes) == len(boxes)
        actions = session.scalars(select(AuditEntry.action).where(AuditEntry.image_id == image.id)).all()
        assert actions[-2:] in (["set_labels", "set_boxes"], ["set_labels", "mark_complete"])
        assert replay_audit(session, image.id)["boxes_complete"]


def test_the_oracle_never_buys_an_upgrade_that_changes_nothing(dataset, tmp_path):
    """Suggestions of a serving version that is older than the labels (newer versions kept as candidates)
    name images labelled since: the annotator must not be offered labels for an image that has them."""
    coco, images = dataset
    plan = plan_labels(coco, seed=0, initial_full=2, initial_weak=3)
    store = simulation_store(f"sqlite:///{tmp_path / 's.db'}", coco, images, plan, models_dir=tmp_path / "models")
    with store.sessions.begin() as session:
        unlabeled = session.scalars(select(Image.id).where(Image.granularity == Granularity.UNLABELED)).all()[:2]
        version = create_model_version(session, config={}, round=1)
        finish_model_version(session, version.id, status="ready")
        write_suggestions(session, version.id, [
            {"image_id": i, "action": action, "score": 1.0 - k / 10, "reason": {}}
            for k, (i, action) in enumerate([(unlabeled[0], ADD_LABELS), (unlabeled[0], DRAW_BOXES), (unlabeled[1], ADD_LABELS)])])
    assert [(c.image_id, c.action) for c in store.candidates()] == [
        (unlabeled[0], ADD_LABELS), (unlabeled[0], DRAW_BOXES), (unlabeled[1], ADD_LABELS)]
    store.reveal(unlabeled[0], ADD_LABELS)  # labelled after the version ranked it
    assert [(c.image_id, c.action) for c in store.candidates()] == [(unlabeled[0], DRAW_BOXES), (unlabeled[1], ADD_LABELS)]
    assert spend(store.candidates(), 1.0) == [c for c in store.candidates() if c.image_id == unlabeled[1]]


def test_a_resumed_run_reopens_its_store_with_the_oracle(dataset, tmp_path):
    from app.simulate import reopen_simulation_store

    coco, images = dataset
    plan = plan_labels(coco, seed=0, initial_full=2, initial_weak=3)
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = simulation_store(url, coco, images, plan, models_dir=tmp_path / "models", costs=CostModel(1, 3))
    with store.sessions.begin() as session:
        first, second = session.scalars(select(Image.id).where(Image.granularity == Granularity.UNLABELED)).all()[:2]
    store.reveal(first, ADD_LABELS)
    again = reopen_simulation_store(url, coco, images, models_dir=tmp_path / "models", costs=CostModel(1, 3))
    assert again.granularity(first) == "weak" and again.granularity(second) == "unlabeled"
    assert again.annotation_costs().boxes == 3  # the simulation's costs, not the (empty) measured ones
    again.reveal(second, DRAW_BOXES)
    assert again.granularity(second) == "full"


def test_summary_compares_strategies_per_seed():
    def run(strategy, seed, maps):
        return {"strategy": strategy, "seed": seed,
                "points": [{"spent": 10.0 * i, "mAP": m} for i, m in enumerate(maps)]}

    summary = summarize([run("random", 0, [0.1, 0.2, 0.2]), run("disagreement", 0, [0.1, 0.3, 0.4]),
                         run("random", 1, [0.1, 0.1, 0.3]), run("disagreement", 1, [0.1, 0.1, 0.2])],
                        default="disagreement")
    assert summary["random"]["mean_mAP"] == pytest.approx([0.1, 0.15, 0.25])
    assert summary["random"]["std_mAP"] == pytest.approx([0.0, 0.05, 0.05])
    diff = summary["disagreement_minus_random"]
    assert diff["area"]["per_seed"] == pytest.approx([0.1, -0.025])
    assert diff["area"]["sd"] == pytest.approx(np.std([0.1, -0.025], ddof=1))
    assert diff["seeds_where_it_wins"] == 1 and diff["final_mAP"]["mean"] == pytest.approx(0.05)
    # random's mean final 0.25; disagreement's mean curve 0.1, 0.2, 0.3 reaches it at 15 units
    assert summary["disagreement"]["units_to_random_final"] == pytest.approx(15.0)
    assert summary["random"]["units_to_random_final"] == pytest.approx(20.0)
    unfinished = {"strategy": "random", "seed": 2, "points": [{"spent": 0.0, "mAP": 0.9, "done": False}]}
    assert summarize([run("random", 0, [0.1, 0.2, 0.2]), unfinished])["random"]["mean_mAP"] == pytest.approx([0.1, 0.2, 0.2])
    assert summarize([unfinished])["in_progress"] == [{"strategy": "random", "seed": 2, "rounds": 1}]
    goal = summary["goal"]
    assert not goal["area_beats_random_by_2sd"] and not goal["reaches_random_final_within_60pct"]
    assert goal["controls_ran"] == [] and not goal["not_below_best_control"]


def test_the_mean_curve_averages_every_seed_at_every_level():
    """Seeds that spend unequal units per round (boxes come in 5s) have points at different levels: the
    mean at a level is over every seed's curve interpolated there (held at its last mAP after its last
    spend), checked against a loop over seeds; before, a level's "mean" was whichever seed had a point."""
    runs = [{"strategy": "random_boxes", "seed": seed, "points": [{"spent": x, "mAP": m} for x, m in points]}
            for seed, points in enumerate([[(0, 0.1), (47, 0.3), (94, 0.2)], [(0, 0.2), (45, 0.0)],
                                           [(0, 0.1), (50, 0.5), (100, 0.6)]])]
    entry = summarize(runs)["random_boxes"]
    assert entry["spent"] == [0, 45, 47, 50, 94, 100]

    def at(points, x):  # the loop oracle: linear between points, the last mAP after the last spend
        if x >= points[-1][0]:
            return points[-1][1]
        (x0, y0), (x1, y1) = next((a, b) for a, b in zip(points, points[1:]) if a[0] <= x <= b[0])
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

    for k, x in enumerate(entry["spent"]):
        values = [at([(p["spent"], p["mAP"]) for p in run["points"]], x) for run in runs]
        assert entry["mean_mAP"][k] == pytest.approx(np.mean(values)), x
        assert entry["std_mAP"][k] == pytest.approx(np.std(values)), x


def test_merge_joins_parts_run_apart_and_refuses_other_studies(tmp_path, capsys):
    """One process per seed, then ``oxnet-simulate merge``: the merged summary is the summary over every
    part's runs; a ceiling (another dataset description), a run held twice and an unreadable file are
    refused with the file named, by the command line without a traceback."""
    import app.simulate as cli

    def part(name, runs, **dataset):
        config = {"strategies": sorted({r[0] for r in runs}), "seeds": sorted({r[1] for r in runs}), "budget": 20.0,
                  "settings": {"lr": 1e-3, "seed": runs[0][1], "strategy": runs[0][0], "device": name}}
        results = {"config": config, "machine": {"cpus": len(name)}, "dataset": {"path": "d.json", **dataset},
                   "runs": [{"strategy": s, "seed": seed, "points": [{"spent": 10.0 * i, "mAP": m, "done": i == len(maps) - 1}
                                                                  for i, m in enumerate(maps)]} for s, seed, maps in runs]}
        path = tmp_path / name / "simulation.json"
        path.parent.mkdir()
        path.write_text(json.dumps(results))
        return path

    a = part("a", [("random", 0, [0.1, 0.2, 0.2]), ("cost_aware", 0, [0.1, 0.3, 0.4])])
    b = part("b", [("random", 1, [0.1, 0.1, 0.3]), ("cost_aware", 1, [0.1, 0.1, 0.2])], ceiling=False)
    assert cli.main(["merge", str(a), str(b), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "simulation.json").read_text())
    runs = [*json.loads(a.read_text())["runs"], *json.loads(b.read_text())["runs"]]
    assert merged["summary"] == json.loads(json.dumps(summarize(runs)))
    assert merged["summary"]["random"]["mean_mAP"] == pytest.approx([0.1, 0.15, 0.25])
    assert merged["config"]["seeds"] == [0, 1] and [m["path"] for m in merged["merged_from"]] == [str(a), str(b)]
    assert (tmp_path / "merged" / "simulation.html").is_file()

    ceiling = part("c", [("random", 2, [0.2, 0.3])], ceiling=True)
    twice = part("d", [("random", 1, [0.1, 0.1, 0.3])])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for parts, message in [([a, ceiling], f"{ceiling} and {a} are not the same study: their dataset differ"),
                           ([a, b, twice], f"{twice} and {b} both hold the run random seed 1"),
                           ([a, broken], f"{broken}: not a readable simulation.json"),
                           ([a], "merge needs at least two simulation.json files")]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["merge", *map(str, parts), "--out", str(tmp_path / "refused")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "refused").exists()


def test_simulation_cli_end_to_end_writes_curves_after_every_round(dataset, tmp_path, monkeypatch):
    """Two strategies, one seed, the tiny trainer: every round is recorded, each strategy spends the
    budget through the oracle (labels 1 unit, boxes 5), and the results are rewritten after every point."""
    import app.simulate as cli
    import oxnet.experiments.simulate as simulate

    coco, images = dataset
    path = tmp_path / "data.json"
    path.write_text(json.dumps(coco))
    written = []
    real_write = simulate.write_results
    monkeypatch.setattr(cli, "write_results", lambda results, out: written.append(len(
        [p for run in results["runs"] for p in run["points"]])) or real_write(results, out))
    out = tmp_path / "out"
    assert cli.main(["--dataset", str(path), "--images", str(images), "--strategy", "random,cost_aware",
                     "--budget", "6", "--per-round", "6", "--seeds", "0", "--initial-full", "3", "--initial-weak", "3",
                     "--preset", "tiny", "--device", "cpu", "--lr", "1e-3", "--out", str(out)]) == 0
    results = json.loads((out / "simulation.json").read_text())
    assert [(r["strategy"], r["seed"]) for r in results["runs"]] == [("random", 0), ("cost_aware", 0)]
    for run in results["runs"]:
        points = run["points"]
        assert [p["round"] for p in points] == [1, 2] and points[0]["spent"] == 0
        assert 0 < points[1]["spent"] <= 6 and all(p["status"] == "ready" and 0 <= p["mAP"] <= 1 for p in points)
        before, after = points[0]["label_counts"], points[1]["label_counts"]
        bought = points[0]["bought"]
        cost = {"unlabeled->weak": 1, "weak->full": 5, "unlabeled->full": 6}
        assert sum(cost[k] * n for k, n in bought.items()) == points[1]["spent"]
        assert after["full"] - before["full"] == bought.get("weak->full", 0) + bought.get("unlabeled->full", 0)
        assert before["unlabeled"] - after["unlabeled"] == bought.get("unlabeled->weak", 0) + bought.get("unlabeled->full", 0)
        assert sum(after.values()) == sum(before.values())
    assert written == [1, 2, 3, 4, 4]  # after every point, then the final write
    assert results["config"]["settings"]["lr"] == 1e-3 and results["dataset"]["images"] == 20
    assert "plotly" in (out / "simulation.html").read_text()[:5000].lower()


def test_a_fixed_plan_seed_gives_every_seed_the_same_start(dataset, tmp_path, monkeypatch):
    """--plan-seed: the seeds then differ in training only (the noise floor of one label plan)."""
    import app.simulate as cli
    import oxnet.experiments.simulate as simulate
    from oxnet.active.loop import RoundResult

    coco, images = dataset
    path = tmp_path / "data.json"
    path.write_text(json.dumps(coco))
    starts: dict[tuple[str, int], list[str]] = {}

    class RecordingTrainer:
        def __init__(self, store, settings):
            self.store, self.settings = store, settings

        def run(self):
            starts.setdefault((str(self.store.models_dir), self.settings.seed),
                              [self.store.granularity(image["id"]) for image in coco["images"]])
            return [RoundResult(round=1, status="ready", metrics={"test": {"mAP": 0.0}})]

    monkeypatch.setattr(simulate, "Trainer", RecordingTrainer)
    common = ["--dataset", str(path), "--images", str(images), "--strategy", "random", "--budget", "6",
              "--per-round", "6", "--seeds", "0,1", "--initial-full", "3", "--initial-weak", "3", "--fresh"]
    assert cli.main([*common, "--out", str(tmp_path / "own")]) == 0
    assert cli.main([*common, "--plan-seed", "0", "--out", str(tmp_path / "fixed")]) == 0
    own = [v for k, v in sorted(starts.items()) if "/own/" in k[0]]
    fixed = [v for k, v in sorted(starts.items()) if "/fixed/" in k[0]]
    assert len(own) == len(fixed) == 2
    assert own[0] != own[1]  # each seed its own plan by default
    assert fixed[0] == fixed[1] == own[0]  # --plan-seed 0: seed 0's plan for both
    results = json.loads((tmp_path / "fixed" / "simulation.json").read_text())
    assert results["dataset"]["plan_seed"] == 0


class _FakeStore:
    """A store of ``n`` unlabeled images whose suggestions are image ids in order, each costing 1."""

    def __init__(self, n=10):
        self.levels = {i: "unlabeled" for i in range(1, n + 1)}
        self.revealed = []

    def candidates(self):
        return [Candidate(i, g, ADD_LABELS, 1.0) for i, g in self.levels.items() if g == "unlabeled"]

    def reveal(self, image_id, action):
        self.revealed.append(image_id)
        self.levels[image_id] = "weak"

    def granularity(self, image_id):
        return self.levels[image_id]


def _fake_trainer(monkeypatch, crash_after=None):
    import oxnet.experiments.simulate as simulate
    from oxnet.active.loop import RoundResult

    calls = []

    class FakeTrainer:
        def __init__(self, store, settings):
            self.store, self.settings = store, settings

        def run(self):
            calls.append(self.settings.strategy)
            if crash_after is not None and len(calls) > crash_after:
                raise KeyboardInterrupt  # the process is killed during a round
            weak = sum(g == "weak" for g in self.store.levels.values())
            return [RoundResult(round=len(calls), status="ready", metrics={"test": {"mAP": weak / 100}})]

    monkeypatch.setattr(simulate, "Trainer", FakeTrainer)
    return calls


def test_a_killed_simulation_continues_from_its_last_round(monkeypatch, tmp_path):
    config = SimulationConfig(strategies=("random",), seeds=(0,), budget=6, per_round=2)
    store = _FakeStore()
    _fake_trainer(monkeypatch, crash_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_simulation(lambda strategy, seed: store, config, log_dir=tmp_path)
    assert store.revealed == [1, 2, 3, 4]  # two rounds bought 2 each; the third round was killed
    calls = _fake_trainer(monkeypatch)
    results = run_simulation(lambda strategy, seed: store, config, log_dir=tmp_path)
    points = results["runs"][0]["points"]
    assert [p["spent"] for p in points] == [0, 2, 4, 6] and len(calls) == 2  # only the missing rounds ran
    assert [p["mAP"] for p in points] == pytest.approx([0.0, 0.02, 0.04, 0.06])
    assert store.revealed == [1, 2, 3, 4, 5, 6] and points[-1]["done"]
    again = run_simulation(lambda strategy, seed: pytest.fail("a finished run is not reopened"), config, log_dir=tmp_path)
    assert again["runs"][0]["points"] == points


def test_purchases_planned_before_a_kill_are_finished_on_resume(monkeypatch, tmp_path):
    config = SimulationConfig(strategies=("random",), seeds=(0,), budget=4, per_round=2)
    store = _FakeStore()
    _fake_trainer(monkeypatch)
    log = tmp_path / "random-seed0.jsonl"
    point = {"strategy": "random", "seed": 0, "round": 1, "spent": 0.0, "mAP": 0.0, "seconds": 1.0, "done": False}
    log.write_text(json.dumps({"point": point}) + "\n" + json.dumps({"plan": [
        {"image_id": 1, "granularity": "unlabeled", "action": ADD_LABELS, "cost": 1.0, "gain": None},
        {"image_id": 2, "granularity": "unlabeled", "action": ADD_LABELS, "cost": 1.0, "gain": None}]}) + "\n")
    store.reveal(1, ADD_LABELS)  # the kill came after the first reveal
    results = run_simulation(lambda strategy, seed: store, config, log_dir=tmp_path)
    assert store.revealed == [1, 2, 3, 4]  # image 1 is not revealed twice
    assert [p["spent"] for p in results["runs"][0]["points"]] == [0, 2, 4]


def test_the_ceiling_trains_as_many_rounds_with_nothing_to_buy(monkeypatch, tmp_path):
    calls = _fake_trainer(monkeypatch)
    store = _FakeStore(0)
    results = run_simulation(lambda strategy, seed: store, SimulationConfig(
        strategies=("random",), budget=6, per_round=2, min_rounds=4))
    assert len(calls) == 4 and [p["spent"] for p in results["runs"][0]["points"]] == [0, 0, 0, 0]


def test_the_hindsight_oracle_keeps_the_best_branch(dataset, tmp_path):
    """Each round the oracle trains every proposal on a copy of the store and continues from the one
    with the best val mAP; the original store is never changed after its first round."""
    coco, images = dataset
    plan = plan_labels(coco, seed=0, initial_full=3, initial_weak=3)
    from dataclasses import replace

    from oxnet.active.loop import TRAINER_PRESETS

    stores = []

    def make_store(strategy, seed):
        folder = tmp_path / f"{strategy}-{seed}"
        stores.append(simulation_store(f"sqlite:///{folder / 'store.db'}", coco, images, plan, models_dir=folder / "models"))
        return stores[-1]

    settings = replace(TRAINER_PRESETS["tiny"], device="cpu", lr=1e-3, steps_per_epoch=1, pretrain_epochs=1)
    config = SimulationConfig(strategies=("oracle",), budget=4, per_round=4, settings=settings)
    results = run_simulation(make_store, config, log_dir=tmp_path / "logs")
    points = results["runs"][0]["points"]
    assert [p["spent"] for p in points] == [0, 4] and points[-1]["done"]
    assert sum({"unlabeled->weak": 1, "weak->full": 5, "unlabeled->full": 6}[k] * n
               for k, n in points[0]["bought"].items()) <= 4 and points[0]["bought"]
    with stores[0].sessions.begin() as session:  # the original: only round 1, labels as planned
        assert session.scalars(select(Image.granularity)).all().count(Granularity.UNLABELED) == \
            sum(g == "unlabeled" for _, g in plan.values())
    branches = sorted((tmp_path / "oracle-0" / "oracle-branches").iterdir())
    assert len(branches) == 1  # the losing branches are deleted
    assert points[1]["round"] == 2 and points[1]["label_counts"] != points[0]["label_counts"]  # learnt from the batch


def test_oracle_proposals_spend_the_budget_three_ways():
    cands = [Candidate(i, "unlabeled" if i % 2 else "weak", ADD_LABELS if i % 2 else DRAW_BOXES,
                       1.0 if i % 2 else 5.0) for i in range(1, 21)]
    batches = proposals(cands, 10, CostModel(), np.random.default_rng(0), k=4)
    assert len(batches) == 4 and all(sum(c.cost for c in b) <= 10 for b in batches)
    assert {c.action for c in batches[2]} == {ADD_LABELS} and {c.action for c in batches[3]} == {DRAW_BOXES}
    assert batches[0] != batches[1]
