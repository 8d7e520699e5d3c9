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
from typing import Callable

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str):
    def decorator(builder: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"backbone '{name}' is registered twice")
        _REGISTRY[name] = builder
        return builder
    return decorator


def list_backbones() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def supports_undilated(name: str) -> bool:
    """Whether backbone ``name`` can drop its strides without dilating (``atrous=False``)."""
    _import_all()
    return name in _REGISTRY and "atrous" in inspect.signature(_REGISTRY[name]).parameters


def create_backbone(name: str, output_stride: int = 8, pretrained: bool | str = True,
                    atrous: bool = True) -> nn.Module:
    _import_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone '{name}' (choose from {', '.join(sorted(_REGISTRY))})")
    options = {}
    if not atrous:
        if not supports_undilated(name):
            raise ValueError(f"backbone '{name}' is always atrous past its output stride (atrous=False "
                             f"is supported by: {', '.join(n for n in sorted(_REGISTRY) if supports_undilated(n))})")
        options["atrous"] = False
    model = _REGISTRY[name](output_stride=output_stride, pretrained=pretrained, **options)
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


def _import_all() -> None:
    # Importing the package's modules runs their @register_backbone decorators: a new backbone
    # file is found without being listed here.
    import importlib
    import pkgutil

    if not _IMPORTED:
        _IMPORTED.append(True)
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")


_IMPORTED: list[bool] = []
