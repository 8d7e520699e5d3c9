"""Pseudo labels (3.3-3.4): CAMs with background -> feature grid -> random walk with AffinityNet's
affinities (Eq. 11-12) -> bilinear upsampling to the image -> optional dense CRF -> argmax.

Refinements of the walked labels (``random_walk.crf``):

- ``full``: the paper's dCRF over the whole image (3.4).
- ``band``: the dCRF's labels only within half a feature-grid cell of the walk's label
  boundaries, the walk's labels elsewhere. The walk labels each grid cell with its majority, so
  where two of its labels meet, the true boundary lies within half a cell of the walked one: that
  is what the CRF can place better, from the image's edges. Away from boundaries the walk's label
  is already that of its cell, and a dCRF that relabels whole regions by colour there overrides
  the affinities with the kind of cue that AffinityNet was trained to weigh (docs/label-refinement.md,
  "Refining the walk's labels"; ``python -m benchmarks.crf_changes`` measures it on a run).
  The width is half the grid's stride in image pixels, read from the network (``band_width``).
- ``off``: the walk's labels.

The random-walk stage and the hyper-parameter sweep share these functions, so the sweep
reproduces the stage's labels exactly at the stage's own (alpha, beta, t).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..files import IGNORE_INDEX, save_label_png
from .background import background_map, labels_from_scores
from .crf import CRFParams, dense_crf
from .random_walk import random_walk


def grid_size(height: int, width: int, stride: int) -> tuple[int, int]:
    """Feature-grid size of a padded conv net at this output stride: ceil(H / s) x ceil(W / s)."""
    return -(-height // stride), -(-width // stride)


def to_grid(maps: torch.Tensor, stride: int) -> torch.Tensor:
    """Average (C, H, W) maps over each stride x stride cell of the feature grid; cells that hang
    over the image's edge average only the pixels they cover (the released code zero-pads)."""
    height, width = maps.shape[-2:]
    h, w = grid_size(height, width, stride)
    pad = (0, w * stride - width, 0, h * stride - height)
    summed = F.avg_pool2d(F.pad(maps[None], pad), stride)[0]
    coverage = F.avg_pool2d(F.pad(maps.new_ones((1, 1, height, width)), pad), stride)[0]
    return summed / coverage


def to_image(maps: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """Bilinear upsampling of grid maps (C, h, w) to the image: each cell covers stride x stride
    pixels, so upsample to the padded size and crop, rather than stretch the grid onto (H, W)."""
    h, w = maps.shape[-2:]
    up = F.interpolate(maps[None], size=(h * stride, w * stride), mode="bilinear", align_corners=False)[0]
    return up[:, :height, :width]


def walk_scores(cams: np.ndarray, affinities: torch.Tensor, alpha: float, beta: float, t: int,
                radius: int, stride: int) -> torch.Tensor:
    """Revised scores (1 + K, H, W) at image resolution: background (Eq. 2) stacked on the CAMs,
    moved to the grid, walked with T^t (Eq. 12), upsampled back."""
    cams_t = torch.from_numpy(np.asarray(cams, dtype=np.float32))
    scores = torch.cat([background_map(cams_t, alpha)[None], cams_t])
    grid = to_grid(scores, stride).to(affinities.device, affinities.dtype)
    if tuple(grid.shape[-2:]) != tuple(affinities.shape[-2:]):
        raise ValueError(f"CAM grid {tuple(grid.shape[-2:])} does not match the affinity grid "
                         f"{tuple(affinities.shape[-2:])}")
    revised = random_walk(grid, affinities=affinities, radius=radius, beta=beta, t=t)
    return to_image(revised.float().cpu(), cams.shape[1], cams.shape[2], stride)


def threshold_walk_scores(cams: np.ndarray, boundary: torch.Tensor, affinities: torch.Tensor, threshold: float,
                          beta: float, t: int, radius: int, stride: int) -> torch.Tensor:
    """Revised scores (1 + K, H, W) as irn makes them (``irn.background: threshold``; irn's
    ``make_sem_seg_labels.py`` and ``indexing.propagate_to_edge``): the CAMs alone on the grid,
    times ``1 - B`` (the boundary map (h, w)), walked with T^t, upsampled, divided by their largest
    value over every class and pixel, under a constant background score ``threshold``. No class,
    or CAMs that walk to zero everywhere: background alone."""
    height, width = cams.shape[1:]
    cams_t = torch.from_numpy(np.asarray(cams, dtype=np.float32))
    background = torch.full((1, height, width), float(threshold), dtype=torch.float32)
    if cams_t.shape[0] == 0:
        return background
    grid = to_grid(cams_t, stride).to(affinities.device, affinities.dtype)
    if tuple(grid.shape[-2:]) != tuple(affinities.shape[-2:]) or tuple(boundary.shape) != tuple(grid.shape[-2:]):
        raise ValueError(f"CAM grid {tuple(grid.shape[-2:])} does not match the affinity grid "
                         f"{tuple(affinities.shape[-2:])} and the boundary map {tuple(boundary.shape)}")
    grid = grid * (1 - boundary.to(grid.device, grid.dtype))
    revised = to_image(random_walk(grid, affinities=affinities, radius=radius, beta=beta, t=t).float().cpu(),
                       height, width, stride)
    top = revised.max()
    revised = revised / top if top > 0 else torch.zeros_like(revised)
    return torch.cat([background, revised])


def refine_with_crf(image: np.ndarray, scores: torch.Tensor, crf: CRFParams) -> np.ndarray:
    """Dense CRF on the revised scores, read as per-pixel class probabilities."""
    probs = scores.clamp_min(0).numpy()
    probs = probs / np.maximum(probs.sum(axis=0, keepdims=True), 1e-8)
    return dense_crf(image, probs, **crf.as_kwargs())


REFINEMENTS = ("band", "full", "off")


def boundary_band(labels: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` pixels of a label boundary of ``labels`` (H, W), both sides: the
    pixels on either side of every change between 4-neighbours, grown by a (2 width - 1) square,
    so a band of ``width`` pixels each way."""
    edge = np.zeros(labels.shape, dtype=bool)
    vertical = labels[:-1] != labels[1:]
    horizontal = labels[:, :-1] != labels[:, 1:]
    edge[:-1] |= vertical
    edge[1:] |= vertical
    edge[:, :-1] |= horizontal
    edge[:, 1:] |= horizontal
    if width <= 1:
        return edge
    grown = F.max_pool2d(torch.from_numpy(edge)[None, None].float(), 2 * width - 1, stride=1,
                         padding=width - 1)
    return grown[0, 0].numpy() > 0


def band_width(stride: int) -> int:
    """Half a feature-grid cell, in image pixels (at least one)."""
    return max(1, stride // 2)


def band_limited(walked: np.ndarray, refined: np.ndarray, width: int) -> np.ndarray:
    """The ``band`` refinement: ``refined`` within ``width`` pixels of ``walked``'s label
    boundaries, ``walked`` elsewhere."""
    band = boundary_band(walked, width)
    return np.where(band, refined, walked).astype(walked.dtype, copy=False)


def label_maps(image: np.ndarray, cams: np.ndarray, classes: Sequence[int], affinities: torch.Tensor,
               alpha: float, beta: float, t: int, radius: int, stride: int,
               crf: CRFParams | None, threshold: float | None = None,
               boundary: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(CAM+RW label, CAM+RW+dCRF label over the whole image or None) for one image. The
    background is Eq. 2's with ``alpha``; given a ``threshold`` (and IRN's ``boundary`` map), irn's
    constant score (:func:`threshold_walk_scores`)."""
    if threshold is None:
        scores = walk_scores(cams, affinities, alpha, beta, t, radius, stride)
    elif boundary is None:
        raise ValueError("a threshold background needs the boundary map")
    else:
        scores = threshold_walk_scores(cams, boundary, affinities, threshold, beta, t, radius, stride)
    walked = labels_from_scores(scores.numpy(), classes)
    if crf is None:
        return walked, None
    return walked, labels_from_scores(refine_with_crf(image, scores, crf), classes)


def tagged_prediction(probs: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(label uint8 (H, W), its probability (H, W)) of a network's class probabilities (C, H, W)
    restricted to the background and the image's tagged object ``classes`` and renormalised over
    them: an image's labels never name a class it is not tagged with (as :func:`labels_from_scores`
    for the walk)."""
    allowed = np.asarray([0, *sorted(set(int(c) for c in classes))])
    restricted = np.asarray(probs, dtype=np.float32)[allowed]
    restricted = restricted / np.maximum(restricted.sum(0, keepdims=True), 1e-12)
    best = restricted.argmax(0)
    return allowed[best].astype(np.uint8), np.take_along_axis(restricted, best[None], 0)[0]


def network_refinement(labels: np.ndarray, network: np.ndarray, confidence: np.ndarray,
                       threshold: float) -> np.ndarray:
    """A refinement round's labels (``labels.refine``): a label method's ``labels`` (H, W) where the
    network trained on them agrees (its tagged ``network`` labels, :func:`tagged_prediction`), the
    network's label where they differ and its ``confidence`` is at least ``threshold``, and
    ignore (255) where they differ and it is less sure. The bet of self-training: a network fitted to
    every image's labels at once does not learn the errors peculiar to one image, and a pixel
    neither vouches for is better left out (whether it holds: docs/label-refinement.md)."""
    agree = network == labels
    refined = np.where(confidence >= threshold, network, IGNORE_INDEX)
    return np.where(agree, labels, refined).astype(np.uint8)


def refined_rows(walk_title: str, mode: str) -> list[tuple[str, str]]:
    """(Table 1 title, output folder) of each kind of label a walk stage writes under refinement
    ``mode``, in the order of the pipeline; the last is ``pseudo_labels``, which trains the
    segmentation network (``band`` keeps the paper's whole-image dCRF labels beside it)."""
    if mode == "off":
        return [(walk_title, "rw_labels")]
    if mode == "full":
        return [(walk_title, "rw_labels"), (f"{walk_title}+dCRF", "pseudo_labels")]
    return [(walk_title, "rw_labels"), (f"{walk_title}+dCRF", "crf_labels"), (f"{walk_title}+dCRF in band", "pseudo_labels")]


def save_refined(folders, sample_id: str, mode: str, walked: np.ndarray, refined: np.ndarray | None,
                 stride: int) -> None:
    """Write one image's walked labels and, as ``mode`` says, its refined ones into ``folders``
    (output name -> folder, those of :func:`refined_rows`)."""

    save_label_png(folders["rw_labels"] / f"{sample_id}.png", walked)
    if mode == "band":
        save_label_png(folders["crf_labels"] / f"{sample_id}.png", refined)
        refined = band_limited(walked, refined, band_width(stride))
    save_label_png(folders["pseudo_labels"] / f"{sample_id}.png", walked if mode == "off" else refined)
