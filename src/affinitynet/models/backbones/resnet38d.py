"""ResNet-38 ("Model A1" of Wu, Shen & van den Hengel [38]), the paper's backbone (Sec. 4.1,
A.1, Fig. 7), with its last levels made atrous so that the output stride is 8.

The network is a wide pre-activation ResNet: ``conv1a`` (3x3, 64) followed by levels B2 (3 units,
128 ch), B3 (3 units, 256), B4 (6 units, 512), B5 (3 units, 1024), B6 (1 bottleneck unit, 2048)
and B7 (1 bottleneck unit, 4096), then a final BatchNorm ``bn7``. In the ImageNet model B2..B6 each
start with a stride-2 unit, so B6 and B7 share output stride 32; by the paper's definition of a
level ("a group of residual units that share the same output stride", footnote 1) they form one
level. Following the paper, the GAP and FC layer are removed and the last three levels are made
atrous with input stride 1: for output stride 8, B5 is dilated by 2 and B6/B7 by 4 (the unit
whose stride is removed keeps dilation 1 in its first conv), exactly as the authors' released
code does. Output stride 16 (B5 strided, B6/B7 dilated by 2) and 32 (the ImageNet network) are
available too.

Levels returned (the BatchNorm+ReLU'd output of each level, as a pre-activation network's
features are only normalised at the next unit's input), strides for output stride 8 (16):

=====  ==========================  ========  =======
level  units                       channels  stride
=====  ==========================  ========  =======
1      b2, b2_1, b2_2              128       2 (2)
2      b3, b3_1, b3_2              256       4 (4)
3      b4, b4_1 .. b4_5            512       8 (8)
4      b5, b5_1, b5_2              1024      8 (16)
5      b6, b7, bn7                 4096      8 (16)
=====  ==========================  ========  =======

The last three are the ones the released AffinityNet code aggregates (its conv4/conv5/conv6).

Weights: no ResNet-38 ImageNet file is shipped; pass ``pretrained=<path>`` to either the original
MXNet file that psa's README points to, ``ilsvrc-cls_rna-a1_cls1000_ep-0001.params`` (read without
MXNet, names mapped as the authors' ``convert_mxnet_to_torch`` does: see ``mxnet_params``), or a
PyTorch state dict with the key names of the authors' converted file (``conv1a.weight``,
``b2.bn_branch2a.*``, ``b2.conv_branch2a.weight``, ``b2.conv_branch1.weight``,
``b6.conv_branch2b2.weight``, ``bn7.*``, ...). Classifier keys (``fc8``, ``fc``, ``linear1000``)
are ignored; BatchNorm ``num_batches_tracked`` may be absent. Normalisation is ImageNet mean/std.

The B6 and B7 bottleneck units of Model A1 use dropout (rates 0.3 and 0.5, channel-wise as in the
released code); it is active only in ``train()`` mode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register_backbone
from .weights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_output_stride,
    dilation_plan,
    kaiming_init,
    load_state_dict_file,
    resolve_pretrained,
)


class ResidualUnit(nn.Module):
    """Pre-activation unit with two 3x3 convolutions (levels B2..B5).

    The stride sits on the first 3x3 conv, so it takes ``dilation_in`` and the second conv
    ``dilation_out`` (weights.dilation_plan).
    """

    def __init__(self, cin: int, mid: int, cout: int, stride: int, dilation_in: int,
                 dilation_out: int):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, mid, 3, stride, dilation_in, dilation_in, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid)
        self.conv_branch2b1 = nn.Conv2d(mid, cout, 3, 1, dilation_out, dilation_out, bias=False)
        # Every unit that downsamples in Model A1 also widens, so the projection is decided by
        # the channels alone and the key set does not depend on the output stride.
        self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (unit output, the unit's activated input = previous output after BN+ReLU)."""
        activated = F.relu(self.bn_branch2a(x))
        shortcut = x if self.conv_branch1 is None else self.conv_branch1(activated)
        out = self.conv_branch2a(activated)
        out = self.conv_branch2b1(F.relu(self.bn_branch2b1(out)))
        return shortcut + out, activated


class BottleneckUnit(nn.Module):
    """Pre-activation bottleneck unit (levels B6, B7): 1x1 (cout/4, strided) -> 3x3 (cout/2,
    dilated) -> 1x1 (cout), with dropout before the last two convolutions.

    The stride sits on the first 1x1 conv, so the 3x3 conv comes after it and takes
    ``dilation_out``.
    """

    def __init__(self, cin: int, cout: int, stride: int, dilation_out: int, dropout: float):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, cout // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(cout // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(cout // 4, cout // 2, 3, 1, dilation_out, dilation_out,
                                        bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(cout // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(cout // 2, cout, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        activated = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(activated)
        out = self.conv_branch2a(activated)
        out = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(out))))
        out = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(out))))
        return shortcut + out, activated


# (attribute names of the units, channels in, mid, out) of the residual levels B2..B5.
_RESIDUAL_LEVELS = (
    (("b2", "b2_1", "b2_2"), 64, 128, 128),
    (("b3", "b3_1", "b3_2"), 128, 256, 256),
    (("b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5"), 256, 512, 512),
    (("b5", "b5_1", "b5_2"), 512, 512, 1024),
)
# (attribute name, channels in, out, dropout) of the bottleneck levels B6, B7.
_BOTTLENECK_LEVELS = (("b6", 1024, 2048, 0.3), ("b7", 2048, 4096, 0.5))


class ResNet38dBackbone(nn.Module):
    """Atrous ResNet-38 feature extractor; see the module docstring for its levels."""

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, output_stride: int = 8):
        super().__init__()
        check_output_stride("resnet38d", output_stride, (8, 16, 32))
        self.output_stride = output_stride
        names = [n for level in _RESIDUAL_LEVELS for n in level[0]] + [b[0] for b in _BOTTLENECK_LEVELS]
        strides = [2 if n in ("b2", "b3", "b4", "b5", "b6") else 1 for n in names]
        plan = dict(zip(names, dilation_plan(strides, output_stride)))

        self.conv1a = nn.Conv2d(3, _RESIDUAL_LEVELS[0][1], 3, 1, 1, bias=False)
        self._level_starts = []
        for units, cin, mid, cout in _RESIDUAL_LEVELS:
            self._level_starts.append(units[0])
            for name in units:
                stride, dilation_in, dilation_out = plan[name]
                self.add_module(name, ResidualUnit(cin, mid, cout, stride, dilation_in,
                                                   dilation_out))
                cin = cout
        self._level_starts.append("b6")
        for name, cin, cout, dropout in _BOTTLENECK_LEVELS:
            self.add_module(name, BottleneckUnit(cin, cout, plan[name][0], plan[name][2], dropout=dropout))
        self.bn7 = nn.BatchNorm2d(cout)
        self._units = names
        self.out_channels = tuple(level[3] for level in _RESIDUAL_LEVELS) + (cout,)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.conv1a(x)
        levels = []
        for name in self._units:
            x, activated = getattr(self, name)(x)
            # The first unit of a level normalises the previous level's output: that is the
            # previous level's feature map (except for b2, whose input is conv1a's output).
            if name in self._level_starts and name != "b2":
                levels.append(activated)
        levels.append(F.relu(self.bn7(x)))
        return levels


@register_backbone("resnet38d")
def resnet38d(output_stride: int = 8, pretrained: bool | str = True) -> ResNet38dBackbone:
    path = resolve_pretrained("resnet38d", pretrained, no_shipped_hint=(
        " holding ResNet-38 (Model A1) ImageNet weights: psa's MXNet file "
        "ilsvrc-cls_rna-a1_cls1000_ep-0001.params, or a state dict with the key names listed in "
        "affinitynet/backbones/resnet38d.py"))
    model = ResNet38dBackbone(output_stride)
    model.name = "resnet38d"
    if path is not None:
        load_state_dict_file(model, path, ignore_prefixes=("fc8.", "fc.", "linear1000."))
    return model
