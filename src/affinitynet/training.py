"""The training loop the three networks share: SGD or Adam with a poly schedule, new layers at
a higher learning rate, per-epoch checkpoints that a killed run resumes from exactly, a CSV log,
a stop with a clear message when the loss stops being finite, and DistributedDataParallel when
started by torchrun. On a GPU: mixed precision (bfloat16, or float16 with a GradScaler),
channels-last convolutions and pinned-memory batches; :func:`for_inference` and
:func:`autocast` give the inference stages the same precision settings.
"""
from __future__ import annotations

import contextlib
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

from . import distributed
from .io import write_bytes, write_text

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what was kept."""


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


# --- Mixed precision, channels-last, DDP -----------------------------------------------------

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
CHANNELS_LAST_CHOICES = ("auto", "on", "off")


def amp_dtype(device: torch.device, amp: str | bool | None = "auto") -> torch.dtype | None:
    """The autocast dtype that ``amp`` means on ``device``; None: plain float32.

    ``"auto"`` (or True): bfloat16 on a CUDA GPU that supports it, else float16 (trained with a
    GradScaler); off on a CPU. ``"bf16"`` / ``"fp16"`` force a dtype (also on a CPU, where
    autocast exists too: that is how the tests exercise these paths). ``"off"`` (or False, None):
    float32 everywhere, the paper's setting and the way to reproduce a CPU run bit for bit.
    """
    if amp is None or amp is False:
        return None
    if amp is True:
        amp = "auto"
    amp = str(amp).lower()
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainingError("amp is 'bf16' but this GPU does not support bfloat16: use amp=fp16 or amp=auto")
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise TrainingError(f"amp is '{amp}': choose one of {', '.join(AMP_CHOICES)}")


def use_channels_last(device: torch.device, channels_last: str | bool | None = "auto",
                      dtype: torch.dtype | None = None) -> bool:
    """Whether convolutions should run on NHWC tensors. ``"auto"``: on CUDA under mixed
    precision, where cuDNN's tensor-core kernels are NHWC and NCHW costs a transpose per conv;
    never on a CPU (its NCHW kernels are the tuned ones for this project's dilated convs)."""
    if channels_last is None or channels_last == "auto":
        return device.type == "cuda" and dtype is not None
    if isinstance(channels_last, bool):
        return channels_last
    value = str(channels_last).lower()
    if value in ("on", "true", "1"):
        return True
    if value in ("off", "false", "0"):
        return False
    raise TrainingError(f"channels_last is '{channels_last}': choose one of {', '.join(CHANNELS_LAST_CHOICES)}")


def autocast(device: torch.device, amp: str | bool | None = "auto"):
    """``with autocast(device, amp):`` runs the body in mixed precision (a no-op context when
    ``amp`` means float32). Cast the network's outputs with ``.float()`` before any sum or
    normalisation: bfloat16 keeps 3 significant digits."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _outputs_to_float(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float().contiguous() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_outputs_to_float(item) for item in value)
    if isinstance(value, dict):
        return {key: _outputs_to_float(item) for key, item in value.items()}
    return value


def _inputs_to_channels_last(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
        return value.contiguous(memory_format=torch.channels_last)
    return value


class AmpModule(nn.Module):
    """``module`` whose ``forward`` (and the other ``methods``, e.g. ``("cams",)`` of the CAM
    network or ``("features",)`` of AffinityNet) run under autocast with NHWC inputs when asked,
    and return float32, NCHW-contiguous tensors: losses, sums over scales and random walks then
    run in float32 outside autocast, as in a float32 run. Other attributes (``backbone``,
    ``output_stride``...) read through to ``module``. With neither option it only forwards."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype | None,
                 channels_last: bool = False, methods: Iterable[str] = ()):
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype
        self.channels_last = channels_last
        self.methods = tuple(methods)

    def _call(self, function: Callable, args, kwargs):
        if self.channels_last:
            args = tuple(_inputs_to_channels_last(arg) for arg in args)
        if self.dtype is None:
            output = function(*args, **kwargs)
        else:
            with torch.autocast(self.device_type, dtype=self.dtype):
                output = function(*args, **kwargs)
        return _outputs_to_float(output) if (self.dtype is not None or self.channels_last) else output

    def forward(self, *args, **kwargs):
        return self._call(self.module, args, kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        inner = super().__getattr__("module")
        attribute = getattr(inner.module if isinstance(inner, nn.parallel.DistributedDataParallel) else inner, name)
        if name in self.__dict__.get("methods", ()) and callable(attribute):
            return lambda *args, **kwargs: self._call(attribute, args, kwargs)
        return attribute


def for_inference(model: nn.Module, device: torch.device, amp: str | bool | None = "auto",
                  channels_last: str | bool | None = "auto", methods: Iterable[str] = ()) -> nn.Module:
    """``model`` on ``device`` in eval mode, wrapped for mixed precision / NHWC as ``amp`` and
    ``channels_last`` say (:class:`AmpModule`); the model itself when both are off.

    Example (infer-cam): ``model = for_inference(model, device, config["amp"], methods=("cams",))``;
    ``model.cams(batch)`` then runs in bfloat16 on a GPU and returns float32 maps.
    """
    dtype = amp_dtype(device, amp)
    nhwc = use_channels_last(device, channels_last, dtype)
    model = model.to(device).eval()
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    if dtype is None and not nhwc:
        return model
    return AmpModule(model, device.type, dtype, nhwc, methods).eval()


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
          strict: bool = False) -> TrainResult:
    """Train ``model`` for ``section['epochs']`` epochs; resume from ``out_dir/checkpoint.pt``.

    ``step(model, batch)`` returns the loss and named parts for the log. ``prepare(model)`` is
    called after every ``model.train()`` (e.g. to keep BatchNorm frozen). The final weights
    ``out_dir/model.pt`` carry ``meta`` so that inference needs no config.

    Under torchrun each of N processes takes batch_size / N of every global batch (the same
    batches as one process), DDP averages the gradients, and rank 0 writes checkpoints and logs.
    ``amp`` / ``channels_last`` (None: ``section['amp']`` / ``section['channels_last']`` if set,
    else ``"auto"``): see :func:`amp_dtype` and :func:`use_channels_last`; the model's forward
    runs under autocast and ``step`` gets float32 outputs, so losses are computed in float32.
    Images that fail to load are skipped and returned in ``skipped``; with ``strict`` the first
    one stops training (TrainingError naming the file).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"
    final_path = out_dir / "model.pt"
    world = distributed.world_size()
    if section["batch_size"] % world:
        raise TrainingError(f"config key '{desc}.batch_size' ({section['batch_size']}) must be divisible "
                            f"by the number of processes ({world})")
    per_rank_batch = section["batch_size"] // world
    dtype = amp_dtype(device, section.get("amp", "auto") if amp is None else amp)
    nhwc = use_channels_last(device, section.get("channels_last", "auto") if channels_last is None
                             else channels_last, dtype)

    model.to(device)
    if nhwc:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(groups, section)
    # A GradScaler only for float16 (bfloat16 has float32's range); disabled it is a pass-through.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_epoch, history, skipped_all = 0, [], []
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"], state["history"]
        if distributed.is_main():
            tqdm.write(f"{desc}: resuming at epoch {start_epoch + 1}/{section['epochs']} from {checkpoint_path}")

    # One sampler for one process or many: with the same seed it yields the same permutation, so
    # N processes with batch B/N see exactly the batches of one process with batch B.
    sampler = DistributedSampler(dataset, num_replicas=world, rank=distributed.rank(), shuffle=True,
                                 seed=seed, drop_last=False)
    # Pinned host memory lets the steps' .to(device, non_blocking=True) overlap the copy with
    # compute. Workers are not persistent: they hold a copy of the dataset, whose epoch (the
    # augmentation seed) is set in this process before every epoch.
    loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_skipping, drop_last=True, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise TrainingError(f"{desc}: {len(dataset)} training images are fewer than one batch of "
                            f"{section['batch_size']}; lower {desc}.batch_size")
    total_steps = steps_per_epoch * section["epochs"]

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

    cudnn_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # fixed crop size: tune the conv kernels once
    started = time.time()
    try:
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
                if strict and skipped:
                    raise TrainingError(f"{skipped[0]} (--strict stops at the first bad input)")
                global_step = epoch * steps_per_epoch + index
                # Adam decays too: at a constant rate the last epochs' training loss rose again
                # (MSRC-21, README), so the final weights were wherever the last steps left them.
                for group in optimizer.param_groups:
                    group["lr"] = poly_lr(section["lr"], global_step, total_steps, section["poly_power"]) * group["lr_mult"]
                # A share of a batch whose images all failed to load: every rank skips the step.
                if not _all_ranks_true(batch is not None, device):
                    continue
                loss, parts = step(net, batch)
                finite = bool(torch.isfinite(loss.detach()))
                if not _all_ranks_true(finite, device):
                    kept = (f"the last good checkpoint {checkpoint_path} (after epoch {epoch}) is intact"
                            if checkpoint_path.exists() else "no checkpoint had been written yet")
                    value = "non-finite in another process" if finite else loss.item()
                    hint = " (or use amp=bf16 or amp=off)" if dtype == torch.float16 else ""
                    raise TrainingError(f"{desc}: loss became {value} at epoch {epoch + 1}, step {index + 1}; "
                                        f"training stopped and {kept}. Lower {desc}.lr{hint} or check the inputs.")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                count += 1
                for name, value in {"loss": float(loss.detach()), **parts}.items():
                    totals[name] = totals.get(name, 0.0) + float(value)
                progress.set_postfix(loss=f"{totals['loss'] / count:.4f}")
            means = _mean_over_ranks(totals, count)
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **means,
                   "seconds": round(time.time() - started, 2)}
            history.append(row)
            if distributed.is_main():
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "epoch": epoch + 1, "history": history}
                if scaler.is_enabled():
                    state["scaler"] = scaler.state_dict()
                save_checkpoint(checkpoint_path, state)
                _write_log(out_dir / "log.csv", history)
                tqdm.write(f"{desc}: epoch {epoch + 1}/{section['epochs']} loss {row.get('loss', float('nan')):.4f}")
            distributed.barrier()
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark

    if distributed.is_main():
        save_checkpoint(final_path, {"model": model.state_dict(), "meta": meta, "history": history})
    distributed.barrier()
    return TrainResult(final_path, section["epochs"], time.time() - started, skipped_all, history)


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
