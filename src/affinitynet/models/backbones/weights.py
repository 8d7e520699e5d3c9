"""Helpers shared by the backbones: loading ImageNet weights (paper Sec. 4.1: every network
starts from an ImageNet-trained backbone), the ImageNet check head, random initialisation and the
dilation plan that turns a classification network into an output-stride-8 one.

Weight files are read with ``torch.load(..., weights_only=True)`` only: a state dict is plain
tensors, and a file that needs arbitrary unpickling could run code on the user's machine, so it is
refused rather than loaded. MXNet ``.params`` files (recognised by their magic number, whatever
their name) are read with NumPy by :mod:`.mxnet_params`, which maps ResNet-38's MXNet names onto
this project's keys; they hold only arrays and names, so they run no code either. Every failure
is raised as one :class:`WeightsError` that names the file, so a user with a wrong or damaged file
sees at once which file and which keys are at fault.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ...errors import WeightsError
from . import mxnet_params

StateDict = dict[str, torch.Tensor]

# torchvision-style ImageNet normalisation, RGB on the 0..1 scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Containers that training scripts commonly wrap a state dict in (checkpoints of psa, irn,
# torchvision reference scripts, Lightning, ...). Searched in this order.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
_SHOWN_KEYS = 8
# How PyTorch files begin: a zip archive (torch.save since 1.6) or a pickle (older torch.save).
_TORCH_HEADS = (b"PK\x03\x04", b"\x80")


def _key_list(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN_KEYS])
    if len(keys) > _SHOWN_KEYS:
        shown += f", ... ({len(keys) - _SHOWN_KEYS} more, {len(keys)} in all)"
    return shown


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a state dict from ``path`` safely and unwrap the usual containers.

    Accepts a bare state dict, or one nested under ``state_dict`` / ``model`` (and similar) keys,
    with or without the ``module.`` prefix that ``DataParallel`` adds; or an MXNet ``.params``
    file (:func:`.mxnet_params.read_state_dict`: resnet38d key names, float16 as float32).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file '{path}' does not exist (or is not a file)")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if mxnet_params.has_list_magic(head):
        return mxnet_params.read_state_dict(path)
    if path.suffix.lower() == ".params" and not head.startswith(_TORCH_HEADS):
        # torch.load would call it "truncated or corrupt"; the name says MXNet was meant.
        raise WeightsError(mxnet_params.wrong_magic_message(path, head))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's restricted unpickler refuses anything but tensors and plain containers; it
        # words that as "Weights only load failed" followed by the offending global/opcode.
        message = str(error)
        if "weights only load failed" in message.lower():
            reason = next((line.strip() for line in message.splitlines()
                           if "unsupported" in line.lower() or "global" in line.lower()), "")
            raise WeightsError(
                f"weight file '{path}' was refused for safety: it is not a plain state dict, "
                f"and loading it would run code or build objects named in the file "
                f"(torch.load with weights_only=True: {reason or 'rejected'}). If you trust it, "
                f"re-save only its state dict of tensors."
            ) from None
        raise WeightsError(f"weight file '{path}' could not be read: it is truncated or "
                           f"corrupt ({type(error).__name__}: {message})") from None
    except Exception as error:  # noqa: BLE001 - damaged files raise many different types
        raise WeightsError(f"weight file '{path}' could not be read: it is truncated or "
                           f"corrupt ({type(error).__name__}: {error})") from None

    for _ in range(3):  # containers are at most a couple of levels deep in practice
        if _is_state_dict(obj) or not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Mapping):
        # Checkpoints sometimes carry non-tensor extras next to the weights (epoch counters...).
        tensors = {k: v for k, v in obj.items()
                   if isinstance(k, str) and isinstance(v, torch.Tensor)}
    else:
        tensors = {}
    if not tensors:
        raise WeightsError(f"weight file '{path}' holds no state dict (found "
                           f"{type(obj).__name__}); expected a mapping of parameter names to "
                           f"tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def load_state_dict_file(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    ignore_prefixes: Iterable[str] = (),
    convert: Callable[[StateDict], StateDict] | None = None,
) -> None:
    """Load the state dict in ``path`` into ``model``, strictly.

    ``ignore_prefixes`` names the keys of the original ImageNet network that the backbone drops on
    purpose (its classifier: ``fc.``, ``classifier.``): they are discarded, every other key must
    match. ``convert`` may rewrite the state dict first (e.g. VGG16's fc6/fc7 decimation).
    ``num_batches_tracked`` buffers may be absent (files converted from Caffe/MXNet or saved by
    old PyTorch have none; they only matter for BatchNorm with ``momentum=None``).
    Raises :class:`WeightsError` naming the file and the missing, unexpected and mis-shaped keys.
    """
    state = read_state_dict(path)
    if convert is not None:
        state = convert(state)
    prefixes = tuple(ignore_prefixes)
    if prefixes:
        state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        name = getattr(model, "name", None) or type(model).__name__
        lines = [f"weight file '{path}' does not match backbone '{name}':"]
        if missing:
            lines.append(f"  {len(missing)} missing keys: {_key_list(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {_key_list(unexpected)}")
        if mismatched:
            lines.append(f"  {len(mismatched)} keys with a different shape: "
                         f"{_key_list(mismatched)}")
        raise WeightsError("\n".join(lines))
    for key, value in expected.items():
        if key not in state:  # an absent num_batches_tracked keeps the model's own value
            state[key] = value
    model.load_state_dict(state, strict=True)


def packaged_file(package: str, relative: str, install_hint: str) -> Path:
    """Path of a weight file shipped inside an installed Python package (no download ever)."""
    if importlib.util.find_spec(package) is None:
        raise WeightsError(f"the weights for this backbone come from the Python package "
                           f"'{package}', which is not installed: {install_hint}; or pass "
                           f"pretrained=<path to a state dict file>, or pretrained=False")
    path = Path(str(importlib.resources.files(package).joinpath(relative)))
    if not path.is_file():
        raise WeightsError(f"the package '{package}' is installed but its weight file "
                           f"'{path}' is missing; reinstall it ({install_hint})")
    return path


def resolve_pretrained(
    name: str,
    pretrained: bool | str | os.PathLike | None,
    *,
    shipped: Callable[[], Path] | None = None,
    no_shipped_hint: str = "",
) -> Path | None:
    """The weight file that the registry's ``pretrained`` argument asks for, or ``None``.

    ``True``: the file the backbone ships with (``shipped`` returns its path); a backbone without
    one raises a :class:`WeightsError` asking for a path. ``False``: random initialisation.
    A path: that file, which must exist. Called before the network is built, so that a wrong
    argument fails at once rather than after constructing a large network.
    """
    if pretrained is False or pretrained is None:
        return None
    if pretrained is True:
        if shipped is None:
            raise WeightsError(f"backbone '{name}' ships no ImageNet weights: pass "
                               f"pretrained=<path to a state dict file>{no_shipped_hint} "
                               f"(or pretrained=False for a random initialisation)")
        return Path(shipped())
    if isinstance(pretrained, (str, os.PathLike)):
        path = Path(pretrained)
        if not path.is_file():
            raise WeightsError(f"weight file '{path}' does not exist (or is not a file)")
        return path
    raise TypeError(f"pretrained must be True, False or a path, not {pretrained!r}")


def load_linear(path: str | os.PathLike, weight_key: str, bias_key: str) -> nn.Linear:
    """The ImageNet classifier layer stored under ``weight_key``/``bias_key`` in ``path``."""
    state = read_state_dict(path)
    if weight_key not in state or bias_key not in state:
        raise WeightsError(f"weight file '{path}' has no ImageNet classifier "
                           f"('{weight_key}', '{bias_key}')")
    weight, bias = state[weight_key], state[bias_key]
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.load_state_dict({"weight": weight, "bias": bias})
    return linear


class ImageNetClassifier(nn.Module):
    """Backbone + global average pooling + the original ImageNet linear layer.

    Exists to check that loaded (and dilated) backbones still recognise ImageNet classes; the
    backbone itself drops the classifier, as the paper removes "the ultimate GAP and fully
    connected layer" (Sec. 4.1). Input is normalised with the backbone's ``mean``/``std``.
    """

    def __init__(self, backbone: nn.Module, linear: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)[-1]
        return self.linear(features.mean(dim=(2, 3)))


def kaiming_init(model: nn.Module) -> None:
    """He initialisation for convs, identity BatchNorm, small linear layers: the usual random
    start for ReLU networks (used with ``pretrained=False``)."""
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0, 0.01)
            nn.init.zeros_(layer.bias)


def check_output_stride(name: str, output_stride: int, supported: tuple[int, ...]) -> None:
    if output_stride not in supported:
        raise ValueError(f"backbone '{name}' supports output_stride "
                         f"{' or '.join(map(str, supported))}, not {output_stride}")


def dilation_plan(strides: Iterable[int], output_stride: int,
                  atrous: bool = True) -> list[tuple[int, int, int]]:
    """``(stride, dilation_in, dilation_out)`` for each unit of a network whose units downsample
    by ``strides``, so that it stops downsampling at ``output_stride`` (paper Sec. 4.1 and A.1:
    atrous convolution as in DeepLab [4]).

    Once ``output_stride`` is reached, a unit's stride 2 becomes 1 and the dilation of everything
    after it doubles instead, which keeps the receptive fields the ImageNet weights were trained
    with. Inside the unit whose stride is removed, convolutions up to and including the formerly
    strided one keep the previous dilation (``dilation_in``: they still look at the same input
    grid) and convolutions after it use the doubled one (``dilation_out``); for every other unit
    the two are equal.

    ``atrous=False`` removes the strides without dilating anything (every dilation 1): the
    receptive fields shrink, as in the authors' IRNet ResNet-50, whose last level runs at stride 1
    undilated (output stride 16).
    """
    plan, current, rate = [], 1, 1
    for stride in strides:
        if stride > 1 and current >= output_stride:
            grown = rate * stride if atrous else rate
            plan.append((1, rate, grown))
            rate = grown
        else:
            plan.append((stride, rate, rate))
            current *= stride
    return plan
