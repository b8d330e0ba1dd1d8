"""Anchor sizes and ratios as model options, their fit to a dataset's boxes (oxnet.data.anchors), the
coverage measures against loop oracles and the model's own anchors, and `oxnet anchors`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from oxnet.cli import main as oxnet_main
from oxnet.data.anchors import (
    anchor_grid, anchor_report, anchor_shapes, best_grid_iou, centred_iou, fit_anchor_ratios, fit_anchor_sizes,
    input_box_sides, kmeans_1d,
)
from oxnet.modeling.config import ANCHOR_SCALES, DEFAULT_ANCHOR_RATIOS, ModelConfig, build_model, default_anchor_sizes


# -- the model options -----------------------------------------------------------------------------
def test_default_anchors_are_retinanet_s():
    model = build_model(preset="tiny", num_classes=2)
    sizes, ratios = model.config.anchor_settings()
    assert ratios == (0.5, 1.0, 2.0) and len(sizes) == 3
    for lvl, level_sizes in zip((3, 4, 5), sizes):
        assert level_sizes == pytest.approx([2 ** (lvl + 2) * 2 ** (i / 3) for i in range(3)])
    assert model.anchor_generator.sizes == sizes


def test_anchor_options_reach_the_anchor_generator():
    model = build_model(preset="tiny", num_classes=2, anchor_sizes=[10, 20, 40], anchor_ratios=(0.5, 1.0))
    assert model.config.anchor_sizes == (10.0, 20.0, 40.0)  # a list (as from JSON) becomes a tuple
    assert model.anchor_generator.num_anchors_per_location() == [6, 6, 6]
    cell = model.anchor_generator.generate_anchors([10 * k for k in ANCHOR_SCALES], [0.5, 1.0])
    widths, heights = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    assert widths.tolist() == pytest.approx([14, 18, 22, 10, 12, 16], abs=1)  # 10 k / sqrt(0.5), then 10 k
    assert heights[3:].tolist() == pytest.approx(widths[3:].tolist())
    losses = model.train()(torch.rand(1, 1, 128, 128), [{"granularity": "full", "boxes": torch.tensor([[8.0, 8.0, 30.0, 40.0]]),
                                                         "labels": torch.tensor([0]), "image_labels": torch.tensor([1.0, 0.0])}])
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("options, match", [
    ({"anchor_sizes": (10, 20)}, r"anchor_sizes needs one size per pyramid level \(3, 4, 5\), got 2"),
    ({"anchor_sizes": (10, 40, 20)}, "anchor_sizes must increase"),
    ({"anchor_sizes": (0, 20, 40)}, "anchor_sizes must be positive"),
    ({"anchor_sizes": (10, math.inf, 40)}, "anchor_sizes must be positive finite"),
    ({"anchor_sizes": 32}, "anchor_sizes must be a tuple of numbers"),
    ({"anchor_ratios": ()}, "anchor_ratios must be positive"),
    ({"anchor_ratios": (1.0, -2.0)}, "anchor_ratios must be positive"),
    ({"anchor_ratios": ("wide",)}, "anchor_ratios must be a tuple of numbers"),
])
def test_bad_anchor_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(levels=(3, 4, 5), **options)


# -- the fit -----------------------------------------------------------------------------------------
def test_input_box_sides_follow_the_stretch_resize():
    sides = input_box_sides(np.array([[100.0, 50.0]]), np.array([[1000.0, 500.0]]), 256)
    np.testing.assert_allclose(sides, [[25.6, 25.6]])
    with pytest.raises(ValueError, match="boxes_wh must be positive"):
        input_box_sides(np.array([[0.0, 5.0]]), np.array([[10.0, 10.0]]), 64)
    with pytest.raises(ValueError, match="image_wh must be positive"):
        input_box_sides(np.array([[5.0, 5.0]]), np.array([[0.0, 10.0]]), 64)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        input_box_sides(np.zeros((3, 4)), np.zeros((3, 2)), 64)


def _kmeans_loop(values, k, iterations=100):
    """Lloyd's algorithm written out point by point: the oracle of kmeans_1d."""
    values = sorted(float(v) for v in values)
    centres = [float(np.quantile(values, (i + 0.5) / k)) for i in range(k)]
    for _ in range(iterations):
        members: list[list[float]] = [[] for _ in range(k)]
        for v in values:
            members[min(range(k), key=lambda j: abs(v - centres[j]))].append(v)
        new = [sum(m) / len(m) if m else c for m, c in zip(members, centres)]
        if new == centres:
            break
        centres = new
    return sorted(centres)


def test_kmeans_matches_the_loop_oracle_and_finds_separated_clusters():
    rng = np.random.default_rng(0)
    values = rng.lognormal(3.0, 0.8, size=200)
    for k in (1, 3, 5):
        np.testing.assert_allclose(kmeans_1d(values, k), _kmeans_loop(values, k), rtol=1e-9)
    clusters = np.concatenate([np.full(10, 1.0), np.full(30, 5.0), np.full(5, 9.0)])
    np.testing.assert_allclose(kmeans_1d(clusters + rng.normal(0, 0.01, 45), 3), [1.0, 5.0, 9.0], atol=0.02)
    with pytest.raises(ValueError, match="k-means needs"):
        kmeans_1d(values[:2], 3)


def test_fit_places_each_levels_middle_scale_on_a_size_cluster():
    sizes = np.repeat([16.0, 64.0, 256.0], 20) * np.exp(np.random.default_rng(1).normal(0, 0.02, 60))
    boxes_wh = np.stack([sizes, sizes], axis=1) * 2  # images of 1024 px read at 512: half the side
    image_wh = np.full((60, 2), 1024.0)
    fitted = fit_anchor_sizes(boxes_wh, image_wh, 512, levels=(3, 4, 5))
    np.testing.assert_allclose(np.array(fitted) * ANCHOR_SCALES[1], [16, 64, 256], rtol=0.02)
    ModelConfig(levels=(3, 4, 5), anchor_sizes=fitted)  # a valid option
    with pytest.raises(ValueError, match="fewer distinct sizes than the 3 levels"):
        fit_anchor_sizes(np.full((5, 2), 10.0), np.full((5, 2), 100.0), 100, levels=(3, 4, 5))
    with pytest.raises(ValueError, match="needs at least 3 boxes"):
        fit_anchor_sizes(np.full((2, 2), 10.0), np.full((2, 2), 100.0), 100, levels=(3, 4, 5))


def test_fit_ratios_find_tall_and_wide_boxes():
    boxes_wh = np.array([[10.0, 20.0]] * 10 + [[20.0, 10.0]] * 10 + [[15.0, 15.0]] * 10)
    assert fit_anchor_ratios(boxes_wh, np.full((30, 2), 100.0), 100) == (0.5, 1.0, 2.0)


# -- coverage ----------------------------------------------------------------------------------------
def test_centred_iou_matches_a_loop_oracle():
    rng = np.random.default_rng(2)
    boxes, anchors = rng.uniform(1, 100, (7, 2)), rng.uniform(1, 100, (11, 2))
    expected = np.zeros((7, 11))
    for i, (w, h) in enumerate(boxes):
        for j, (aw, ah) in enumerate(anchors):
            inter = min(w, aw) * min(h, ah)
            expected[i, j] = inter / (w * h + aw * ah - inter)
    np.testing.assert_allclose(centred_iou(boxes, anchors), expected, rtol=1e-12)
    np.testing.assert_allclose(centred_iou(boxes, boxes).diagonal(), 1.0)


def test_best_grid_iou_matches_a_loop_oracle():
    rng = np.random.default_rng(3)
    xy, wh = rng.uniform(0, 60, (9, 2)), rng.uniform(1, 40, (9, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    xy, wh = rng.uniform(-10, 60, (50, 2)), rng.uniform(1, 40, (50, 2))
    anchors = np.concatenate([xy, xy + wh], axis=1)
    expected = []
    for b in boxes:
        best = 0.0
        for a in anchors:
            iw, ih = max(0.0, min(b[2], a[2]) - max(b[0], a[0])), max(0.0, min(b[3], a[3]) - max(b[1], a[1]))
            union = (b[2] - b[0]) * (b[3] - b[1]) + (a[2] - a[0]) * (a[3] - a[1]) - iw * ih
            best = max(best, iw * ih / union)
        expected.append(best)
    np.testing.assert_allclose(best_grid_iou(boxes, anchors, chunk=4), expected, rtol=1e-12)


def test_anchor_shapes_and_grid_are_the_models_anchors():
    sizes, ratios = (20.0, 45.0, 90.0), (0.4, 1.0, 2.5)
    shapes = anchor_shapes(sizes, ratios)
    expected_shapes = [(2 * round(s * k / math.sqrt(r) / 2), 2 * round(s * k * math.sqrt(r) / 2))
                       for s in sizes for r in ratios for k in ANCHOR_SCALES]
    np.testing.assert_array_equal(shapes, expected_shapes)
    for image_size in (96, 100, 128):  # 100: grids that round up (ceil(100 / 32) = 4)
        model = build_model(preset="tiny", num_classes=2, image_size=image_size, anchor_sizes=sizes, anchor_ratios=ratios)
        expected = model.dense(torch.rand(1, 1, image_size, image_size))["anchors"].numpy()
        np.testing.assert_allclose(anchor_grid(sizes, ratios, (3, 4, 5), image_size), expected)


def test_report_on_a_coco_file_and_the_command_line(tmp_path, capsys):
    rng = np.random.default_rng(4)
    images = [{"id": i, "file_name": f"{i}.png", "width": 1024, "height": 1024} for i in range(20)]
    annotations = []
    for i in range(60):  # large boxes (the NIH kind): 300-600 px of 1024
        w, h = rng.uniform(300, 600, 2)
        x, y = rng.uniform(0, 1024 - w), rng.uniform(0, 1024 - h)
        annotations.append({"id": i + 1, "image_id": i % 20, "category_id": 1, "bbox": [x, y, w, h]})
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}))
    report = anchor_report(path, 256, (3, 4, 5))
    assert report["boxes"] == 60 and report["default"]["anchor_sizes"] == list(default_anchor_sizes((3, 4, 5)))
    assert report["default"]["anchor_ratios"] == list(DEFAULT_ANCHOR_RATIOS)
    assert 75 <= report["box_size_quantiles"]["50%"] <= 150  # 300-600 px of 1024 at 256
    sides = np.array([a["bbox"][2:] for a in annotations]) / 4
    centred = centred_iou(sides, anchor_shapes(report["fitted"]["anchor_sizes"], report["fitted"]["anchor_ratios"])).max(1)
    assert report["fitted"]["coverage"]["centred"] == pytest.approx((centred >= 0.5).mean(), abs=1e-4)
    for name in ("default", "fitted_sizes", "fitted"):
        coverage = report[name]["coverage"]
        assert 0 <= coverage["grid"] <= coverage["centred"] <= 1  # centring is the best place for a shape
    assert oxnet_main(["anchors", "--dataset", str(path), "--image-size", "256", "--levels", "3,4,5"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    assert oxnet_main(["anchors", "--dataset", str(path), "--image-size", "256", "--levels", "3,5"]) == 1
    assert "levels must be a contiguous range" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text(json.dumps({"images": images, "annotations": []}))
    assert oxnet_main(["anchors", "--dataset", str(tmp_path / "empty.json"), "--image-size", "256"]) == 1
    assert "empty.json: no boxes to fit anchors to" in capsys.readouterr().err
