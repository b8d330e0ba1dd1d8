"""The shared words (granularities, actions, upgrades, metric keys) are defined once, in
oxnet.vocabulary, which imports nothing heavy; the store's enums and the library agree with it."""

from __future__ import annotations

import io
import subprocess
import sys
import tokenize
from pathlib import Path

from oxnet import vocabulary
from oxnet.classes import NO_FINDING

ROOT = Path(__file__).resolve().parent.parent
#: Literals that must be spelled only in oxnet/vocabulary.py (quoted as in the source).
SPELLED_ONCE = {f'"{word}"' for word in (*vocabulary.GRANULARITIES, *vocabulary.SUGGESTED_ACTIONS, *vocabulary.UPGRADE_NAMES,
                                         NO_FINDING)}


def test_vocabulary_imports_only_the_standard_library():
    code = ("import sys; before = set(sys.modules); import oxnet.vocabulary; "
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] not in sys.stdlib_module_names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "['oxnet', 'oxnet.lazy', 'oxnet.vocabulary']"  # oxnet.lazy: the package's stdlib-only PEP 562 helper


def test_the_store_enums_are_built_from_the_vocabulary():
    from db.models import Granularity, SuggestedAction

    assert {g.value for g in Granularity} == set(vocabulary.GRANULARITIES)
    assert tuple(a.value for a in SuggestedAction) == vocabulary.SUGGESTED_ACTIONS
    assert {SuggestedAction(a).target.value for a in vocabulary.SUGGESTED_ACTIONS} == {vocabulary.WEAK, vocabulary.FULL}


def test_upgrades_name_the_granularity_change():
    from db.costs import upgrade_of

    for (before, _action), name in vocabulary.UPGRADES.items():
        after = name.split("->")[1]
        assert upgrade_of(before, after) == name
    assert upgrade_of(vocabulary.FULL, vocabulary.FULL) == vocabulary.EDIT
    assert set(vocabulary.UPGRADES.values()) == set(vocabulary.UPGRADE_NAMES)


def test_trainer_preset_names_match_the_presets():
    from oxnet.active.loop import TRAINER_PRESETS

    assert vocabulary.TRAINER_PRESET_NAMES == tuple(sorted(TRAINER_PRESETS))
    assert vocabulary.AUTO_PRESET not in TRAINER_PRESETS


def test_evaluation_returns_the_vocabulary_metric_keys():
    from oxnet.evaluation.metrics import evaluate

    gt = {"images": [{"id": 1, "width": 64, "height": 64, "image_labels": ["a"]}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "a"}]}
    pred = [{"image_id": 1, "boxes": [[4, 4, 24, 24]], "scores": [0.9], "labels": [1], "image_probs": [0.8]}]
    metrics = evaluate(gt, pred)
    assert set(vocabulary.METRIC_KEYS) | {vocabulary.PER_CLASS_AP, vocabulary.IMAGE_AUC, vocabulary.SCORE_THRESHOLD} <= set(metrics)
    assert metrics[vocabulary.MAP] > 0.99


def test_shared_words_are_not_spelled_out_elsewhere():
    """Granularities, suggested actions, upgrade names and "No Finding" appear as string literals only in
    the vocabulary and oxnet.classes (docstrings and comments may say them; code uses the constants)."""
    found = []
    for folder in ("app", "db", "oxnet", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name in ("vocabulary.py", "classes.py") or "migrations" in path.parts:
                continue
            for token in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
                if token.type == tokenize.STRING and token.string in SPELLED_ONCE:
                    found.append(f"{path.relative_to(ROOT)}:{token.start[0]}: {token.string}")
    assert not found, "use oxnet.vocabulary's constants:\n" + "\n".join(found)
