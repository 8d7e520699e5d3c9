"""Inter-pixel relations of IRN (Ahn, Cho & Kwak, CVPR 2019): affinities from a class-boundary map,
the displacement field's losses, and instance centroids from that field.

Pairs are those of AffinityNet (Eq. 4 with ``gamma = radius``) in the same one-sided layout
(``random_walk.neighbour_offsets``): per-pair tensors are (num_offsets, h, w), entry [k, y, x] for
the pair ((y, x), (y + dy_k, x + dx_k)).

- **Path-max affinity** (IRN Eq. 2): ``a_ij = 1 - max_{k in P_ij} B(x_k)``, ``P_ij`` the grid
  cells the segment from i to j passes within unit distance of (both ends included). A pair is
  unrelated as soon as one cell between its ends is a boundary.
- **Displacement losses** (IRN Eq. 4-5): for a pair of the same instance both ends point at one
  centroid, ``i + D(i) = j + D(j)``, so ``D(i) - D(j) = j - i``: the offset. Over foreground
  pairs the loss is ``|D(i) - D(j) - (j - i)|``; over background pairs ``|D(i) - D(j)|`` (the
  background's field is flat, as irn trains it).
- **Centroids** (IRN 3.4): every cell moves along the field, bilinearly interpolated, until it
  stops; cells whose walk ends in the same connected region of weak displacement form one
  instance.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .random_walk import neighbour_offsets


@lru_cache(maxsize=None)
def path_cells(radius: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """For each one-sided offset (dy, dx) of ``radius``, the cells (y, x) relative to the first
    end that the segment to (dy, dx) passes within unit distance of: those in the bounding box of
    the two ends whose distance to the line through them is below 1. Both ends are included."""
    paths = []
    for dy, dx in neighbour_offsets(radius):
        length_sq = dy * dy + dx * dx
        cells = [(y, x) for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
                 if (dy * x - dx * y) ** 2 < length_sq]
        paths.append(tuple(cells))
    return tuple(paths)


def path_max_affinities(boundary: torch.Tensor, radius: int) -> torch.Tensor:
    """IRN's affinities ``1 - max B`` along each pair's path (module docstring), from a boundary
    map ``B`` in [0, 1] of shape (h, w) or (N, h, w); returns (K, h, w) or (N, K, h, w), 0 where
    the second end is off the grid. Differentiable in ``B`` (the gradient goes to each path's
    maximum), as IRN's boundary branch is trained through it."""
    batched = boundary.dim() == 3
    maps = boundary if batched else boundary[None]
    if maps.dim() != 3:
        raise ValueError(f"boundary must be (h, w) or (N, h, w), got {tuple(boundary.shape)}")
    n, h, w = maps.shape
    paths = path_cells(radius)
    out = maps.new_zeros((n, len(paths), h, w))
    for k, ((dy, dx), cells) in enumerate(zip(neighbour_offsets(radius), paths)):
        # Rows/columns where both ends (hence every cell of the path) lie on the grid.
        y0, y1 = 0, h - dy
        x0, x1 = max(0, -dx), min(w, w - dx)
        if y1 <= y0 or x1 <= x0:
            continue
        peak = torch.stack([maps[:, y0 + cy:y1 + cy, x0 + cx:x1 + cx] for cy, cx in cells]).amax(0)
        out[:, k, y0:y1, x0:x1] = 1 - peak
    return out if batched else out[0]


def pair_displacements(displacement: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``D(i) - D(j)`` for every pair: (N, 2, K, h, w) from a field (N, 2, h, w) (channel 0 the
    row, 1 the column displacement, in cells), and a (K, h, w) mask of the pairs on the grid."""
    n, _, h, w = displacement.shape
    offsets = neighbour_offsets(radius)
    out = displacement.new_zeros((n, 2, len(offsets), h, w))
    valid = torch.zeros((len(offsets), h, w), dtype=torch.bool, device=displacement.device)
    for k, (dy, dx) in enumerate(offsets):
        y1, x0, x1 = h - dy, max(0, -dx), min(w, w - dx)
        if y1 <= 0 or x1 <= x0:
            continue
        out[:, :, k, :y1, x0:x1] = displacement[:, :, :y1, x0:x1] - displacement[:, :, dy:, x0 + dx:x1 + dx]
        valid[k, :y1, x0:x1] = True
    return out, valid


def displacement_loss(displacement: torch.Tensor, pos_fg: torch.Tensor, pos_bg: torch.Tensor, radius: int
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IRN's displacement losses (module docstring), each the mean over its pairs and the two
    coordinates: ``L_fg = mean |D(i) - D(j) - (j - i)|`` over ``pos_fg``, ``L_bg = mean
    |D(i) - D(j)|`` over ``pos_bg`` (boolean (N, K, h, w) masks, e.g. ``affinity.pair_labels``).
    Returns ``(L_fg + L_bg, {"disp_fg", "disp_bg"})``; an empty subset contributes 0."""
    pairs, _ = pair_displacements(displacement, radius)
    target = torch.tensor(neighbour_offsets(radius), dtype=pairs.dtype, device=pairs.device).T   # (2, K)
    fg_error = (pairs - target[None, :, :, None, None]).abs().sum(1)       # (N, K, h, w)
    bg_error = pairs.abs().sum(1)
    fg = (fg_error * pos_fg).sum() / (2 * pos_fg.sum()).clamp(min=1)
    bg = (bg_error * pos_bg).sum() / (2 * pos_bg.sum()).clamp(min=1)
    return fg + bg, {"disp_fg": fg.detach(), "disp_bg": bg.detach()}


def refine_centroids(displacement: np.ndarray, iterations: int = 100) -> np.ndarray:
    """Where each cell's walk along the field ends: (2, h, w) float positions after
    ``iterations`` steps ``p <- clip(p + D(p))``, ``D`` interpolated bilinearly at ``p``
    (IRN 3.4; a field that points at the centroids brings every cell of an instance there)."""
    field = np.asarray(displacement, dtype=np.float64)
    _, h, w = field.shape
    y, x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    for _ in range(iterations):
        y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
        y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
        fy, fx = y - y0, x - x0
        step = (field[:, y0, x0] * (1 - fy) * (1 - fx) + field[:, y1, x0] * fy * (1 - fx)
                + field[:, y0, x1] * (1 - fy) * fx + field[:, y1, x1] * fy * fx)
        y = np.clip(y + step[0], 0, h - 1)
        x = np.clip(x + step[1], 0, w - 1)
    return np.stack([y, x])


def instance_map(displacement: np.ndarray, iterations: int = 100, weak: float = 2.5) -> np.ndarray:
    """Instance ids (h, w), 1.., one per centroid: the connected regions (4-neighbourhood) where
    the field is weaker than ``weak`` cells are the centroids, and each cell belongs to the region
    its walk (:func:`refine_centroids`) ends in; a cell whose walk ends elsewhere gets 0."""
    from scipy import ndimage

    field = np.asarray(displacement, dtype=np.float64)
    regions, _ = ndimage.label(np.hypot(field[0], field[1]) < weak)
    ends = np.rint(refine_centroids(field, iterations)).astype(int)
    owner = regions[ends[0], ends[1]]
    # Ids by first appearance in raster order, so that equal fields give equal maps.
    ids = {value: index for index, value in enumerate(dict.fromkeys(owner[owner > 0].ravel().tolist()), start=1)}
    lookup = np.zeros(regions.max() + 1, dtype=np.int32)
    for value, index in ids.items():
        lookup[value] = index
    return lookup[owner]
