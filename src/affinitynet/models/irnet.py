"""IRNet (Ahn, Cho & Kwak, CVPR 2019, 3.2): a frozen ImageNet backbone and two small branches on
its multi-level features, predicting at a quarter of the image's resolution

- a class-boundary map ``B`` in [0, 1] (one channel, sigmoid), trained through the path-max
  affinities of ``inter_pixel`` with the class-balanced loss of AffinityNet's Eq. 10;
- a displacement field ``D`` (two channels: rows, columns, in grid cells) towards each pixel's
  instance centroid, trained with ``inter_pixel.displacement_loss``.

Each branch maps every backbone level by a 1x1 convolution, GroupNorm and ReLU, resizes it to the
stride-4 grid and mixes the concatenation with 1x1 convolutions. The backbone runs without
gradient, as in IRN: only the branches train, so one network's features serve both.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.inter_pixel import displacement_loss, path_max_affinities
from .affinity import affinity_loss

STRIDE = 4


def _unit(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True))


class IRNet(nn.Module):
    """Backbone (frozen) + boundary branch + displacement branch; ``forward`` gives boundary
    logits (N, 1, h, w) and the displacement field (N, 2, h, w) on the grid of stride 4,
    h = ceil(H / 4)."""

    def __init__(self, backbone: nn.Module, boundary_channels: int = 32, displacement_channels: int = 64):
        super().__init__()
        self.backbone = backbone
        levels = tuple(int(c) for c in backbone.out_channels)
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

        def gather(units: nn.ModuleList) -> torch.Tensor:
            maps = [unit(level) for unit, level in zip(units, levels)]
            return torch.cat([m if m.shape[-2:] == size else
                              F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], 1)

        boundary = self.boundary_out(gather(self.boundary_units))
        displacement = self.displacement_out(self.displacement_mix(gather(self.displacement_units)))
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
