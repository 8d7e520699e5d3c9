"""One module per pipeline stage, each with ``run(config, force=False)`` (irn's structure).

Helpers here are what every stage needs: the datasets of the configured splits, the device,
threads and seeds.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..datasets.base import SegmentationDataset
from ..training import resolve_device


def setup(config: dict[str, Any]) -> torch.device:
    """Device, threads, seeds and (under torchrun) the process group."""
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    device = resolve_device(config["device"])
    distributed.init_from_env(device)
    seed = config["seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return device


def dataset(config: dict[str, Any], split_key: str) -> SegmentationDataset:
    from ..datasets import build_dataset

    return build_dataset(config["dataset"], config["dataset"][split_key])


def label_images(config: dict[str, Any]) -> SegmentationDataset:
    """The images that get CAMs and pseudo labels: the training split plus the split on which
    pseudo labels are scored (VOC: train_aug includes train; both are usually the same)."""
    train = dataset(config, "train_split")
    if config["dataset"]["label_split"] == config["dataset"]["train_split"]:
        return train
    scored = dataset(config, "label_split")
    known = set(train.ids)
    merged = SegmentationDataset(train.name, train.root, f"{train.split}+{scored.split}", train.class_names,
                                 list(train.samples) + [s for s in scored.samples if s.id not in known],
                                 list(train.skipped) + list(scored.skipped))
    for attr in ("load_mask", "load_image"):
        setattr(merged, attr, getattr(train, attr))
    return merged


def score(config: dict[str, Any], pred_dir, split_key: str, title: str) -> dict[str, Any] | None:
    """Score the label PNGs in ``pred_dir`` on a split with ground truth; None without it."""
    from ..metrics import evaluate_predictions

    data = dataset(config, split_key)
    if not data.has_masks or not distributed.is_main():
        return None
    result = evaluate_predictions(data, pred_dir, progress=False)
    result["title"] = title
    result["split"] = data.split
    return result


def load_model_checkpoint(path):
    """(state dict, meta) of a stage's final ``model.pt``, loaded with ``weights_only=True``."""
    from ..training import load_checkpoint

    state = load_checkpoint(path)
    return state["model"], state.get("meta", {})
