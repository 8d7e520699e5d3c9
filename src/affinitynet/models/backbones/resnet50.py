"""ResNet-50 (He et al., CVPR 2016), the backbone of the authors' follow-up IRNet, dilated to
output stride 8 or 16 in the paper's way (Sec. 4.1, A.1): the stride-2 of ``layer4`` (and of
``layer3`` for stride 8) becomes 1 and the later 3x3 convolutions are dilated instead.

Module names are torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``, bottleneck
``conv1..3``/``bn1..3``/``downsample``, stride on the 3x3 conv as in torchvision >= 0.2), so a
torchvision ImageNet state dict file (e.g. ``resnet50-0676ba61.pth`` or ``resnet50-19c8e357.pth``)
loads with ``pretrained=<path>``; its ``fc`` classifier is ignored. Nothing is downloaded:
``pretrained=True`` raises an error asking for the file.

Levels (strides for output_stride 8 / 16):

=====  ============================  ========  ======  =======
level  modules                       channels  OS 8    OS 16
=====  ============================  ========  ======  =======
1      ``conv1``, ``bn1`` (pre-pool) 64        2       2
2      ``maxpool``, ``layer1``       256       4       4
3      ``layer2``                    512       8       8
4      ``layer3``                    1024      8       16
5      ``layer4``                    2048      8       16
=====  ============================  ========  ======  =======

``atrous=False`` (config key ``backbone.atrous``) removes the same strides without dilating:
the authors' IRNet ``resnet50_cam.py`` builds its ResNet-50 with strides (2, 2, 2, 1) and no
dilation, so ``layer4`` runs at stride 1 with the 3x3 receptive fields of a stride-32 network
(output stride 16). Its released ``res50_cam.pth`` needs this to give irn's CAMs.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from . import register_backbone
from .weights import (IMAGENET_MEAN, IMAGENET_STD, ImageNetClassifier, check_output_stride,
                      dilation_plan, kaiming_init, load_linear, load_state_dict_file,
                      resolve_pretrained)

_BLOCKS = (3, 4, 6, 3)
_WIDTHS = (64, 128, 256, 512)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, dilation: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Backbone(nn.Module):
    """Dilated ResNet-50 feature extractor; see the module docstring for its levels."""

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, output_stride: int = 8, atrous: bool = True):
        super().__init__()
        check_output_stride("resnet50", output_stride, (8, 16, 32))
        self.output_stride = output_stride
        self.atrous = atrous
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        # Units that downsample: conv1, maxpool, then the first block of layer2..4. Only the
        # layers' strides may be replaced by dilation.
        layer_strides = (1, 2, 2, 2)
        unit_strides = [4]  # conv1 + maxpool together
        for stride, blocks in zip(layer_strides, _BLOCKS):
            unit_strides += [stride] + [1] * (blocks - 1)
        plan = dilation_plan(unit_strides, output_stride, atrous)[1:]
        cin, unit = 64, 0
        for index, (width, blocks) in enumerate(zip(_WIDTHS, _BLOCKS), start=1):
            layer = []
            for _ in range(blocks):
                # The 3x3 conv2 carries the stride (torchvision's v1.5), so it takes dilation_in.
                stride, dilation, _ = plan[unit]
                layer.append(Bottleneck(cin, width, stride, dilation))
                cin, unit = width * Bottleneck.expansion, unit + 1
            self.add_module(f"layer{index}", nn.Sequential(*layer))
        self.out_channels = (64, 256, 512, 1024, 2048)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        x1 = self.layer1(self.maxpool(stem))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return [stem, x1, x2, x3, x4]

    def imagenet_classifier(self, path: str | os.PathLike) -> ImageNetClassifier:
        """This backbone + GAP + the ImageNet ``fc`` layer of the torchvision file ``path``."""
        linear = load_linear(path, "fc.weight", "fc.bias")
        return ImageNetClassifier(self, linear.to(next(self.parameters()).device))


@register_backbone("resnet50")
def resnet50(output_stride: int = 8, pretrained: bool | str = True,
             atrous: bool = True) -> ResNet50Backbone:
    path = resolve_pretrained("resnet50", pretrained,
                              no_shipped_hint=" such as torchvision's resnet50-0676ba61.pth")
    model = ResNet50Backbone(output_stride, atrous)
    model.name = "resnet50"
    if path is not None:
        load_state_dict_file(model, path, ignore_prefixes=("fc.",))
    return model
