"""A backbone small enough for tests: the interface of ``affinitynet.models.backbones`` in three convs."""
from __future__ import annotations

from torch import nn


class TinyBackbone(nn.Module):
    """Three stride-2 convs (output stride 8) with the backbone interface: a list of levels,
    ``out_channels``, ``mean``, ``std``, ``output_stride``."""

    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self, output_stride: int = 8):
        super().__init__()
        self.output_stride = output_stride
        self.out_channels = (8, 16, 24)
        cin, layers = 3, []
        for cout in self.out_channels:
            layers.append(nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout),
                                        nn.ReLU(inplace=True)))
            cin = cout
        self.levels = nn.ModuleList(layers)

    def forward(self, x):
        out = []
        for level in self.levels:
            x = level(x)
            out.append(x)
        return out
