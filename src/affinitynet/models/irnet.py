"""IRNet (Ahn, Cho & Kwak, CVPR 2019, 3.2): a frozen ImageNet backbone and two small branches on
its multi-level features, predicting at a quarter of the image's resolution

- a class-boundary map ``B`` in [0, 1] (one channel, sigmoid), trained through the path-max
  affinities of ``inter_pixel`` with the class-balanced loss of AffinityNet's Eq. 10;
- a displacement field ``D`` (two channels: rows, columns, in grid cells) towards each pixel's
  instance centroid, trained with ``inter_pixel.displacement_loss``.

Each branch maps every backbone level by a 1x1 convolution, GroupNorm and ReLU, resizes it to the
stride-4 grid and mixes the concatenation with 1x1 convolutions. The backbone runs without
gradient, as in IRN: only the branches train, so one network's features serve both.

Two layouts (``irn.layout``):

- ``compact`` (this project's): the boundary branch as below; the displacement branch maps
  every level to 64 channels, resizes all to the grid, and mixes them by one unit (128) and a 1x1
  convolution (with bias) to the field. The first level is the backbone's own (ResNet-50's stem,
  at stride 2, resized down to the grid).
- ``irn`` (irn's ``net/resnet50_irn.py``, whose trained ``res50_irn.pth`` ``import-weights
  irn-irn`` loads): the first level is the stem max-pooled to stride 4 (irn's ``stage1``); each
  boundary unit is upsampled by its level's stride over 4 between its GroupNorm and its ReLU and
  cropped to the grid; the displacement branch is irn's hierarchy: units of 64, 128, 256, 256,
  256 channels, the three coarse ones upsampled to stride 8 and mixed by a unit of 256 (upsampled
  to stride 4), then concatenated with the two fine ones (448) and mapped by a unit of 256 and a
  1x1 convolution without bias to the field, from which eval mode subtracts irn's mean
  displacement (``displacement_mean``, irn's ``mean_shift``; 0 when trained here).

The boundary branches of the two layouts have the same weights (keys and shapes); they differ in
the first level's input and in resizing before or after the ReLU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.inter_pixel import displacement_loss, path_max_affinities
from .affinity import affinity_loss

STRIDE = 4
LAYOUTS = ("compact", "irn")
# irn's widths (resnet50_irn.py): (channels, GroupNorm groups) of the boundary units, of the five
# displacement units, of the unit mixing the three coarse ones, and of the last unit.
IRN_BOUNDARY = (32, 4)
IRN_DISPLACEMENT = ((64, 8), (128, 16), (256, 16), (256, 16), (256, 16))
IRN_DISPLACEMENT_MIX = (256, 16)
IRN_DISPLACEMENT_OUT = (256, 16)


def _unit(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True))


def _upsampled_unit(unit: nn.Sequential, x: torch.Tensor, factor: int, size) -> torch.Tensor:
    """irn's unit with an upsampling: conv, GroupNorm, bilinear x factor, ReLU, cropped to ``size``."""
    x = unit[1](unit[0](x))
    if factor > 1:
        x = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    return unit[2](x)[..., :size[0], :size[1]]


class IRNet(nn.Module):
    """Backbone (frozen) + boundary branch + displacement branch; ``forward`` gives boundary
    logits (N, 1, h, w) and the displacement field (N, 2, h, w) on the grid of stride 4,
    h = ceil(H / 4). ``layout``: ``compact`` or ``irn`` (module docstring)."""

    def __init__(self, backbone: nn.Module, boundary_channels: int = 32, displacement_channels: int = 64,
                 layout: str = "compact"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"IRNet layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.backbone = backbone
        self.layout = layout
        levels = tuple(int(c) for c in backbone.out_channels)
        if layout == "irn":
            if len(levels) != 5:
                raise ValueError(f"irn's IRNet reads ResNet-50's five levels, the backbone has {len(levels)}")
            width, groups = IRN_BOUNDARY
            self.boundary_units = nn.ModuleList(_unit(c, width, groups) for c in levels)
            self.boundary_out = nn.Conv2d(width * len(levels), 1, 1)
            self.displacement_units = nn.ModuleList(_unit(c, w, g) for c, (w, g) in zip(levels, IRN_DISPLACEMENT))
            mix, mix_groups = IRN_DISPLACEMENT_MIX
            self.displacement_mix = _unit(sum(w for w, _ in IRN_DISPLACEMENT[2:]), mix, mix_groups)
            out, out_groups = IRN_DISPLACEMENT_OUT
            self.displacement_out = nn.Sequential(
                *_unit(sum(w for w, _ in IRN_DISPLACEMENT[:2]) + mix, out, out_groups), nn.Conv2d(out, 2, 1, bias=False))
            self.register_buffer("displacement_mean", torch.zeros(2))
        else:
            self.boundary_units = nn.ModuleList(_unit(c, boundary_channels, 4) for c in levels)
            self.boundary_out = nn.Conv2d(boundary_channels * len(levels), 1, 1)
            self.displacement_units = nn.ModuleList(_unit(c, displacement_channels, 8) for c in levels)
            self.displacement_mix = _unit(displacement_channels * len(levels), 2 * displacement_channels, 16)
            self.displacement_out = nn.Conv2d(2 * displacement_channels, 2, 1)
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()          # frozen: BatchNorm keeps its ImageNet statistics
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = (math.ceil(images.shape[-2] / STRIDE), math.ceil(images.shape[-1] / STRIDE))
        with torch.no_grad():
            levels = [level.detach() for level in self.backbone(images)]
        if self.layout == "irn":
            return self._irn_forward(levels)

        def gather(units: nn.ModuleList) -> torch.Tensor:
            maps = [unit(level) for unit, level in zip(units, levels)]
            return torch.cat([m if m.shape[-2:] == size else
                              F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], 1)

        boundary = self.boundary_out(gather(self.boundary_units))
        displacement = self.displacement_out(self.displacement_mix(gather(self.displacement_units)))
        return boundary, displacement

    def _irn_forward(self, levels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """irn's ``Net.forward``: ResNet-50's levels at strides 4 (the stem max-pooled), 4, 8 and
        min(16, s), s for output stride s."""
        levels = [F.max_pool2d(levels[0], 3, 2, 1)] + levels[1:]
        stride = int(self.backbone.output_stride)
        strides = (4, 4, 8, min(16, stride), stride)
        grid = levels[1].shape[-2:]
        boundary = [_upsampled_unit(unit, level, s // 4, grid)
                    for unit, level, s in zip(self.boundary_units, levels, strides)]
        boundary = self.boundary_out(torch.cat(boundary, 1))
        fine = [unit(level) for unit, level in zip(self.displacement_units[:2], levels[:2])]
        coarse_size = levels[2].shape[-2:]
        coarse = [_upsampled_unit(unit, level, s // 8, coarse_size)
                  for unit, level, s in zip(self.displacement_units[2:], levels[2:], strides[2:])]
        mixed = _upsampled_unit(self.displacement_mix, torch.cat(coarse, 1), 2, grid)
        displacement = self.displacement_out(torch.cat(fine + [mixed], 1))
        if not self.training:
            displacement = displacement - self.displacement_mean.view(1, 2, 1, 1)
        return boundary, displacement

    def new_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return []     # frozen


def irn_loss(boundary_logits: torch.Tensor, displacement: torch.Tensor, masks: dict[str, torch.Tensor],
             radius: int) -> tuple[torch.Tensor, dict[str, float]]:
    """IRN's training loss for one batch: the class-balanced affinity loss of the path-max
    affinities (``affinity.affinity_loss`` on ``1 - max B``) plus the displacement losses, from
    pair masks on the stride-4 grid (``affinity.pair_labels``: ``pos_fg``, ``pos_bg``, ``neg``)."""
    affinities = path_max_affinities(torch.sigmoid(boundary_logits[:, 0]), radius)
    boundary, parts = affinity_loss(affinities, masks["pos_fg"], masks["pos_bg"], masks["neg"])
    moved, moved_parts = displacement_loss(displacement, masks["pos_fg"], masks["pos_bg"], radius)
    logged = {f"boundary_{k}": float(v) for k, v in parts.items() if not k.startswith("num_")}
    logged.update({k: float(v) for k, v in moved_parts.items()})
    return boundary + moved, logged


def predict(model: IRNet, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The boundary map ``B`` (h, w) in [0, 1] and the displacement field ``D`` (2, h, w) of a
    normalised image (3, H, W), each the mean of the image's and its mirror's (the mirror's field
    mirrored back, its column component negated)."""
    logits, displacement = model(torch.stack([image, image.flip(-1)]))
    boundary = torch.sigmoid((logits[0, 0] + logits[1, 0].flip(-1)) / 2)
    mirrored = displacement[1].flip(-1) * displacement.new_tensor([1.0, -1.0])[:, None, None]
    return boundary, (displacement[0] + mirrored) / 2
