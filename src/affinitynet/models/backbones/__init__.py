"""Backbone registry (timm-style): ``@register_backbone("name")`` on a builder function, then
``create_backbone(name, output_stride=8, pretrained=...)``.

Every backbone is an ``nn.Module`` whose ``forward(x)`` returns a list of feature maps, one per
level (a level is a group of units sharing one output stride, paper footnote 1), shallow to deep;
the last map is at ``output_stride``. AffinityNet uses the last three levels. Attributes:

- ``out_channels``: tuple of channel counts, one per returned level
- ``output_stride``: int
- ``mean``, ``std``: the RGB normalisation (0..1 scale) its ImageNet weights expect
- ``name``: registry name
- ``cpu_channels_last`` (optional, default False): whether its forward pass on a CPU is faster
  in NHWC than in NCHW, as measured (``benchmarks/inference_threads.py``); inference on a CPU
  then runs NHWC under ``channels_last: auto``

``pretrained`` is ``True`` (the weights the backbone ships with offline, where it has any),
``False`` (random initialisation) or a path to a state dict file supplied by the user.
``atrous=False`` (only for builders that take an ``atrous`` argument: ``resnet50``) removes the
strides past the output stride without dilating the later convolutions.
"""
from __future__ import annotations

import inspect

from torch import nn

from ...registry import Registry
from .weights import check_output_stride

# Every module of this package is imported before the first lookup, so that its
# ``@register_backbone`` decorators have run: a new backbone file is found without being listed.
BACKBONES = Registry("backbone", package=__name__)


def register_backbone(name: str, output_strides: tuple[int, ...] = (8, 16, 32)):
    """Decorator on a builder ``(output_stride=8, pretrained=True[, atrous=True]) -> nn.Module``;
    ``output_strides``: the strides it can stop downsampling at (the config refuses others)."""
    return BACKBONES.register(name, output_strides=tuple(output_strides))


def list_backbones() -> list[str]:
    return BACKBONES.names()


def output_strides(name: str) -> tuple[int, ...]:
    """The output strides backbone ``name`` supports."""
    return BACKBONES.get(name).info["output_strides"]


def supports_undilated(name: str) -> bool:
    """Whether backbone ``name`` can drop its strides without dilating (``atrous=False``)."""
    return name in BACKBONES and "atrous" in inspect.signature(BACKBONES.get(name).builder).parameters


def create_backbone(name: str, output_stride: int = 8, pretrained: bool | str = True,
                    atrous: bool = True) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES.names())})")
    check_output_stride(name, output_stride, output_strides(name))
    options = {}
    if not atrous:
        if not supports_undilated(name):
            raise ValueError(f"backbone '{name}' is always atrous past its output stride (atrous=False "
                             f"is supported by: {', '.join(n for n in BACKBONES.names() if supports_undilated(n))})")
        options["atrous"] = False
    model = BACKBONES.get(name).builder(output_stride=output_stride, pretrained=pretrained, **options)
    model.name = name
    return model


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm in eval mode with frozen affine parameters (paper's setting).

    Call after ``module.train()``: ``train()`` switches BatchNorm back to batch statistics.
    """
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()
            for parameter in layer.parameters():
                parameter.requires_grad_(False)
