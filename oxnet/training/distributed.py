"""Devices and torch.distributed for the training loop: device choice (``cuda:LOCAL_RANK`` under
``torchrun``), moving batches (channels_last on CUDA), joining the process group, and averaging
BatchNorm statistics over the processes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available (``cuda:LOCAL_RANK`` under torchrun), else CPU."""
    if isinstance(device, torch.device):
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device(device)


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def distributed(device: str) -> Iterator[Dist]:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on CUDA, gloo on
    the CPU) unless one exists already; leave it on exit if it was created here."""
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        target = resolve_device(device)
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
        created = True
    try:
        if dist.is_initialized():
            target = resolve_device(device)
            yield Dist(dist.get_rank(), dist.get_world_size(), target)
        else:
            yield Dist(0, 1, resolve_device(device))
    finally:
        if created:
            dist.destroy_process_group()


def current_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def average_batchnorm_stats(model: nn.Module) -> None:
    """Average BatchNorm running statistics over the processes (DDP syncs gradients, not buffers), so
    every rank keeps identical student and teacher state."""
    buffers = [
        cast(Tensor, b)  # running statistics are tensors when track_running_stats is set
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for b in (m.running_mean, m.running_var)
    ]
    if not buffers:
        return
    flat = torch.cat([b.flatten() for b in buffers])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


def to_device(images: Tensor, device: torch.device) -> Tensor:
    """``images`` on ``device`` (non-blocking), in channels_last memory format on CUDA."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images
