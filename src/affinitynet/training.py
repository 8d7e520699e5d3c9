"""The training loop the three networks share: SGD with a poly schedule (or Adam), new layers at
a higher learning rate, per-epoch checkpoints that a killed run resumes from exactly, a CSV log,
a stop with a clear message when the loss stops being finite, and DistributedDataParallel when
started by torchrun.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from . import distributed
from .io import write_bytes, write_text

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what was kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.local_rank())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"config key 'device' is '{name}' but CUDA is not available on this machine")
    return device


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely: tensors and plain containers only (``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise TrainingError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        text = str(error)
        if "Weights only load failed" in text or "weights_only" in text:
            raise TrainingError(f"{path}: refused: the file holds Python objects beyond tensors "
                                f"(unsafe to unpickle)") from None
        first = text.splitlines()[0] if text else error.__class__.__name__
        raise TrainingError(f"{path}: not a readable checkpoint (truncated or damaged: {first[:120]})") from None


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    return base_lr * (1.0 - step / max(total_steps, 1)) ** power


def build_optimizer(groups: list[tuple[Iterable[nn.Parameter], float]], section: dict[str, Any]):
    """``groups``: (parameters, learning-rate multiplier). Momentum is passed by keyword: the
    released code passed weight decay positionally into SGD's momentum slot."""
    param_groups = []
    for params, mult in groups:
        params = [p for p in params if p.requires_grad]
        if params:
            param_groups.append({"params": params, "lr": section["lr"] * mult, "lr_mult": mult})
    if section["optimizer"] == "sgd":
        return torch.optim.SGD(param_groups, lr=section["lr"], momentum=section["momentum"],
                               weight_decay=section["weight_decay"])
    return torch.optim.Adam(param_groups, lr=section["lr"], weight_decay=section["weight_decay"])


def collate_skipping(batch: list[Any]):
    """Default collation over the samples that loaded; bad ones arrive as ``("skip", message)``."""
    good = [item for item in batch if not (isinstance(item, tuple) and item and item[0] == "skip")]
    skipped = [item[1] for item in batch if isinstance(item, tuple) and item and item[0] == "skip"]
    collated = torch.utils.data.default_collate(good) if good else None
    return collated, skipped


class EpochDataset(Dataset):
    """A dataset whose augmentation depends on the epoch (set before each epoch)."""

    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


@dataclass
class TrainResult:
    model_path: Path
    epochs: int
    seconds: float
    skipped: list[str] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)


def train(*, model: nn.Module, groups: list[tuple[Iterable[nn.Parameter], float]], dataset: EpochDataset,
          step: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]], section: dict[str, Any],
          out_dir: Path, seed: int, device: torch.device, meta: dict[str, Any], desc: str,
          num_workers: int = 0, prepare: Callable[[nn.Module], None] | None = None) -> TrainResult:
    """Train ``model`` for ``section['epochs']`` epochs; resume from ``out_dir/checkpoint.pt``.

    ``step(model, batch)`` returns the loss and named parts for the log. ``prepare(model)`` is
    called after every ``model.train()`` (e.g. to keep BatchNorm frozen). The final weights
    ``out_dir/model.pt`` carry ``meta`` so that inference needs no config.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"
    final_path = out_dir / "model.pt"
    world = distributed.world_size()
    if section["batch_size"] % world:
        raise TrainingError(f"config key '{desc}.batch_size' ({section['batch_size']}) must be divisible "
                            f"by the number of processes ({world})")
    per_rank_batch = section["batch_size"] // world

    model.to(device)
    optimizer = build_optimizer(groups, section)
    start_epoch, history, skipped_all = 0, [], []
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
        if distributed.is_main():
            log.info("%s: resuming after epoch %d from %s", desc, start_epoch, checkpoint_path)

    # One sampler for one process or many: with the same seed it yields the same permutation, so
    # N processes with batch B/N see exactly the batches of one process with batch B.
    sampler = DistributedSampler(dataset, num_replicas=world, rank=distributed.rank(), shuffle=True,
                                 seed=seed, drop_last=False)
    loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_skipping, drop_last=True, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise TrainingError(f"{desc}: {len(dataset)} training images are fewer than one batch of "
                            f"{section['batch_size']}; lower {desc}.batch_size")
    total_steps = steps_per_epoch * section["epochs"]

    net: nn.Module = model
    if distributed.is_distributed():
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)

    started = time.time()
    for epoch in range(start_epoch, section["epochs"]):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        net.train()
        if prepare is not None:
            prepare(model)
        totals: dict[str, float] = {}
        count = 0
        progress = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{section['epochs']}", leave=False,
                        disable=not distributed.is_main(), dynamic_ncols=True)
        for index, (batch, skipped) in enumerate(progress):
            skipped_all.extend(skipped)
            global_step = epoch * steps_per_epoch + index
            for group in optimizer.param_groups:
                if section["optimizer"] == "sgd":
                    group["lr"] = poly_lr(section["lr"], global_step, total_steps, section["poly_power"]) * group["lr_mult"]
            if batch is None:
                continue
            loss, parts = step(net, batch)
            if not torch.isfinite(loss):
                kept = (f"the last good checkpoint {checkpoint_path} (after epoch {epoch}) is intact"
                        if checkpoint_path.exists() else "no checkpoint had been written yet")
                raise TrainingError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1}, step {index + 1}; "
                                    f"training stopped and {kept}. Lower {desc}.lr or check the inputs.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            count += 1
            for name, value in {"loss": float(loss.detach()), **parts}.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            progress.set_postfix(loss=f"{totals['loss'] / count:.4f}")
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
               **{name: value / max(count, 1) for name, value in totals.items()},
               "seconds": round(time.time() - started, 2)}
        history.append(row)
        if distributed.is_main():
            save_checkpoint(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                              "epoch": epoch + 1, "history": history})
            _write_log(out_dir / "log.csv", history)
            tqdm.write(f"{desc}: epoch {epoch + 1}/{section['epochs']} loss {row.get('loss', float('nan')):.4f}")
        distributed.barrier()

    if distributed.is_main():
        save_checkpoint(final_path, {"model": model.state_dict(), "meta": meta, "history": history})
    distributed.barrier()
    return TrainResult(final_path, section["epochs"], time.time() - started, skipped_all, history)


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    """The per-epoch log as CSV (read by the report, by pandas, by spreadsheets)."""
    names: list[str] = []
    for row in history:
        names.extend(name for name in row if name not in names)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names)
    writer.writeheader()
    for row in history:
        writer.writerow({name: (f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else value)
                         for name, value in row.items()})
    write_text(path, buffer.getvalue())


class ImageTrainSet(EpochDataset):
    """Training images of a dataset split, augmented per (seed, epoch, index).

    Subclasses override :meth:`make_item` alone; loading, seeding and skipping bad files
    (returned as ``("skip", message)`` and reported by the training loop) live here.
    """

    def __init__(self, dataset, seed: int, load_label: Callable[[Any], Any] | None = None):
        self.dataset = dataset
        self.seed = seed
        self.load_label = load_label

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from .io import InputError
        from .transforms import sample_rng

        sample = self.dataset[index]
        try:
            image = self.dataset.load_image(sample)
            label = self.load_label(sample) if self.load_label is not None else None
            if label is not None and label.shape[:2] != image.shape[:2]:
                raise InputError(getattr(sample, "mask_path", None) or sample.image_path,
                                 f"label size {label.shape[1]}x{label.shape[0]} differs from its image "
                                 f"{image.shape[1]}x{image.shape[0]}")
        except InputError as error:
            return ("skip", str(error))
        return self.make_item(image, label, sample, sample_rng(self.seed, self.epoch, index))

    def make_item(self, image, label, sample, rng):
        raise NotImplementedError
