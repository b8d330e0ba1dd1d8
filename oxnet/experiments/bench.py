"""``python scripts/bench.py train-step``: training-step time against torchvision's RetinaNet.

Times, in one process on identical inputs and thread settings: torchvision's RetinaNet built on the
same backbone, anchors, head depth and norm; our model in RetinaNet-only mode; one full OXnet step
(student forward/backward, teacher forward, DAA, GPA, SFL, EMA) on a batch mixing the three
granularities; and the vectorised DAA + GPA against a per-image, per-class loop version (the way the
authors' code computes them). Returns one dict (the script prints it as JSON).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead

from oxnet.modeling import losses as L
from oxnet.modeling.config import PRESETS
from oxnet.modeling.detector import OXNet
from oxnet.modeling.heads import group_norm
from oxnet.modeling.teacher import MeanTeacher
from oxnet.machine import describe
from oxnet.vocabulary import FULL, GRANULARITIES, WEAK


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _PyramidOnly(nn.Module):
    """Our ResNet-FPN as a torchvision backbone (an OrderedDict of pyramid levels)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.inner = backbone
        self.out_channels = backbone.out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {str(i): p for i, p in enumerate(self.inner(x)[0])}


def _synthetic_batch(batch: int, size: int, num_classes: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 1, size, size, generator=g)
    targets = []
    for i in range(batch):
        k = 1 + i % 3
        xy = torch.rand(k, 2, generator=g) * size * 0.6
        wh = size * (0.08 + torch.rand(k, 2, generator=g) * 0.3)
        boxes = torch.cat([xy, xy + wh], 1).clamp(max=size - 1)
        labels = torch.randint(num_classes, (k,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images.to(device), targets


def _peak_memory_mb(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset, in MiB (None on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _step_fn(model: nn.Module, optimizer: torch.optim.Optimizer, call: Callable[[], dict], after=None, amp=False):
    """One training step as the engine takes it: float16 autocast and a GradScaler when ``amp``."""
    device_type = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type, enabled=amp)

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.float16, enabled=amp):
            loss = sum(call().values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if after is not None:
            after()

    return step


def daa_gpa_vectorised(level_logits, cam, c5, labels, prototypes, initialized, num_classes):
    """DAA + GPA as the model computes them (oxnet.modeling.losses)."""
    b = cam.shape[0]
    probs = [lv.sigmoid().view(b, -1, num_classes, *lv.shape[-2:]).amax(1) for lv in level_logits]
    att = L.local_attention(probs, tuple(cam.shape[-2:]))
    logits = L.dual_attention_logits(cam, att)
    feats = L.category_features(F.relu(c5), att)
    p, init = L.update_prototypes(prototypes, initialized, feats.detach(), logits.detach().sigmoid(), labels)
    intra, inter = L.prototype_losses(feats, p, init, labels)
    return L.image_level_bce(logits, labels) + intra + inter


def daa_gpa_loop(level_logits, cam, c5, labels, prototypes, initialized, num_classes):
    """The same computation with per-image and per-class Python loops and host syncs, the way the
    authors' released code does it. Kept as the speed baseline (and checked equal in the tests)."""
    b_size, size = cam.shape[0], cam.shape[-2:]
    logits = torch.zeros(b_size, num_classes, dtype=cam.dtype, device=cam.device)
    feats = torch.zeros(b_size, num_classes, c5.shape[1], dtype=cam.dtype, device=cam.device)
    m = F.relu(c5)
    for b in range(b_size):
        for c in range(num_classes):
            maps = [lv[b].sigmoid().view(-1, num_classes, *lv.shape[-2:])[:, c].amax(0) for lv in level_logits]
            best = max(range(len(maps)), key=lambda i: maps[i].max().item())
            r = F.interpolate(maps[best][None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            r = r / r.sum().clamp_min(1e-6)
            logits[b, c] = (cam[b, c] * r).sum()
            feats[b, c] = (m[b] * r).sum((-2, -1))
    probs = logits.detach().sigmoid()
    p, init = prototypes.clone(), initialized.clone()
    for c in range(num_classes):
        pos = [k for k in range(b_size) if labels[k, c].item() == 1]
        if pos:
            w = torch.stack([probs[k, c] for k in pos])
            mean = (w[:, None] * feats[pos, c].detach()).sum(0) / w.sum().clamp_min(1e-12)
            beta = 0.7 if init[c].item() else 0.0
            p[c] = beta * p[c] + (1 - beta) * mean
            init[c] = True
    intra, n_intra, inter, n_inter = 0.0, 0, 0.0, 0
    for k in range(b_size):
        for c in range(num_classes):
            if labels[k, c].item() != 1:
                continue
            intra = intra + ((feats[k, c] - p[c]) ** 2).mean()
            n_intra += 1
            for j in range(num_classes):
                if j != c and init[j].item():
                    inter = inter + F.relu(1.0 - ((feats[k, c] - p[j]) ** 2).mean())
                    n_inter += 1
    bce = L.image_level_bce(logits, labels)
    return bce + intra / max(n_intra, 1) + inter / max(n_inter, 1)


def daa_gpa_inputs(model: OXNet, batch: int, size: int, device: torch.device, seed: int = 0):
    """Realistic DAA + GPA inputs: the model's own head maps and C5 for a random batch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dense = model.dense(torch.rand(batch, 1, size, size, generator=g).to(device))
    n = model.num_classes
    level_logits = [lv.detach().clone().requires_grad_(True) for lv in dense["level_cls"]]
    c5 = dense["c5"].detach()
    cam = torch.randn(batch, n, *c5.shape[-2:], generator=g).to(device).requires_grad_(True)
    labels = (torch.rand(batch, n, generator=g) > 0.6).float().to(device)
    protos = torch.randn(n, c5.shape[1], generator=g).to(device)
    init = (torch.rand(n, generator=g) > 0.3).to(device)
    return level_logits, cam, c5, labels, protos, init


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench.py train-step", description=__doc__)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=4, help="images per step (OXnet: mixed granularities)")
    parser.add_argument("--size", type=int, default=None, help="image size (default: the preset's)")
    parser.add_argument("--classes", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--daa-batch", type=int, default=8, help="batch for the DAA + GPA op timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="float16 autocast + GradScaler, as training on CUDA (CUDA only)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.amp and device.type != "cuda":
        parser.error("--amp needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Same backbone, levels, anchors, head depth (torchvision's is 4) and norm for every model.
    config = replace(PRESETS[args.preset], num_classes=args.classes, head_depth=4, daa=False, gpa=False, sfl=False)
    size = args.size or config.image_size
    torch.manual_seed(0)
    images, box_targets = _synthetic_batch(args.batch, size, args.classes, device)

    # torchvision's RetinaNet on our backbone and anchors
    torch.manual_seed(0)
    ours_rn = OXNet.from_config(config).to(device)
    tv = RetinaNet(
        _PyramidOnly(OXNet.from_config(config).backbone),
        num_classes=args.classes,
        min_size=size,
        max_size=size,
        anchor_generator=ours_rn.anchor_generator,
        head=RetinaNetHead(config.fpn_width, 9, args.classes, norm_layer=group_norm),
    ).to(device)
    tv.train()
    tv_images = list(images.expand(-1, 3, -1, -1))
    tv_opt = torch.optim.Adam(tv.parameters(), lr=1e-5)
    peak: dict[str, float | None] = {}
    _reset_peak_memory(device)
    t_tv = _time(_step_fn(tv, tv_opt, lambda: tv(tv_images, box_targets), amp=args.amp), device, args.warmup, args.repeats)
    peak["torchvision_retinanet_step"] = _peak_memory_mb(device)

    # ours, RetinaNet only
    ours_rn.train()
    full_targets = [
        dict(t, granularity=FULL, image_labels=torch.zeros(args.classes, device=device).index_fill_(0, t["labels"], 1.0))
        for t in box_targets
    ]
    rn_opt = torch.optim.Adam(ours_rn.parameters(), lr=1e-5)
    _reset_peak_memory(device)
    t_rn = _time(_step_fn(ours_rn, rn_opt, lambda: ours_rn(images, full_targets), amp=args.amp),
                 device, args.warmup, args.repeats)
    peak["ours_retinanet_step"] = _peak_memory_mb(device)

    # full OXnet step on a mixed batch: full, weak and unlabeled images
    torch.manual_seed(0)
    mt = MeanTeacher(OXNet.from_config(replace(config, daa=True, gpa=True, sfl=True))).to(device).train()
    with torch.no_grad():  # a teacher that finds pseudo-boxes, as after pre-training
        cast(Tensor, mt.teacher.cls_head.out.bias).fill_(0.5)  # the head's last Conv2d has a bias
    mixed = []
    for i, t in enumerate(full_targets):
        g = GRANULARITIES[i % 3]
        mixed.append(t if g == FULL else {"granularity": g, "image_labels": t["image_labels"] * (g == WEAK)})
    teacher_view = (images * 0.9 + 0.05).clamp(0, 1)
    ox_opt = torch.optim.Adam(mt.student.parameters(), lr=1e-5)
    _reset_peak_memory(device)
    t_ox = _time(
        _step_fn(mt, ox_opt, lambda: mt(images, mixed, teacher_view), after=mt.update_teacher, amp=args.amp),
        device, args.warmup, args.repeats,
    )
    peak["oxnet_step"] = _peak_memory_mb(device)

    # DAA + GPA: vectorised vs loop (forward + backward)
    inputs = daa_gpa_inputs(mt.student, args.daa_batch, size, device)

    def op(fn):
        def run() -> None:
            fn(*inputs, num_classes=args.classes).backward()

        return run

    t_vec = _time(op(daa_gpa_vectorised), device, 1, args.repeats)
    t_loop = _time(op(daa_gpa_loop), device, 1, max(2, args.repeats // 2))

    on_gpu = device.type == "cuda"
    gpu_peak = cast("dict[str, float]", peak)  # floats on a GPU, the only place the memory ratios are taken
    return {
        "machine": describe(device),
        "setup": {
            "preset": args.preset, "depth": config.depth, "levels": list(config.levels), "fpn_width": config.fpn_width,
            "head_depth": 4, "image_size": size, "batch": args.batch, "classes": args.classes,
            "oxnet_batch_mix": [t["granularity"] for t in mixed], "daa_gpa_batch": args.daa_batch,
            "repeats": args.repeats, "statistic": "median seconds per step (forward + backward + Adam step)",
            "amp": args.amp,
        },
        "seconds": {
            "torchvision_retinanet_step": t_tv,
            "ours_retinanet_step": t_rn,
            "oxnet_step": t_ox,
            "daa_gpa_vectorised": t_vec,
            "daa_gpa_loop": t_loop,
        },
        "peak_memory_mb": peak if on_gpu else None,
        "ratio_retinanet_vs_torchvision": t_rn / t_tv,
        "ratio_oxnet_vs_torchvision": t_ox / t_tv,
        "memory_ratio_retinanet_vs_torchvision": (
            gpu_peak["ours_retinanet_step"] / gpu_peak["torchvision_retinanet_step"] if on_gpu else None
        ),
        "memory_ratio_oxnet_vs_torchvision": gpu_peak["oxnet_step"] / gpu_peak["torchvision_retinanet_step"] if on_gpu else None,
        "daa_gpa_speedup": t_loop / t_vec,
    }
