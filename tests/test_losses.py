"""Each vectorised equation (1)-(8) against a slow loop oracle kept here, values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from oxnet.modeling import losses as L
@pytest.fixture(autouse=True)
def float64():
    """Oracles and vectorised ops are compared in double precision."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    out.backward()
    return out.detach(), [torch.zeros_like(t) if t.grad is None else t.grad for t in tensors]


# ---------------------------------------------------------------- oracles (plain loops, no vectorising)
def bce_oracle(logits, labels, known=None):
    total = 0.0
    for b in range(logits.shape[0]):
        s = 0.0
        for c in range(logits.shape[1]):
            if known is not None and not known[b, c]:
                continue  # not assessed: no term at all
            p = torch.sigmoid(logits[b, c])
            s = s - (labels[b, c] * torch.log(p) + (1 - labels[b, c]) * torch.log(1 - p))
        total = total + s
    return total / logits.shape[0]


def daa_oracle(level_logits, cam, num_classes):
    """Eq. 2-3 from raw per-level head outputs Tensor[B, A*N, H, W] (channel a*N + c)."""
    B, N = cam.shape[0], num_classes
    size = cam.shape[-2:]
    out_logits = torch.zeros(B, N, dtype=cam.dtype)
    out_att = torch.zeros(B, N, *size, dtype=cam.dtype)
    logits_rows, att_rows = [], []
    for b in range(B):
        lrow, arow = [], []
        for c in range(N):
            best, best_map = None, None
            for lvl in level_logits:
                A = lvl.shape[1] // N
                amap = torch.stack([torch.sigmoid(lvl[b, a * N + c]) for a in range(A)]).max(0).values
                if best is None or amap.max() > best:
                    best, best_map = amap.max(), amap
            r = F.interpolate(best_map[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            r = r / r.sum()
            arow.append(r)
            lrow.append((cam[b, c] * r).sum())
        logits_rows.append(torch.stack(lrow))
        att_rows.append(torch.stack(arow))
    del out_logits, out_att
    return torch.stack(logits_rows), torch.stack(att_rows)


def features_oracle(M, R):
    B, D, h, w = M.shape
    N = R.shape[1]
    out = []
    for b in range(B):
        rows = []
        for c in range(N):
            f = torch.zeros(D, dtype=M.dtype)
            for y in range(h):
                for x in range(w):
                    f = f + M[b, :, y, x] * R[b, c, y, x]
            rows.append(f)
        out.append(torch.stack(rows))
    return torch.stack(out)


def prototype_update_oracle(P, init, feats, probs, labels, beta=0.7):
    P, init = P.clone(), init.clone()
    for c in range(P.shape[0]):
        num, den = torch.zeros(P.shape[1], dtype=P.dtype), 0.0
        for k in range(feats.shape[0]):
            if labels[k, c] == 1:
                num = num + probs[k, c] * feats[k, c]
                den = den + probs[k, c]
        if den > 0:
            b = beta if init[c] else 0.0
            P[c] = b * P[c] + (1 - b) * num / den
            init[c] = True
    return P, init


def prototype_loss_oracle(feats, P, init, labels, margin=1.0):
    def d(a, b):
        return ((a - b) ** 2).mean()

    intra, n_intra, inter, n_inter = 0.0, 0, 0.0, 0
    B, N, _ = feats.shape
    for k in range(B):
        for c in range(N):
            if labels[k, c] != 1:
                continue
            if init[c]:
                intra = intra + d(feats[k, c], P[c])
                n_intra += 1
            for j in range(N):
                if j != c and init[j]:
                    inter = inter + torch.clamp(margin - d(feats[k, c], P[j]), min=0)
                    n_inter += 1
    zero = feats.sum() * 0
    return (intra / n_intra if n_intra else zero), (inter / n_inter if n_inter else zero)


def sfl_oracle(logits, teacher, alpha=0.9, gamma=2.0, eps=0.05):
    out = torch.zeros_like(logits)
    flat_l, flat_t, flat_o = logits.reshape(-1), teacher.reshape(-1), out.reshape(-1)
    vals = []
    for i in range(flat_l.numel()):
        q = torch.sigmoid(flat_l[i])
        qt = flat_t[i]
        bce = -(qt * torch.log(q) + (1 - qt) * torch.log(1 - q))
        vals.append((alpha * qt + eps) * torch.abs(qt - q) ** gamma * bce)
    del flat_o
    return torch.stack(vals).reshape(logits.shape)


# ---------------------------------------------------------------- tests
def test_eq1_image_level_bce_matches_loop():
    logits, labels = torch.randn(4, 5) * 3, (torch.rand(4, 5) > 0.5).double()
    v, (g,) = grads(lambda x: L.image_level_bce(x, labels), logits)
    v_ref, (g_ref,) = grads(lambda x: bce_oracle(x, labels), logits)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(g, g_ref)


def test_eq1_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="one shape"):
        L.image_level_bce(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask"):
        L.image_level_bce(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4))


@pytest.mark.parametrize("seed", [0, 1])
def test_eq1_masked_bce_matches_loop_values_and_gradients(seed):
    """Not-assessed classes (mask 0) add no loss and get no gradient; known ones match the loop."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 6, generator=g) * 3
    labels = (torch.rand(5, 6, generator=g) > 0.5).double()
    known = torch.rand(5, 6, generator=g) > 0.4
    known[0] = True  # a full image: all known
    known[1] = False  # nothing known (the loss must not divide by it)
    v, (grad,) = grads(lambda x: L.image_level_bce(x, labels, known.double()), logits)
    v_ref, (grad_ref,) = grads(lambda x: bce_oracle(x, labels, known), logits)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(grad, grad_ref)
    assert (grad[~known] == 0).all() and (grad[known] != 0).all()
    # Flipping the label of a not-assessed class changes nothing; of a known class, the loss.
    flipped = labels.clone()
    flipped[~known] = 1 - flipped[~known]
    torch.testing.assert_close(L.image_level_bce(logits, flipped, known.double()), v)
    assert not torch.allclose(L.image_level_bce(logits, flipped), L.image_level_bce(logits, labels))
    # An all-ones mask is the unmasked loss; per-image values with reduction="none".
    torch.testing.assert_close(L.image_level_bce(logits, labels, torch.ones_like(logits)), L.image_level_bce(logits, labels))
    per_image = L.image_level_bce(logits, labels, known.double(), reduction="none")
    assert per_image.shape == (5,) and per_image[1] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eq2_eq3_daa_matches_loop_values_and_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    B, N, A = 2, 3, 4
    sizes = [(12, 10), (6, 5), (3, 3)]  # odd sizes exercise the bilinear resize
    levels = [torch.randn(B, A * N, h, w, generator=g) * 2 for h, w in sizes]
    cam = torch.randn(B, N, 4, 3, generator=g)

    def vectorised(cam, *levels):
        probs = [lv.sigmoid().view(B, A, N, *lv.shape[-2:]).amax(1) for lv in levels]
        att = L.local_attention(probs, tuple(cam.shape[-2:]))
        return L.dual_attention_logits(cam, att), att

    logits, att = vectorised(cam, *levels)
    logits_ref, att_ref = daa_oracle(levels, cam, N)
    torch.testing.assert_close(att, att_ref)
    torch.testing.assert_close(logits, logits_ref)
    torch.testing.assert_close(att.sum((-2, -1)), torch.ones(B, N))

    w = torch.randn(B, N, generator=g)
    _, g_vec = grads(lambda c, *lv: (vectorised(c, *lv)[0] * w).sum(), cam, *levels)
    _, g_ref = grads(lambda c, *lv: (daa_oracle(lv, c, N)[0] * w).sum(), cam, *levels)
    for a, b in zip(g_vec, g_ref):
        torch.testing.assert_close(a, b)
    # the gradient reaches the local classification maps (the point of DAA)
    assert sum(float(x.abs().sum()) for x in g_vec[1:]) > 0


def test_eq4_category_features_matches_loop():
    M, R = torch.rand(2, 6, 3, 4), torch.rand(2, 3, 3, 4)
    v, gv = grads(lambda m, r: (L.category_features(m, r) ** 2).sum(), M, R)
    r, gr = grads(lambda m, r: (features_oracle(m, r) ** 2).sum(), M, R)
    torch.testing.assert_close(v, r)
    for a, b in zip(gv, gr):
        torch.testing.assert_close(a, b)


def test_eq5_prototype_update_matches_loop_over_two_steps():
    g = torch.Generator().manual_seed(3)
    B, N, D = 5, 4, 7
    P, init = torch.zeros(N, D), torch.zeros(N, dtype=torch.bool)
    P_ref, init_ref = P.clone(), init.clone()
    for _ in range(2):
        feats, probs = torch.randn(B, N, D, generator=g), torch.rand(B, N, generator=g)
        labels = (torch.rand(B, N, generator=g) > 0.5).double()
        labels[:, -1] = 0  # a class never present keeps its zero, uninitialised prototype
        P, init = L.update_prototypes(P, init, feats, probs, labels)
        P_ref, init_ref = prototype_update_oracle(P_ref, init_ref, feats, probs, labels)
        torch.testing.assert_close(P, P_ref)
        assert torch.equal(init, init_ref)
    assert not init[-1] and torch.all(P[-1] == 0)


def test_eq6_prototype_losses_match_loop():
    g = torch.Generator().manual_seed(4)
    B, N, D = 4, 5, 6
    feats = torch.randn(B, N, D, generator=g) * 0.7
    P = torch.randn(N, D, generator=g) * 0.7
    init = torch.tensor([True, True, False, True, True])
    labels = (torch.rand(B, N, generator=g) > 0.4).double()
    (vi, vo), = [L.prototype_losses(feats, P, init, labels)]
    ri, ro = prototype_loss_oracle(feats, P, init, labels)
    torch.testing.assert_close(vi, ri)
    torch.testing.assert_close(vo, ro)
    assert vo > 0  # the margin is active for these random features
    for which in (0, 1):
        _, (gv,) = grads(lambda f, which=which: L.prototype_losses(f, P, init, labels)[which], feats)
        _, (gr,) = grads(lambda f, which=which: prototype_loss_oracle(f, P, init, labels)[which], feats)
        torch.testing.assert_close(gv, gr)


def test_eq6_without_positive_labels_is_zero():
    intra, inter = L.prototype_losses(torch.randn(2, 3, 4), torch.randn(3, 4), torch.ones(3, dtype=torch.bool), torch.zeros(2, 3))
    assert intra == 0 and inter == 0


def test_eq7_focal_loss_is_torchvisions_and_matches_formula():
    logits, t = torch.randn(50), (torch.rand(50) > 0.8).double()
    q = torch.sigmoid(logits)
    alpha, gamma = 0.25, 2.0
    ref = [(-alpha * (1 - qi) ** gamma * math.log(qi)) if ti == 1 else (-(1 - alpha) * qi**gamma * math.log(1 - qi))
           for qi, ti in zip(q.tolist(), t.tolist())]
    torch.testing.assert_close(sigmoid_focal_loss(logits, t, alpha, gamma, reduction="none"), torch.tensor(ref))


def test_eq8_soft_focal_loss_matches_loop():
    logits, teacher = torch.randn(3, 7, 4) * 2, torch.rand(3, 7, 4)
    v, (gv,) = grads(lambda x: L.soft_focal_loss(x, teacher, reduction="sum"), logits)
    r, (gr,) = grads(lambda x: sfl_oracle(x, teacher).sum(), logits)
    torch.testing.assert_close(v, r)
    torch.testing.assert_close(gv, gr)
    assert (L.soft_focal_loss(logits, teacher) >= 0).all()
    # agreement gives no loss: |q_t - q|^gamma = 0
    agree = L.soft_focal_loss(logits, torch.sigmoid(logits), reduction="sum")
    assert agree < 1e-20


def test_reduction_is_validated():
    with pytest.raises(ValueError, match="reduction"):
        L.soft_focal_loss(torch.zeros(2), torch.zeros(2), reduction="avg")
