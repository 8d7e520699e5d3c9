"""The training loop the three networks share: SGD or Adam with a poly schedule, new layers at
a higher learning rate, per-epoch checkpoints that a killed run resumes from exactly, a CSV log,
a stop with a clear message when the loss stops being finite, and DistributedDataParallel when
started by torchrun. On a GPU: mixed precision (bfloat16, or float16 with a GradScaler; see
``precision.py``, which gives the inference stages the same settings), channels-last convolutions
and pinned-memory batches. Checkpoint files are ``checkpoints.py``'s.
"""
from __future__ import annotations

import csv
import inspect
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

from ..data import transforms
from ..data.transforms import sample_rng
from ..errors import InputError, TrainingError
from ..files import write_text
from . import distributed
from .checkpoints import load_checkpoint, save_checkpoint
from .precision import AmpModule, amp_dtype, use_channels_last

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's GPU (torchrun's LOCAL_RANK) if CUDA is available, else the CPU.
    A bare ``cuda`` also means this process's GPU, so that N processes do not share GPU 0."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.local_rank())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"config key 'device' is '{name}' but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", distributed.local_rank())
    return device


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    """The released code's poly schedule, base_lr * (1 - step / total)^power; power 0 keeps the
    learning rate constant."""
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


# --- DDP -------------------------------------------------------------------------------------

def _batchnorm_in_training(model: nn.Module) -> bool:
    """True when some BatchNorm normalises with batch statistics (training mode). Frozen
    BatchNorm (eval mode, the paper's setting in all three networks) does not, whether or not
    its affine parameters are trained: it needs no SyncBatchNorm and no buffer broadcasts."""
    return any(isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training for layer in model.modules())


def _wrap_ddp(model: nn.Module, device: torch.device, desc: str) -> nn.Module:
    """DistributedDataParallel over the parameters that train *now*: call after ``prepare``
    froze BatchNorm, else DDP waits for gradients that frozen parameters never get.

    BatchNorm in training mode (not the case in this project) becomes SyncBatchNorm on CUDA, so
    that statistics are those of the global batch as in one process; on a CPU, where
    SyncBatchNorm does not run, each process normalises over its share and a warning says so.
    """
    training_bn = _batchnorm_in_training(model)
    if training_bn:
        if device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(model)   # in place: the root is not a BatchNorm
            if distributed.is_main():
                log.info("%s: BatchNorm in training mode: converted to SyncBatchNorm", desc)
        elif distributed.is_main():
            log.warning("%s: BatchNorm in training mode on a CPU: each process uses the statistics of "
                        "its own share of the batch (SyncBatchNorm needs CUDA)", desc)
    # Buffers (BatchNorm's running statistics) are synced from rank 0 at construction; during
    # training only when BatchNorm updates them. Newer torch renames the keyword.
    options = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    sync = {"forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers": training_bn}
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=False, **sync)


def _all_ranks_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (one tiny all-reduce; no collective for one process).
    Every rank must then take the same branch, or the others hang in DDP's gradient all-reduce."""
    if not distributed.is_distributed():
        return flag
    failed = torch.tensor([0 if flag else 1], dtype=torch.int32,
                          device=device if device.type == "cuda" else "cpu")
    return int(distributed.all_reduce_sum(failed).item()) == 0


def train(*, model: nn.Module, groups: list[tuple[Iterable[nn.Parameter], float]], dataset: EpochDataset,
          step: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]], section: dict[str, Any],
          out_dir: Path, seed: int, device: torch.device, meta: dict[str, Any], desc: str,
          num_workers: int = 0, prepare: Callable[[nn.Module], None] | None = None,
          amp: str | bool | None = None, channels_last: str | bool | None = None,
          strict: bool = False, at_epoch: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``model`` for ``section['epochs']`` epochs; resume from ``out_dir/checkpoint.pt``.

    ``step(model, batch)`` returns the loss and named parts for the log. ``prepare(model)`` is
    called after every ``model.train()`` (e.g. to keep BatchNorm frozen). The final weights
    ``out_dir/model.pt`` carry ``meta`` so that inference needs no config.

    Under torchrun each of N processes takes batch_size / N of every global batch (the same
    batches as one process), DDP averages the gradients, and rank 0 writes checkpoints and logs.
    ``amp`` / ``channels_last`` (None: ``section['amp']`` / ``section['channels_last']`` if set,
    else ``"auto"``): see :func:`precision.amp_dtype` and :func:`precision.use_channels_last`;
    the model's forward runs under autocast and ``step`` gets float32 outputs, so losses are
    computed in float32. Images that fail to load are skipped and returned in ``skipped``; with
    ``strict`` the first one stops training (TrainingError naming the file). ``at_epoch(epoch)``
    runs before each epoch (0-based), a resumed run's first included.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, final_path = out_dir / "checkpoint.pt", out_dir / "model.pt"
    per_rank_batch = batch_per_process(section, desc, distributed.world_size())
    dtype = amp_dtype(device, section.get("amp", "auto") if amp is None else amp)
    nhwc = use_channels_last(device, section.get("channels_last", "auto") if channels_last is None
                             else channels_last, dtype, training=True)
    model.to(device)
    if nhwc:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(groups, section)
    # A GradScaler only for float16 (bfloat16 has float32's range); disabled it is a pass-through.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_epoch, history = _resume(checkpoint_path, model, optimizer, scaler, section, desc)
    sampler, loader = _batches(dataset, section, seed, per_rank_batch, num_workers, device, desc)
    net = _training_network(model, prepare, device, dtype, nhwc, desc)
    loop = _Loop(net, model, optimizer, scaler, step, section, prepare, device, dtype, desc, strict,
                 checkpoint_path, steps_per_epoch=len(loader))
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # fixed crop size: tune the conv kernels once
    started = time.time()
    try:
        for epoch in range(start_epoch, section["epochs"]):
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            if at_epoch is not None:
                at_epoch(epoch)
            means = loop.epoch(loader, epoch)
            history.append({"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **means,
                            "seconds": round(time.time() - started, 2)})
            _save_epoch(checkpoint_path, out_dir, model, optimizer, scaler, history, section, desc)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark

    if distributed.is_main():
        save_checkpoint(final_path, {"model": model.state_dict(), "meta": meta, "history": history})
    distributed.barrier()
    return TrainResult(final_path, section["epochs"], time.time() - started, loop.skipped, history)


def batch_per_process(section: dict[str, Any], desc: str, world: int) -> int:
    """Each of ``world`` processes' share of a global batch of ``section``; a batch that does not
    split evenly is refused (``pipeline.preflight`` asks before anything is written)."""
    if section["batch_size"] % world:
        raise TrainingError(f"config key '{desc}.batch_size' ({section['batch_size']}) must be divisible "
                            f"by the number of processes ({world})")
    return section["batch_size"] // world


def _resume(checkpoint_path: Path, model: nn.Module, optimizer, scaler, section: dict[str, Any],
            desc: str) -> tuple[int, list[dict[str, float]]]:
    """(first epoch to run, the log so far): from the last per-epoch checkpoint, if any."""
    if not checkpoint_path.exists():
        return 0, []
    state = load_checkpoint(checkpoint_path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if distributed.is_main():
        tqdm.write(f"{desc}: resuming at epoch {state['epoch'] + 1}/{section['epochs']} from {checkpoint_path}")
    return state["epoch"], state["history"]


def _batches(dataset: EpochDataset, section: dict[str, Any], seed: int, per_rank_batch: int, num_workers: int,
             device: torch.device, desc: str) -> tuple[DistributedSampler, DataLoader]:
    # One sampler for one process or many: with the same seed it yields the same permutation, so
    # N processes with batch B/N see exactly the batches of one process with batch B.
    sampler = DistributedSampler(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                 shuffle=True, seed=seed, drop_last=False)
    # Pinned host memory lets the steps' .to(device, non_blocking=True) overlap the copy with
    # compute. Workers are not persistent: they hold a copy of the dataset, whose epoch (the
    # augmentation seed) is set in this process before every epoch.
    loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_skipping, drop_last=True, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    if len(loader) == 0:
        raise TrainingError(f"{desc}: {len(dataset)} training images are fewer than one batch of "
                            f"{section['batch_size']}; lower {desc}.batch_size")
    return sampler, loader


def _training_network(model: nn.Module, prepare, device: torch.device, dtype, nhwc: bool, desc: str) -> nn.Module:
    """The module the steps call: ``model`` in training mode (``prepare`` applied), wrapped in
    DDP under torchrun and in :class:`AmpModule` for mixed precision / NHWC."""
    # Freeze first (BatchNorm), then wrap: DDP registers the parameters that require gradients
    # when it is built.
    model.train()
    if prepare is not None:
        prepare(model)
    net: nn.Module = model
    if distributed.is_distributed():
        net = _wrap_ddp(model, device, desc)
    if dtype is not None or nhwc:
        net = AmpModule(net, device.type, dtype, nhwc)
    return net


class _Loop:
    """The steps of one epoch: the poly learning rate, the loss, the stop on a non-finite loss,
    the optimizer step, the running means for the log."""

    def __init__(self, net, model, optimizer, scaler, step, section, prepare, device, dtype, desc, strict,
                 checkpoint_path: Path, steps_per_epoch: int):
        self.net, self.model, self.optimizer, self.scaler, self.step = net, model, optimizer, scaler, step
        self.section, self.prepare, self.device, self.dtype = section, prepare, device, dtype
        self.desc, self.strict, self.checkpoint_path = desc, strict, checkpoint_path
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * section["epochs"]
        self.skipped: list[str] = []

    def epoch(self, loader: DataLoader, epoch: int) -> dict[str, float]:
        """Train one epoch; the means of the logged values over its steps (and ranks)."""
        self.net.train()
        if self.prepare is not None:
            self.prepare(self.model)
        totals: dict[str, float] = {}
        count = 0
        progress = tqdm(loader, desc=f"{self.desc} epoch {epoch + 1}/{self.section['epochs']}", leave=False,
                        disable=not distributed.is_main(), dynamic_ncols=True)
        for index, (batch, skipped) in enumerate(progress):
            self.skipped.extend(skipped)
            if self.strict and skipped:
                raise TrainingError(f"{skipped[0]} (--strict stops at the first bad input)")
            self._set_lr(epoch * self.steps_per_epoch + index)
            # A share of a batch whose images all failed to load: every rank skips the step.
            if not _all_ranks_true(batch is not None, self.device):
                continue
            # Every step gets its batch on the device: a step says what to compute, not where.
            batch = tuple(part.to(self.device, non_blocking=True) for part in batch)
            loss, parts = self.step(self.net, batch)
            self._check_finite(loss, epoch, index)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            count += 1
            for name, value in {"loss": float(loss.detach()), **parts}.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            progress.set_postfix(loss=f"{totals['loss'] / count:.4f}")
        return _mean_over_ranks(totals, count)

    def _set_lr(self, global_step: int) -> None:
        # Adam decays too: at a constant rate the last epochs' training loss rose again
        # (MSRC-21, docs/results.md), so the final weights were wherever the last steps left them.
        rate = poly_lr(self.section["lr"], global_step, self.total_steps, self.section["poly_power"])
        for group in self.optimizer.param_groups:
            group["lr"] = rate * group["lr_mult"]

    def _check_finite(self, loss: torch.Tensor, epoch: int, index: int) -> None:
        finite = bool(torch.isfinite(loss.detach()))
        if _all_ranks_true(finite, self.device):
            return
        kept = (f"the last good checkpoint {self.checkpoint_path} (after epoch {epoch}) is intact"
                if self.checkpoint_path.exists() else "no checkpoint had been written yet")
        value = "non-finite in another process" if finite else loss.item()
        hint = " (or use amp=bf16 or amp=off)" if self.dtype == torch.float16 else ""
        raise TrainingError(f"{self.desc}: loss became {value} at epoch {epoch + 1}, step {index + 1}; "
                            f"training stopped and {kept}. Lower {self.desc}.lr{hint} or check the inputs.")


def _save_epoch(checkpoint_path: Path, out_dir: Path, model: nn.Module, optimizer, scaler,
                history: list[dict[str, float]], section: dict[str, Any], desc: str) -> None:
    """The per-epoch checkpoint a killed run resumes from, and the log (rank 0)."""
    if distributed.is_main():
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": history[-1]["epoch"], "history": history}
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        save_checkpoint(checkpoint_path, state)
        _write_log(out_dir / "log.csv", history)
        tqdm.write(f"{desc}: epoch {history[-1]['epoch']}/{section['epochs']} loss "
                   f"{history[-1].get('loss', float('nan')):.4f}")
    distributed.barrier()


def _mean_over_ranks(totals: dict[str, float], count: int) -> dict[str, float]:
    """Per-epoch means of the logged values over every step of every rank: each rank's loss is
    the mean over its share of a batch, so this is the single-process log (up to rounding)."""
    if not distributed.is_distributed():
        return {name: value / max(count, 1) for name, value in totals.items()}
    gathered = distributed.all_gather_objects((count, totals))
    steps = sum(item[0] for item in gathered)
    names = list(dict.fromkeys(name for _, part in gathered for name in part))   # "loss" first
    return {name: sum(part.get(name, 0.0) for _, part in gathered) / max(steps, 1) for name in names}


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


class AugmentedTrainSet(ImageTrainSet):
    """The training augmentation of 5.1, written once: a rescale (none by default), a horizontal
    flip, colour jitter and a random crop (images padded with the mean, labels with 255), then the
    backbone's normalisation. A training set overrides :meth:`target` (what the network learns from
    the image's crop) and, to rescale, :meth:`rescale`; ``section`` is its config section
    (``color_jitter``, ``crop_size``)."""

    def __init__(self, dataset, section: dict[str, Any], mean, std, seed: int,
                 load_label: Callable[[Any], Any] | None = None):
        super().__init__(dataset, seed, load_label)
        self.section, self.mean, self.std = section, mean, std

    def rescale(self, image, label, rng):
        return image, label

    def target(self, label, sample):
        raise NotImplementedError

    def make_item(self, image, label, sample, rng):
        image, label = self.rescale(image, label, rng)
        image, label = transforms.random_flip(image, label, rng)
        image = transforms.color_jitter(image, self.section["color_jitter"], rng)
        image, label, _ = transforms.random_crop(image, label, self.section["crop_size"], rng,
                                                 fill=transforms.mean_fill(self.mean))
        return transforms.normalize(image, self.mean, self.std), self.target(label, sample)
