"""Suggestion scores against slow loop oracles, reasons, and one scoring pass of a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from oxnet.data.records import Record
from oxnet.modeling.config import build_model
from oxnet.vocabulary import ADD_LABELS, DRAW_BOXES
from oxnet.active.scoring import (
    ScoreConfig,
    best_box_scores,
    cross_granularity_conflict,
    disagreement,
    explain,
    image_uncertainty,
    score_batch,
    score_images,
)

CLASSES = ["Effusion", "Mass", "Nodule"]


def _oracle_disagreement(t, s, k, gamma):
    image, per_class = [], []
    for b in range(t.shape[0]):
        w = [[abs(torch.sigmoid(t[b, a, c]).item() - torch.sigmoid(s[b, a, c]).item()) ** gamma
              for c in range(t.shape[2])] for a in range(t.shape[1])]
        best = sorted((max(row) for row in w), reverse=True)[:k]
        image.append(sum(best) / len(best))
        per_class.append([sum(sorted((w[a][c] for a in range(t.shape[1])), reverse=True)[:k]) / min(k, t.shape[1])
                          for c in range(t.shape[2])])
    return torch.tensor(image), torch.tensor(per_class)


@pytest.mark.parametrize("k", [1, 4, 50])
def test_disagreement_matches_loop(k):
    g = torch.Generator().manual_seed(k)
    t, s = torch.randn(3, 7, 4, generator=g) * 3, torch.randn(3, 7, 4, generator=g) * 3
    image, per_class = disagreement(t, s, top_k=k, gamma=2.0)
    want_image, want_class = _oracle_disagreement(t, s, k, 2.0)
    torch.testing.assert_close(image, want_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_class, want_class, rtol=1e-5, atol=1e-6)
    same, _ = disagreement(t, t.clone(), top_k=k)
    assert torch.equal(same, torch.zeros(3))


def test_disagreement_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="Tensor\\[B, A, N\\]"):
        disagreement(torch.zeros(2, 5, 3), torch.zeros(2, 4, 3))


def test_uncertainty_matches_loop():
    p = torch.rand(5, 4, generator=torch.Generator().manual_seed(0))
    want = torch.tensor([sum(1 - abs(2 * p[b, c].item() - 1) for c in range(4)) / 4 for b in range(5)])
    torch.testing.assert_close(image_uncertainty(p), want)
    assert image_uncertainty(torch.tensor([[0.5, 0.5]])).item() == 1.0
    assert image_uncertainty(torch.tensor([[0.0, 1.0]])).item() == 0.0


def test_best_box_scores_and_conflict_match_loop():
    scores = [torch.tensor([0.9, 0.2, 0.6]), torch.zeros(0), torch.tensor([0.3])]
    labels = [torch.tensor([1, 1, 2]), torch.zeros(0, dtype=torch.int64), torch.tensor([0])]
    best = best_box_scores(scores, labels, 3)
    want = torch.zeros(3, 3)
    for b, (sc, lb) in enumerate(zip(scores, labels)):
        for v, c in zip(sc.tolist(), lb.tolist()):
            want[b, c] = max(want[b, c].item(), v)
    assert torch.equal(best, want)

    y = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    weak = torch.tensor([True, True, False])
    value, conflicts = cross_granularity_conflict(best, y, weak, threshold=0.5)
    for b in range(3):
        flags = [bool(weak[b]) and ((y[b, c] == 1 and best[b, c] < 0.5) or (y[b, c] == 0 and best[b, c] >= 0.5))
                 for c in range(3)]
        assert conflicts[b].tolist() == flags
        gaps = [abs(y[b, c].item() - best[b, c].item()) for c in range(3) if flags[c]]
        assert value[b].item() == pytest.approx(max(gaps, default=0.0))
    # image 0: Effusion labelled without a box, and a confident Mass box the labels do not list
    assert conflicts[0].tolist() == [True, True, True]
    assert value[2].item() == 0.0  # not weak: never a conflict


def test_score_batch_weights_the_parts():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, 3, generator=g)
    probs, best = torch.rand(2, 3, generator=g), torch.rand(2, 3, generator=g)
    y, weak = torch.tensor([[1.0, 0, 0], [0, 0, 0]]), torch.tensor([True, False])
    parts = score_batch(t, s, probs, best, y, weak, ScoreConfig(top_k=3, weights=(2.0, 0.5, 1.0)))
    torch.testing.assert_close(parts.value, 2 * parts.disagreement + 0.5 * parts.uncertainty + parts.conflict)


def test_explain_reads_like_a_radiologist_would():
    per_class = torch.tensor([0.01, 0.30, 0.20])
    action, reason = explain(granularity="unlabeled", value=0.31, class_disagreement=per_class,
                             image_probs=torch.tensor([0.5, 0.05, 0.95]), best_scores=torch.zeros(3),
                             image_labels=torch.zeros(3), conflicts=torch.zeros(3, dtype=torch.bool), classes=CLASSES)
    assert action == ADD_LABELS
    assert reason["text"] == "teacher and student disagree on Mass, Nodule; unsure whether Effusion is present (score 0.31)"
    assert reason["classes"] == ["Mass", "Nodule", "Effusion"]
    action, reason = explain(granularity="weak", value=0.8, class_disagreement=per_class, image_probs=torch.full((3,), 0.9),
                             best_scores=torch.tensor([0.1, 0.7, 0.0]), image_labels=torch.tensor([1.0, 0.0, 0.0]),
                             conflicts=torch.tensor([True, True, False]), classes=CLASSES)
    assert action == DRAW_BOXES
    assert reason["text"].startswith("labels say Effusion but no box found; confident Mass box but the labels do not list it")
    with pytest.raises(ValueError, match="unlabeled and weak"):
        explain(granularity="full", value=0.0, class_disagreement=per_class, image_probs=per_class, best_scores=per_class,
                image_labels=per_class, conflicts=torch.zeros(3, dtype=torch.bool), classes=CLASSES)


def test_score_images_one_result_per_image_in_original_pixels(tmp_path):
    records = []
    for i, (granularity, labels) in enumerate([("unlabeled", ()), ("weak", (0,)), ("weak", ())]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 160), dtype=np.uint8)).save(path)
        records.append(Record(i + 1, path, granularity, 160, 96, image_labels=labels, negative=granularity == "weak" and not labels))
    torch.manual_seed(0)
    student = build_model(preset="tiny", num_classes=3, image_size=64)
    teacher = build_model(preset="tiny", num_classes=3, image_size=64)
    config = ScoreConfig(top_k=10)
    results = score_images(student, teacher, records, CLASSES, config=config, batch_size=2)
    with torch.no_grad():
        c5_channels = student.eval().dense(torch.rand(1, 1, 64, 64))["c5"].shape[1]
    assert [r.image_id for r in results] == [1, 2, 3]
    assert [r.action for r in results] == [ADD_LABELS, DRAW_BOXES, DRAW_BOXES]
    for r in results:
        assert r.boxes.shape[1:] == (4,) and len(r.boxes) == len(r.scores) == len(r.labels)
        assert (r.boxes[:, 2] <= 160 + 1e-3).all() and (r.boxes[:, 3] <= 96 + 1e-3).all()
        assert r.value == pytest.approx(r.disagreement + r.uncertainty + r.conflict, rel=1e-5)
        assert r.image_probs.shape == (3,) and r.attention.shape[0] == 3
        assert r.embedding.shape == (c5_channels,)
        assert (r.embedding >= 0).all()  # pooled ReLU(C5): the diversity strategies' embedding
    assert not torch.equal(results[0].embedding, results[1].embedding)
    assert results[0].conflict == 0.0
    same = score_images(student, student, records[:1], CLASSES, config=config)
    assert same[0].disagreement > 0  # the teacher's view is photometrically different
    full = Record(9, records[0].path, "full", 160, 96)
    with pytest.raises(ValueError, match="1 are full"):
        score_images(student, teacher, [full], CLASSES)


def test_not_assessed_classes_never_conflict():
    best = torch.tensor([[0.9, 0.9, 0.1]])
    y, weak = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([True])
    _, all_known = cross_granularity_conflict(best, y, weak)
    assert all_known[0].tolist() == [True, True, True]
    known = torch.tensor([[1.0, 0.0, 1.0]])  # class 1 not assessed: its confident box contradicts nothing
    value, conflicts = cross_granularity_conflict(best, y, weak, known=known)
    assert conflicts[0].tolist() == [True, False, True]
    assert value.item() == pytest.approx(0.9)
    with pytest.raises(ValueError, match="known"):
        cross_granularity_conflict(best, y, weak, known=torch.ones(1, 2))
