"""The trainer's in-domain start: ``oxnet pretrain`` on the project's training images, once, cached.

With ``LoopSettings(ssl_epochs=N)`` (``oxnet-trainer --ssl-epochs N``) the first round that has no model
version to warm-start from pretrains the backbone (SimSiam on every training image, labels unused; then
``ssl_label_epochs`` of image-level BCE on the weak and full ones) and every round's model starts from
that file. The file is cached in the store's models folder::

    <models dir>/pretrain/resnet18-256px-ssl5-labels0-seed0/resnet18_simsiam.pth (+ .json, last.pt)

so a later first round (or a trainer restarted mid-pretraining, which continues after the last finished
epoch) uses it again; the folder name holds the settings that change it. Model retention only touches
``version-*`` folders, so it stays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from oxnet.data.records import Record
from oxnet.modeling.config import PRESETS
from oxnet.training.pretrain import PretrainConfig, images_from_records, pretrain, weights_name
from oxnet.training.settings import TrainConfig

__all__ = ["ssl_config", "ssl_folder", "ssl_weights", "starting_from", "pretrain_for_round"]


def ssl_config(settings: Any) -> PretrainConfig:
    """The :class:`PretrainConfig` of a :class:`~oxnet.active.loop.LoopSettings`: the detector's depth and
    image size, ``ssl_epochs``, ``ssl_label_epochs``, ``ssl_batch_size``, the seed and device."""
    preset = PRESETS[settings.preset]
    return PretrainConfig(
        depth=settings.model.get("depth", preset.depth), image_size=settings.model.get("image_size", preset.image_size),
        epochs=settings.ssl_epochs, label_epochs=settings.ssl_label_epochs, batch_size=settings.ssl_batch_size,
        seed=settings.seed, device=settings.device, num_workers=settings.num_workers,
    )


def ssl_folder(settings: Any, models_dir: str | Path) -> Path:
    """``<models_dir>/pretrain/resnet<depth>-<size>px-ssl<E>-labels<L>-seed<S>``."""
    c = ssl_config(settings)
    return Path(models_dir) / "pretrain" / f"resnet{c.depth}-{c.image_size}px-ssl{c.epochs}-labels{c.label_epochs}-seed{c.seed}"


def ssl_weights(settings: Any, models_dir: str | Path | None) -> Path | None:
    """The cached weights file the rounds start from (it may not exist yet), or None without ``ssl_epochs``.

    Raises:
        ValueError: ``ssl_epochs`` is set but the store has no models folder.
    """
    if not (settings.ssl_epochs or settings.ssl_label_epochs):
        return None
    if models_dir is None:
        raise ValueError("ssl_epochs needs a store with a models folder (models_dir) for the pretrained weights")
    return ssl_folder(settings, models_dir) / weights_name(ssl_config(settings).depth)


def starting_from(config: TrainConfig, weights: Path | None) -> TrainConfig:
    """``config`` with the backbone weights file ``weights`` (unchanged when None)."""
    return config if weights is None else replace(config, model={**config.model, "weights": str(weights)})


def pretrain_for_round(
    settings: Any, records: Sequence[Record], classes: Sequence[str], models_dir: str | Path,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Pretrain on ``records`` (every granularity for SimSiam; weak and full for the label stage) unless the
    cached file exists; returns the weights file. ``callback`` gets pretrain's step dicts (it may raise
    to stop; the last finished epoch is kept)."""
    path = ssl_weights(settings, models_dir)
    assert path is not None
    if path.is_file():
        return path
    config = ssl_config(settings)
    labelled = images_from_records(records, len(classes)) if config.label_epochs else []
    result = pretrain(images_from_records(records), path.parent, config, labelled=labelled, classes=classes,
                      callback=callback, progress=False)
    return result.weights
