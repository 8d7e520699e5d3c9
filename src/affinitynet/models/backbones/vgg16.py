"""VGG16 in the DeepLab-LargeFOV layout (Chen et al. [4]), output stride 8: the backbone of the
paper's "Ours-DeepLab" segmentation model (Sec. 5) and of the authors' VGG16 variant.

Layout: VGG16's 13 conv layers with 3x3 max pooling (stride 2, padding 1, so a level's size is
``ceil(input / stride)``) after conv1..conv3; pool4 and pool5 have stride 1, conv5 is dilated by 2;
``fc6`` is a 3x3 conv with 1024 channels and dilation 12, ``fc7`` a 1x1 conv with 1024 channels,
each followed by ReLU and dropout 0.5 as in DeepLab-LargeFOV. No classifier (``fc8``).

Keys: the conv layers are named as in torchvision's ``vgg16`` (``features.0`` .. ``features.28``,
same indices), ``fc6.weight/bias`` and ``fc7.weight/bias``. ``pretrained=<path>`` accepts

- a state dict of this backbone (``features.*``, ``fc6.*``, ``fc7.*``), or
- torchvision's ImageNet ``vgg16`` state dict (e.g. ``vgg16-397923af.pth``): its fully connected
  ``classifier.0``/``classifier.3`` are turned into ``fc6``/``fc7`` by DeepLab's decimation (every
  4th output unit, and for fc6 every 3rd spatial tap of the 7x7 kernel, which is why fc6 has
  dilation 12 = 4 x 3); ``classifier.6`` (the 1000-way layer) is ignored.

Nothing is shipped or downloaded (``pretrained=True`` raises an error asking for a file).
Normalisation is torchvision's ImageNet mean/std on RGB; Caffe-converted DeepLab weights expect BGR
0..255 input minus the BGR means instead and must be converted accordingly before use.

Levels (conv1, at stride 1, is not returned), all stride-8 from conv4 on:

=====  =============  ========  ======
level  layers         channels  stride
=====  =============  ========  ======
1      conv2_1-2      128       2
2      conv3_1-3      256       4
3      conv4_1-3      512       8
4      conv5_1-3      512       8
5      fc6, fc7       1024      8
=====  =============  ========  ======
"""
from __future__ import annotations

import torch
from torch import nn

from . import register_backbone
from .weights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    StateDict,
    check_output_stride,
    kaiming_init,
    load_state_dict_file,
    resolve_pretrained,
)

# (number of 3x3 convs, channels, pool stride, conv dilation) per VGG block.
_BLOCKS = ((2, 64, 2, 1), (2, 128, 2, 1), (3, 256, 2, 1), (3, 512, 1, 1), (3, 512, 1, 2))
# Index in ``features`` of the ReLU ending each returned level (conv2 .. conv5).
_LEVEL_ENDS = (8, 15, 22, 29)
# Its pool4 and pool5 never downsample (DeepLab-LargeFOV), so it stops at 8.
OUTPUT_STRIDES = (8,)


def decimate_torchvision_fc(state: StateDict) -> StateDict:
    """Turn torchvision's VGG16 fully connected layers into DeepLab-LargeFOV's fc6/fc7."""
    if "fc6.weight" in state or "classifier.0.weight" not in state:
        return state
    state = dict(state)
    fc6_w = state.pop("classifier.0.weight")
    fc6_b = state.pop("classifier.0.bias", None)
    fc7_w = state.pop("classifier.3.weight", None)
    fc7_b = state.pop("classifier.3.bias", None)
    state.pop("classifier.6.weight", None)
    state.pop("classifier.6.bias", None)
    if fc6_w.shape == (4096, 512 * 7 * 7):
        state["fc6.weight"] = fc6_w.reshape(4096, 512, 7, 7)[::4, :, ::3, ::3].contiguous()
        if fc6_b is not None:
            state["fc6.bias"] = fc6_b[::4].contiguous()
    else:  # leave it for load_state_dict_file to report with the file's real shape
        state["fc6.weight"] = fc6_w
    if fc7_w is not None:
        state["fc7.weight"] = (fc7_w[::4, ::4].reshape(1024, 1024, 1, 1).contiguous()
                               if fc7_w.shape == (4096, 4096) else fc7_w)
    if fc7_b is not None:
        state["fc7.bias"] = fc7_b[::4].contiguous() if fc7_b.shape == (4096,) else fc7_b
    return state


class VGG16LargeFOVBackbone(nn.Module):
    """DeepLab-LargeFOV VGG16 feature extractor; see the module docstring for its levels."""

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, output_stride: int = 8):
        super().__init__()
        check_output_stride("vgg16", output_stride, OUTPUT_STRIDES)
        self.output_stride = output_stride
        layers: list[nn.Module] = []
        cin = 3
        for convs, cout, pool_stride, dilation in _BLOCKS:
            for _ in range(convs):
                layers += [nn.Conv2d(cin, cout, 3, 1, dilation, dilation), nn.ReLU(inplace=True)]
                cin = cout
            layers.append(nn.MaxPool2d(3, pool_stride, 1))
        self.features = nn.Sequential(*layers)
        self.fc6 = nn.Conv2d(512, 1024, 3, 1, 12, 12)
        self.fc7 = nn.Conv2d(1024, 1024, 1)
        self.relu = nn.ReLU(inplace=True)
        self.dropout6 = nn.Dropout(0.5)
        self.dropout7 = nn.Dropout(0.5)
        self.out_channels = (128, 256, 512, 512, 1024)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _LEVEL_ENDS:
                # The next layer is a pool that does not act in place; later in-place ReLUs act
                # on new tensors, so the stored map stays intact.
                levels.append(x)
        x = self.dropout6(self.relu(self.fc6(x)))
        x = self.dropout7(self.relu(self.fc7(x)))
        levels.append(x)
        return levels


@register_backbone("vgg16", output_strides=OUTPUT_STRIDES)
def vgg16(output_stride: int = 8, pretrained: bool | str = True) -> VGG16LargeFOVBackbone:
    path = resolve_pretrained("vgg16", pretrained,
                              no_shipped_hint=" such as torchvision's vgg16-397923af.pth")
    model = VGG16LargeFOVBackbone(output_stride)
    model.name = "vgg16"
    if path is not None:
        load_state_dict_file(model, path, convert=decimate_torchvision_fc)
    return model
