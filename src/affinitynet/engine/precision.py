"""Mixed precision and channels-last for training and inference: which autocast dtype and memory
layout a setting means on a device (``amp``, ``channels_last`` config keys), and the wrapper that
runs a network's methods under them while handing float32, NCHW tensors back."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import TrainingError

AMP_CHOICES = ("auto", "native", "bf16", "fp16", "off")
CHANNELS_LAST_CHOICES = ("auto", "on", "off")


def amp_dtype(device: torch.device, amp: str | bool | None = "auto") -> torch.dtype | None:
    """The autocast dtype that ``amp`` means on ``device``; None: plain float32.

    ``"auto"`` (or True): bfloat16 on a CUDA GPU that supports it, else float16 (trained with a
    GradScaler); off on a CPU. ``"native"``: as ``"auto"`` on a GPU, and bfloat16 on a CPU that
    computes it natively (:func:`cpu_native_bf16`), float32 on other CPUs, where bfloat16 is
    many times slower (docs/performance.md, "bf16 autocast"). ``"bf16"`` / ``"fp16"`` force a dtype (also on a CPU, where autocast exists
    too: that is how the tests exercise these paths). ``"off"`` (or False, None): float32
    everywhere, the paper's setting and the way to reproduce a CPU run bit for bit.
    """
    if amp is None or amp is False:
        return None
    if amp is True:
        amp = "auto"
    amp = str(amp).lower()
    if amp == "off":
        return None
    if amp == "native" and device.type != "cuda":
        return torch.bfloat16 if cpu_native_bf16() else None
    if amp in ("auto", "native"):
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


def dtype_name(device: torch.device, amp: str | bool | None) -> str:
    """The dtype the networks compute in under ``amp`` on ``device``: ``"float32"``, ``"bfloat16"``
    or ``"float16"`` (a stage records it beside its seconds)."""
    dtype = amp_dtype(device, amp)
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def cpu_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX), where oneDNN's bf16
    kernels outrun float32; elsewhere they fall back to reference kernels, far slower than
    float32's (docs/performance.md, "bf16 autocast")."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cpu_amp_note(device: torch.device, amp: str | bool | None) -> str | None:
    """One line for a run on a CPU whose ``amp`` setting and CPU disagree: float32 on a CPU with
    native bfloat16, or bfloat16 on one without. None otherwise (and on a GPU)."""
    if device.type != "cpu":
        return None
    dtype, native = amp_dtype(device, amp), cpu_native_bf16()
    if dtype is None and native:
        return ("amp: float32 on this CPU, which computes bfloat16 natively (AVX512-BF16 or AMX): amp=bf16 "
                "runs the pipeline faster, with figures of its own (docs/performance.md, \"Speed\")")
    if dtype == torch.bfloat16 and not native:
        return ("amp: bf16 on a CPU without native bfloat16 (no AVX512-BF16, no AMX): its fallback kernels run "
                "20-50x slower than float32; amp=off is faster here")
    return None


def use_channels_last(device: torch.device, channels_last: str | bool | None = "auto",
                      dtype: torch.dtype | None = None, training: bool = False, cpu_nhwc: bool = False) -> bool:
    """Whether convolutions should run on NHWC tensors. ``"auto"``: on CUDA under mixed
    precision, where cuDNN's tensor-core kernels are NHWC and NCHW costs a transpose per conv;
    on a CPU for inference only where the backbone's NHWC forward pass was measured faster
    (``cpu_nhwc``, the backbone's ``cpu_channels_last``: MobileNetV2's NHWC, EfficientNet-Lite's
    NCHW, by ``benchmarks/inference_threads.py``); never for training on a CPU, where NHWC was
    slower for two of the four networks (``benchmarks/stage_throughput.py``; the figures:
    docs/performance.md, "Kept: channels-last for inference")."""
    if channels_last is None or channels_last == "auto":
        if device.type == "cpu":
            return cpu_nhwc and not training
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
    nhwc = use_channels_last(device, channels_last, dtype,
                             cpu_nhwc=getattr(getattr(model, "backbone", None), "cpu_channels_last", False))
    model = model.to(device).eval()
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    if dtype is None and not nhwc:
        return model
    return AmpModule(model, device.type, dtype, nhwc, methods).eval()
