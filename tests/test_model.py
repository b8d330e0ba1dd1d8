"""The OXnet model: forward contract, which loss applies to which granularity, the box losses against a
loop oracle, DAA gradient flow, prototype buffers, the EMA teacher and pseudo-box filtering."""

import math

import pytest
import torch

from oxnet.modeling.config import LOSS_NAMES, build_model
from oxnet.modeling.detector import OXNet
from oxnet.modeling.teacher import MeanTeacher

N = 3
SIZE = 64


def make_model(**overrides):
    torch.manual_seed(0)
    return build_model(preset="tiny", num_classes=N, **overrides)


def full(boxes, labels):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor(labels, dtype=torch.int64)
    y = torch.zeros(N)
    y[labels[labels < N]] = 1
    return {"granularity": "full", "boxes": boxes, "labels": labels, "image_labels": y}


def weak(present):
    y = torch.zeros(N)
    y[list(present)] = 1
    return {"granularity": "weak", "image_labels": y}


def unlabeled():
    return {"granularity": "unlabeled"}


def images(b):
    return torch.rand(b, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(b))


# ------------------------------------------------------------------------------------------ building
def test_presets_and_options():
    assert build_model(preset="paper", num_classes=9).config.levels == (2, 3, 4, 5, 6, 7)
    m = build_model(preset="tiny", num_classes=4, depth=34, fpn_width=16, head_depth=2)
    assert m.backbone.out_channels == 16 and len(m.cls_head.conv) == 2 and m.prototypes.shape == (4, 512)
    with pytest.raises(ValueError, match="preset"):
        build_model(preset="huge")
    with pytest.raises(TypeError, match="unknown model options"):
        build_model(preset="tiny", depht=50)
    with pytest.raises(ValueError, match="levels"):
        build_model(preset="tiny", levels=(3, 5))
    with pytest.raises(ValueError, match="gpa=True needs daa"):
        build_model(preset="tiny", daa=False)


def test_imagenet_weights_unavailable_warns_and_trains_from_scratch(monkeypatch):
    from torchvision.models import ResNet18_Weights

    def offline(self, *a, **k):
        raise OSError("no internet")

    monkeypatch.setattr(type(ResNet18_Weights.DEFAULT), "get_state_dict", offline)
    with pytest.warns(UserWarning, match=r"unavailable.*weights='/path/to/resnet18.pth'"):
        m = build_model(preset="tiny", num_classes=N, weights="imagenet")
    assert isinstance(m, OXNet)


def test_local_backbone_weights(tmp_path):
    from torchvision.models import resnet18, resnet34

    ref = resnet18()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    m = build_model(preset="tiny", num_classes=N, weights=str(tmp_path / "r18.pth"))
    torch.testing.assert_close(m.backbone.body.conv1.weight, ref.conv1.weight)
    torch.save(resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match="r34.pth is not a ResNet-18"):
        build_model(preset="tiny", num_classes=N, weights=str(tmp_path / "r34.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model(preset="tiny", num_classes=N, weights=str(tmp_path / "missing.pth"))


# ------------------------------------------------------------------------------------------ contract
def test_eval_returns_detections_image_probs_and_attention():
    m = make_model().eval()
    out = m(images(2))
    assert len(out) == 2
    for det in out:
        assert det["boxes"].shape[1] == 4 and det["scores"].shape == det["labels"].shape
        assert det["labels"].dtype == torch.int64
        assert det["image_probs"].shape == (N,)
        assert det["attention"].shape == (N, 2, 2)  # C5 grid of a 64 px image
        torch.testing.assert_close(det["attention"].sum((-2, -1)), torch.ones(N))


def test_grayscale_and_rgb_inputs_agree():
    m = make_model().eval()
    x = images(1)
    a, b = m(x)[0], m(x.expand(-1, 3, -1, -1))[0]
    torch.testing.assert_close(a["image_probs"], b["image_probs"])


@pytest.mark.parametrize(
    "targets, nonzero, zero",
    [
        ([full([[5, 5, 40, 40]], [1])], {"classification", "bbox_regression", "image_bce"}, {"soft_focal"}),
        ([full([], [])], {"classification", "image_bce"}, {"bbox_regression", "soft_focal"}),  # negative image
        ([weak([0])], {"image_bce", "soft_focal"}, {"classification", "bbox_regression"}),
        ([weak([])], {"image_bce", "soft_focal"}, {"classification", "bbox_regression"}),  # "no finding"
        ([unlabeled()], {"soft_focal"}, {"classification", "bbox_regression", "image_bce", "prototype_intra"}),
        ([full([[5, 5, 40, 40]], [0]), weak([2]), unlabeled()], {"classification", "image_bce", "soft_focal"}, set()),
    ],
)
def test_each_loss_applies_only_to_its_granularities(targets, nonzero, zero):
    mt = MeanTeacher(make_model()).train()
    losses = mt(images(len(targets)), targets, images(len(targets)) * 0.9)
    assert set(losses) == set(LOSS_NAMES)
    for name in nonzero:
        assert losses[name] > 0, name
    for name in zero:
        assert losses[name] == 0, name
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in mt.student.parameters() if p.grad is not None)


def test_retinanet_mode_ignores_weak_and_unlabeled():
    m = make_model(daa=False, gpa=False, sfl=False).train()
    losses = m(images(3), [full([[5, 5, 40, 40]], [1]), weak([0]), unlabeled()])
    assert losses["classification"] > 0
    assert all(losses[k] == 0 for k in ("image_bce", "prototype_intra", "prototype_inter", "soft_focal"))


def test_loss_weights_scale_named_losses():
    t = [full([[5, 5, 40, 40]], [1])]
    a = make_model().train()(images(1), t)
    b = make_model(loss_weights={"classification": 2.0}).train()(images(1), t)
    torch.testing.assert_close(b["classification"], 2 * a["classification"])
    with pytest.raises(ValueError, match="unknown loss_weights"):
        make_model(loss_weights={"focal": 1.0})


@pytest.mark.parametrize(
    "x, targets, match",
    [
        (torch.full((1, 1, SIZE, SIZE), float("nan")), [full([], [])], "NaN"),
        (images(1), [full([[5, 5, float("nan"), 40]], [1])], "NaN"),
        (images(1), [full([[5, 5, 5, 40]], [1])], "zero or negative size"),
        (images(1), [full([[5, 5, 30, 40]], [7])], "labels"),
        (images(1), [{"granularity": "boxes"}], "granularity"),
        (images(1), [{"granularity": "weak"}], "image_labels"),
        (images(2), [full([], [])], "2 images but 1 targets"),
        (torch.rand(1, 2, SIZE, SIZE), [full([], [])], "images must be"),
    ],
)
def test_bad_input_is_rejected_clearly(x, targets, match):
    with pytest.raises(ValueError, match=match):
        make_model().train()(x, targets)


# ------------------------------------------------------------------------------------------ box losses vs oracle
def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _smooth_l1(x, beta=1 / 9):
    x = abs(x)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta


def match_oracle(gts, anchors):
    """Per anchor: the matched box index, -1 background or -2 ignored (IoU 0.5 / 0.4, every box keeps
    its best anchors as low-quality matches)."""
    match = []
    for a in anchors:
        ious = [_iou(g, a) for g in gts]
        best = max(ious) if ious else 0.0
        j = ious.index(best) if ious else -1
        match.append(j if best >= 0.5 else (-1 if best < 0.4 else -2))
    for g in gts:
        ious = [_iou(g, a) for a in anchors]
        top = max(ious)
        for ai, v in enumerate(ious):
            if v == top:
                own = [_iou(h, anchors[ai]) for h in gts]
                match[ai] = own.index(max(own))
    return match


def regression_oracle(delta, a, g):
    aw, ah = a[2] - a[0], a[3] - a[1]
    gw, gh = g[2] - g[0], g[3] - g[1]
    tgt = [
        10 * ((g[0] + gw / 2) - (a[0] + aw / 2)) / aw,
        10 * ((g[1] + gh / 2) - (a[1] + ah / 2)) / ah,
        5 * math.log(gw / aw),
        5 * math.log(gh / ah),
    ]
    return sum(_smooth_l1(float(delta[k]) - tgt[k]) for k in range(4))


def box_loss_oracle(logits, deltas, anchors, targets, alpha=0.25, gamma=2.0):
    """Loops over images, anchors, boxes and classes: matching, focal loss on non-ignored anchors,
    smooth-L1 on encoded deltas, both over the batch's foreground count (also returned)."""
    cls_sum, reg_sum, n_fg = 0.0, 0.0, 0
    A = anchors.tolist()
    for b, t in enumerate(targets):
        gts, gl = t["boxes"].tolist(), t["labels"].tolist()
        match = match_oracle(gts, A)
        for ai, a in enumerate(A):
            if match[ai] == -2:
                continue
            for c in range(logits.shape[-1]):
                q = torch.sigmoid(logits[b, ai, c])
                if match[ai] >= 0 and gl[match[ai]] == c:
                    cls_sum = cls_sum - alpha * (1 - q) ** gamma * torch.log(q)
                else:
                    cls_sum = cls_sum - (1 - alpha) * q**gamma * torch.log(1 - q)
            if match[ai] >= 0:
                n_fg += 1
                reg_sum = reg_sum + regression_oracle(deltas[b, ai], a, gts[match[ai]])
    n = max(1, n_fg)
    return cls_sum / n, reg_sum / n, n_fg


def soft_loss_oracle(logits, deltas, anchors, targets, real_positives, alpha=0.9, gamma=2.0, eps=0.05):
    """Loops: SFL per anchor and class on anchors not ignored by the pseudo-boxes, smooth-L1 towards the
    matched pseudo-boxes, both over (pseudo-positive + real positive) anchors."""
    sfl_sum, reg_sum, n_fg = 0.0, 0.0, 0
    A = anchors.tolist()
    for b, t in enumerate(targets):
        match = match_oracle(t["pseudo_boxes"].tolist(), A) if len(t["pseudo_boxes"]) else [-1] * len(A)
        for ai, a in enumerate(A):
            if match[ai] == -2:
                continue
            for c in range(logits.shape[-1]):
                q, qt = torch.sigmoid(logits[b, ai, c]), float(t["soft_labels"][ai, c])
                bce = -(qt * torch.log(q) + (1 - qt) * torch.log(1 - q))
                sfl_sum = sfl_sum + (alpha * qt + eps) * abs(qt - q) ** gamma * bce
            if match[ai] >= 0:
                n_fg += 1
                reg_sum = reg_sum + regression_oracle(deltas[b, ai], a, t["pseudo_boxes"].tolist()[match[ai]])
    n = max(1, n_fg + real_positives)
    return sfl_sum / n, reg_sum / n


def test_box_losses_match_loop_oracle():
    m = make_model(daa=False, gpa=False, sfl=False).train()
    targets = [full([[4, 6, 30, 28], [20, 22, 60, 50]], [0, 2]), full([], []), full([[33, 1, 47, 21]], [1])]
    x = images(3)
    losses = m(x, targets)
    with torch.no_grad():
        dense = m.dense(x)
    cls, reg, _ = box_loss_oracle(dense["cls_logits"], dense["bbox_deltas"], dense["anchors"], targets)
    torch.testing.assert_close(losses["classification"], cls.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["bbox_regression"], torch.tensor(reg, dtype=torch.float32), rtol=1e-4, atol=1e-5)


def test_soft_losses_match_loop_oracle_with_the_batch_positive_count():
    """SFL and pseudo-box regression over pseudo-positive + real positive anchors of the batch."""
    m = make_model(daa=False, gpa=False, sfl=True).train()
    x = images(3)
    with torch.no_grad():
        dense = m.dense(x)
    A = len(dense["anchors"])
    soft = torch.rand(2, A, N, generator=torch.Generator().manual_seed(7))
    pseudo = [
        {"granularity": "unlabeled", "soft_labels": soft[0], "pseudo_boxes": torch.tensor([[10.0, 12.0, 40.0, 44.0]]),
         "pseudo_labels": torch.tensor([1])},
        {"granularity": "weak", "image_labels": torch.zeros(N), "soft_labels": soft[1],
         "pseudo_boxes": torch.zeros(0, 4), "pseudo_labels": torch.zeros(0, dtype=torch.int64)},
    ]
    box_target = full([[4, 6, 30, 28], [20, 22, 60, 50]], [0, 2])
    losses = m(x, [box_target, *pseudo])
    _, _, real = box_loss_oracle(dense["cls_logits"][:1], dense["bbox_deltas"][:1], dense["anchors"], [box_target])
    sfl, reg = soft_loss_oracle(dense["cls_logits"][1:], dense["bbox_deltas"][1:], dense["anchors"], pseudo, real)
    assert real > 0 and reg > 0
    torch.testing.assert_close(losses["soft_focal"], sfl.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["pseudo_bbox_regression"], torch.tensor(reg, dtype=torch.float32), rtol=1e-4, atol=1e-6)



def test_forward_loss_dict_equals_the_pure_losses_called_directly():
    """Each head's loss equals, bit for bit, the pure function (modeling/losses.py, torchvision's focal
    loss and smooth-L1) applied to the dense outputs with torchvision's matcher and box coder."""
    from torchvision.models.detection import _utils as det_utils
    from torchvision.ops import box_iou, sigmoid_focal_loss

    from oxnet.modeling import losses as L

    m = make_model().train()
    x = images(4)
    with torch.no_grad():
        m.image_head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))  # non-zero X
        dense = m.dense(x)
    A = len(dense["anchors"])
    soft = torch.rand(2, A, N, generator=torch.Generator().manual_seed(3))
    targets = [
        full([[4, 6, 30, 28], [20, 22, 60, 50]], [0, 2]),
        weak_masked([1], [2]),
        {**weak([0]), "soft_labels": soft[0], "pseudo_boxes": torch.tensor([[8.0, 9.0, 36.0, 40.0]]),
         "pseudo_labels": torch.tensor([0])},
        {**unlabeled(), "soft_labels": soft[1], "pseudo_boxes": torch.tensor([[30.0, 2.0, 60.0, 30.0]]),
         "pseudo_labels": torch.tensor([2])},
    ]
    p0, init0 = m.prototypes.clone(), m.prototype_initialized.clone()
    p0[1], init0[1] = torch.rand(p0.shape[1]), True  # one prototype already set: Eq. 5 blends, Eq. 6 has pairs
    with torch.no_grad():
        m.prototypes.copy_(p0)
        m.prototype_initialized.copy_(init0)
    losses = m(x, targets)

    cfg = m.config
    logits, deltas, anchors = dense["cls_logits"].float(), dense["bbox_deltas"].float(), dense["anchors"]
    matcher = det_utils.Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, cfg.allow_low_quality_matches)
    coder = det_utils.BoxCoder(weights=cfg.bbox_weights)

    def assigned(i, boxes, labels):
        matched = matcher(box_iou(boxes, anchors))
        fg, valid = matched >= 0, matched != matcher.BETWEEN_THRESHOLDS
        onehot = torch.zeros_like(logits[i])
        onehot[fg.nonzero().squeeze(1), labels[matched[fg]]] = 1.0
        return onehot, valid, fg, boxes[matched.clamp_min(0)]

    def regression(i, fg, matched_boxes):
        target = coder.encode_single(matched_boxes[fg], anchors[fg])
        return torch.nn.functional.smooth_l1_loss(deltas[i][fg], target, beta=cfg.smooth_l1_beta, reduction="sum")

    onehot, valid, fg, matched_boxes = assigned(0, targets[0]["boxes"], targets[0]["labels"])
    real = fg.sum()
    focal = sigmoid_focal_loss(logits[0], onehot, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, reduction="none")
    expected = {
        "classification": (focal * valid[:, None]).sum() / real.clamp_min(1),
        "bbox_regression": regression(0, fg, matched_boxes) / real.clamp_min(1),
    }
    soft_idx = [2, 3]  # the batch's anchors in one sum, as a batched loss adds them
    per_image = [assigned(i, targets[i]["pseudo_boxes"], targets[i]["pseudo_labels"]) for i in soft_idx]
    valid = torch.stack([v for _, v, _, _ in per_image])
    sfl = L.soft_focal_loss(logits[soft_idx], soft, alpha=cfg.sfl_alpha, gamma=cfg.sfl_gamma, eps=cfg.sfl_eps)
    pred = torch.cat([deltas[i][fg] for i, (_, _, fg, _) in zip(soft_idx, per_image)])
    target = torch.cat([coder.encode_single(mb[fg], anchors[fg]) for _, _, fg, mb in per_image])
    pseudo = sum(int(fg.sum()) for _, _, fg, _ in per_image)
    norm = max(1, pseudo + int(real))
    sfl_sum = (sfl * valid[..., None]).sum()
    reg_sum = torch.nn.functional.smooth_l1_loss(pred, target, beta=cfg.smooth_l1_beta, reduction="sum")
    expected["soft_focal"], expected["pseudo_bbox_regression"] = sfl_sum / norm, reg_sum / norm

    level_probs = [c.float().sigmoid().view(4, -1, N, *c.shape[-2:]).amax(1) for c in dense["level_cls"]]
    attention = L.local_attention(level_probs, tuple(dense["c5"].shape[-2:]))
    image_logits = L.dual_attention_logits(torch.nn.functional.conv2d(dense["c5"], m.image_head.weight), attention)
    idx = torch.tensor([0, 1, 2])
    y = torch.stack([targets[i]["image_labels"] for i in idx])
    known = torch.stack([torch.ones(N), targets[1]["image_label_mask"], torch.ones(N)])
    expected["image_bce"] = L.image_level_bce(image_logits[idx], y, known)
    feats = L.category_features(torch.relu(dense["c5"][idx]), attention[idx])
    p1, init1 = L.update_prototypes(p0, init0, feats, image_logits[idx].sigmoid(), y, cfg.prototype_momentum)
    expected["prototype_intra"], expected["prototype_inter"] = L.prototype_losses(feats, p1, init1, y, cfg.inter_margin)

    assert set(losses) == set(LOSS_NAMES) == set(expected)
    for name in LOSS_NAMES:
        assert losses[name] > 0, name
        assert torch.equal(losses[name].detach(), expected[name].detach()), (name, losses[name], expected[name])
    assert torch.equal(m.prototypes, p1) and torch.equal(m.prototype_initialized, init1)


# ------------------------------------------------------------------------------------------ DAA, GPA
def test_daa_gradient_reaches_the_local_classification_head():
    m = make_model(gpa=False, sfl=False).train()
    torch.nn.init.normal_(m.image_head.weight)  # zero-initialised: give X some signal first
    losses = m(images(2), [weak([0]), weak([1, 2])])
    losses["image_bce"].backward()
    assert m.cls_head.out.weight.grad.abs().sum() > 0
    assert m.cls_head.conv[0][0].weight.grad.abs().sum() > 0
    assert m.reg_head.out.weight.grad is None or m.reg_head.out.weight.grad.abs().sum() == 0


def test_prototypes_are_buffers_that_survive_state_dict_and_to():
    m = make_model().train()
    m(images(2), [weak([0]), full([[5, 5, 40, 40]], [2])])
    assert m.prototype_initialized.tolist() == [True, False, True]
    assert m.prototypes[0].abs().sum() > 0 and m.prototypes[1].abs().sum() == 0
    state = m.state_dict()
    assert "prototypes" in state and "prototype_initialized" in state
    fresh = make_model()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.prototypes, m.prototypes)
    assert torch.equal(fresh.prototype_initialized, m.prototype_initialized)
    as_double = fresh.to(torch.float64)
    assert as_double.prototypes.dtype == torch.float64
    assert as_double.prototype_initialized.dtype == torch.bool


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prototypes_move_to_cuda_and_train_under_amp():
    m = make_model().cuda().train()
    targets = [weak([0]), full([[5, 5, 40, 40]], [2])]
    with pytest.raises(ValueError, match=r"targets\[0\]\['image_labels'\] is on cpu but the images are on cuda"):
        m(images(2).cuda(), targets)
    on_gpu = [{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    with torch.autocast("cuda", dtype=torch.float16):
        losses = m(images(2).cuda(), on_gpu)
    sum(losses.values()).backward()
    assert m.prototypes.is_cuda and m.prototype_initialized.any()


# ------------------------------------------------------------------------------------------ teacher
def test_teacher_ema_matches_formula():
    student = make_model()
    mt = MeanTeacher(student, ema_decay=0.99)
    expected = {k: v.clone() for k, v in mt.teacher.state_dict().items()}
    for t in range(4):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        lam = mt.update_teacher()
        assert lam == pytest.approx(min(1 - 1 / (t + 1), 0.99))
        for k, s in student.state_dict().items():
            if s.dtype.is_floating_point:
                expected[k] = lam * expected[k] + (1 - lam) * s
            else:
                expected[k] = s.clone()
    for k, v in mt.teacher.state_dict().items():
        torch.testing.assert_close(v, expected[k], msg=k)
    assert not any(p.requires_grad for p in mt.teacher.parameters())


def test_mean_teacher_only_trains_and_predicting_goes_through_student_or_teacher():
    mt = MeanTeacher(make_model()).eval()
    with pytest.raises(ValueError, match=r"\.student or \.teacher"):
        mt(images(1))
    assert len(mt.student(images(1))) == 1 and len(mt.teacher(images(1))) == 1


def test_teacher_stays_in_eval_mode_and_gets_no_gradient():
    mt = MeanTeacher(make_model()).train()
    assert mt.student.training and not mt.teacher.training
    losses = mt(images(2), [weak([0]), unlabeled()], images(2))
    sum(losses.values()).backward()
    assert all(p.grad is None for p in mt.teacher.parameters())


def test_pseudo_boxes_follow_image_labels_on_weak_images_only():
    mt = MeanTeacher(make_model())
    with torch.no_grad():
        mt.teacher.cls_head.out.bias.fill_(4.0)  # a confident teacher: every class everywhere
    targets = mt.pseudo_label(images(3), [weak([1]), unlabeled(), weak([])])
    assert targets[0]["pseudo_labels"].unique().tolist() == [1]
    assert set(targets[1]["pseudo_labels"].unique().tolist()) == {0, 1, 2}
    assert len(targets[2]["pseudo_boxes"]) == 0  # "no finding": nothing kept, SFL still applies
    for t in targets:
        assert t["soft_labels"].shape[1] == N
        assert (t["pseudo_boxes"][:, 2:] > t["pseudo_boxes"][:, :2]).all()
    losses = mt.train()(images(3), [weak([1]), unlabeled(), weak([])], images(3))
    assert losses["soft_focal"] > 0 and losses["pseudo_bbox_regression"] > 0


def test_soft_focal_is_zero_when_student_equals_teacher_view():
    mt = MeanTeacher(make_model(daa=False, gpa=False))
    mt.update_teacher()  # l_0 = 0: teacher := student
    mt.student.eval()  # same BatchNorm behaviour as the teacher
    x = images(1)
    targets = mt.pseudo_label(x, [unlabeled()])
    losses = mt.student.compute_losses(x, targets)
    assert losses["soft_focal"] < 1e-8


# ------------------------------------------------------------------------------------------ not assessed
def weak_masked(present, unknown):
    target = weak(present)
    mask = torch.ones(N)
    mask[list(unknown)] = 0
    return {**target, "image_label_mask": mask}


def test_not_assessed_classes_are_masked_from_the_image_level_loss():
    """Class 2 not assessed: no loss term and no gradient on its logit; read as absent it has both."""
    m = make_model(gpa=False).train()
    x = images(2)
    with torch.no_grad():  # non-zero image-level logits
        m.image_head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    a = m(x, [weak_masked([0], [2]), full([[5, 5, 40, 40]], [1])])["image_bce"]
    dense = m.dense(x)
    logits, _ = m.image_level(dense)
    logits.retain_grad()
    y = torch.stack([weak([0])["image_labels"], torch.tensor([0.0, 1.0, 0.0])])
    from oxnet.modeling import losses as L
    masked = L.image_level_bce(logits, y, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))
    torch.testing.assert_close(masked, a)  # the model applies the target's mask
    masked.backward()
    assert logits.grad[0, 2] == 0 and logits.grad[1, 2] != 0
    unmasked = m(x, [weak([0]), full([[5, 5, 40, 40]], [1])])["image_bce"]
    assert not torch.allclose(a, unmasked)
    with pytest.raises(ValueError, match="image_label_mask"):
        m(x, [{**weak([0]), "image_label_mask": torch.ones(N + 1)}, full([], [])])
    with pytest.raises(ValueError, match="both present"):
        m(x, [weak_masked([2], [2]), full([], [])])


def test_pseudo_boxes_of_not_assessed_classes_are_kept_on_weak_images():
    mt = MeanTeacher(make_model())
    with torch.no_grad():
        mt.teacher.cls_head.out.bias.fill_(4.0)  # a confident teacher: every class everywhere
    targets = mt.pseudo_label(images(2), [weak_masked([1], [2]), weak([1])])
    assert set(targets[0]["pseudo_labels"].unique().tolist()) == {1, 2}  # class 0 is known absent
    assert targets[1]["pseudo_labels"].unique().tolist() == [1]


def test_prototypes_use_present_classes_only_so_not_assessed_changes_nothing_there():
    """GPA (Eq. 5-6) pools present classes; a class read as absent or as not assessed is never one."""
    x = images(2)
    out = []
    for targets in ([weak_masked([0], [1, 2]), full([[5, 5, 40, 40]], [1])], [weak([0]), full([[5, 5, 40, 40]], [1])]):
        m = make_model().train()
        losses = m(x, targets)
        out.append((losses["prototype_intra"], losses["prototype_inter"], m.prototypes.clone(), m.prototype_initialized.clone()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b)
    assert out[0][3].tolist() == [True, True, False]
