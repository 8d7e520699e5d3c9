"""AffinityNet (Ahn & Kwak, CVPR 2018, Section 3.2 and 4.2): confident regions from CAMs, affinity
labels for pairs of nearby feature-grid coordinates, the class-balanced affinity loss, and the
network that predicts the affinity feature map f_aff.

Pair layout used throughout
---------------------------
The pair set P of Eq. 4 holds every unordered pair of grid coordinates closer than the radius
gamma. Each unordered pair is stored once, at its "from" end p, under a one-sided offset
k = (dy, dx) from :func:`affinitynet.ops.random_walk.neighbour_offsets` (dy >= 0, and dx > 0 when
dy == 0; 34 offsets for radius 5, i.e. 68 neighbours). Every per-pair tensor therefore has shape
(num_offsets, h, w), or (B, num_offsets, h, w) batched, with entry [k, y, x] describing the pair
((y, x), (y + dy, x + dx)). Entries whose second end lies outside the grid are not pairs: their
masks are False, their distances +inf and their affinities 0.

Label conventions: 0 background, 1..K object classes, 255 neutral (ignored).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..files import IGNORE_INDEX
from ..ops.background import background_map, with_background
from ..ops.crf import IRN_GT_PROB, IRN_LABEL_CRF, CRFParams, dense_crf, dense_crf_labels
from ..ops.random_walk import neighbour_offsets, pair_distances

__all__ = ["NEUTRAL", "AffinityNet", "affinity_loss", "affinity_loss_from_distances",
           "boundary_image", "boundary_map", "confident_regions",
           "downsample_labels", "feature_affinities", "feature_distances", "num_offsets",
           "pair_labels", "threshold_confident_regions"]

# The neutral region of 3.2.1: no affinity label is drawn from it.
NEUTRAL = IGNORE_INDEX
DISTANCES = ("mean", "sum")


# --------------------------------------------------------------------------------------------
# Offsets

@lru_cache(maxsize=None)
def _offsets(radius: int) -> tuple[tuple[int, int], ...]:
    # Imported lazily: random_walk is a sibling module that may itself import from here, and the
    # one offset definition must be shared so training and inference see the same pairs.

    offsets = tuple((int(dy), int(dx)) for dy, dx in neighbour_offsets(radius))
    if not offsets:
        raise ValueError(f"radius {radius} gives no pairs (need radius > 1)")
    return offsets


def num_offsets(radius: int) -> int:
    """Number of one-sided offsets (stored pairs per pixel) for ``radius``: 34 for radius 5."""
    return len(_offsets(radius))


# --------------------------------------------------------------------------------------------
# Background and confident regions (Section 3.1, Eq. 2; Section 3.2.1)

def confident_regions(image: np.ndarray, cams, classes: Sequence[int], alpha_low: float,
                      alpha_high: float, crf_params: CRFParams | Mapping[str, Any] | None = None
                      ) -> np.ndarray:
    """Label map of confident object, confident background and neutral areas (Section 3.2.1).

    ``image``: (H, W, 3) uint8 RGB; ``cams``: (K, H, W) normalised CAMs of the K present classes at
    image resolution; ``classes``: their class indices (1..num_classes), in the order of ``cams``.

    Two score stacks ``[M_bg(alpha), M_1, ..., M_K]`` are built with Eq. 2, one with the small
    ``alpha_low`` (background amplified) and one with the large ``alpha_high`` (background
    weakened), and each is refined by the dense CRF. Then, as in the authors' released code:

    1. where the low-alpha CRF argmax is an object, the pixel takes that object's class (it beats
       even the amplified background: a confident object);
    2. where the low-alpha argmax is background, the pixel is neutral (255);
    3. where the high-alpha CRF argmax is background, the pixel is background (0): background beats
       every object even when weakened. This is applied last, so it wins over step 1 in the rare
       pixels where the two CRFs disagree that way.

    An image with no present class (K == 0) has nothing that could contradict background, so every
    pixel is confident background (0), not neutral.

    Returns a uint8 (H, W) map with values in {0, 255} and ``classes``.
    """
    image, cams, classes = _checked(image, cams, classes)
    height, width = cams.shape[1:]
    if cams.shape[0] == 0:
        return np.zeros((height, width), dtype=np.uint8)

    if not isinstance(crf_params, CRFParams):
        crf_params = CRFParams.from_config(crf_params)
    kwargs = crf_params.as_kwargs()

    def refined_argmax(alpha: float) -> np.ndarray:
        stack = np.concatenate([background_map(cams, alpha)[None], cams], axis=0)
        return dense_crf(image, stack, **kwargs).argmax(axis=0)

    low = refined_argmax(alpha_low)
    high = refined_argmax(alpha_high)
    # Index 0 of the stack is background; index i >= 1 is classes[i - 1].
    lookup = np.concatenate([[NEUTRAL], classes]).astype(np.uint8)
    labels = lookup[low]
    labels[high == 0] = 0
    return labels


def _checked(image, cams, classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, cams float32 (K, H, W), classes int64 (K,)), or ValueError."""
    image = np.asarray(image)
    cams = cams.detach().cpu().numpy() if isinstance(cams, torch.Tensor) else np.asarray(cams)
    cams = cams.astype(np.float32, copy=False)
    if cams.ndim != 3 or cams.shape[1:] != image.shape[:2]:
        raise ValueError(f"cams must be (K, H, W) with (H, W) = {image.shape[:2]}, got {cams.shape}")
    classes = np.asarray(list(classes), dtype=np.int64)
    if classes.shape != (cams.shape[0],):
        raise ValueError(f"{len(classes)} class indices for {cams.shape[0]} CAMs")
    if np.any((classes < 1) | (classes >= NEUTRAL)):
        raise ValueError(f"class indices must be in 1..254, got {classes.tolist()}")
    return image, cams, classes


def threshold_confident_regions(image: np.ndarray, cams, classes: Sequence[int], fg_threshold: float,
                                bg_threshold: float, crf_params: CRFParams = IRN_LABEL_CRF,
                                gt_prob: float = IRN_GT_PROB) -> np.ndarray:
    """Confident regions as irn makes them (``affinity.confidence: threshold``; irn's
    ``cam_to_ir_label.py``): constant background scores instead of Eq. 2's power.

    1. the argmax of ``[fg_threshold, M_1, ..., M_K]`` (an object where its CAM beats 0.30),
       refined as a label map by irn's dCRF (``crf.dense_crf_labels``): the foreground labels;
    2. the same with ``bg_threshold`` (0.05): the background labels;
    3. a pixel takes its foreground label where that is an object, is neutral (255) where it is
       background, and is background (0) where both are background.

    Same arguments and result as :func:`confident_regions`; no class present: all background."""
    image, cams, classes = _checked(image, cams, classes)
    if cams.shape[0] == 0:
        return np.zeros(cams.shape[1:], dtype=np.uint8)
    lookup = np.concatenate([[0], classes]).astype(np.uint8)

    def refined(threshold: float) -> np.ndarray:
        labels = np.argmax(with_background(cams, threshold=threshold), axis=0)
        return lookup[dense_crf_labels(image, labels, len(lookup), gt_prob, crf_params)]

    foreground, background = refined(fg_threshold), refined(bg_threshold)
    labels = foreground.copy()
    labels[foreground == 0] = NEUTRAL
    labels[(foreground == 0) & (background == 0)] = 0
    return labels


# --------------------------------------------------------------------------------------------
# Labels on the feature grid

def downsample_labels(label_map, *, stride: int | None = None,
                      grid: tuple[int, int] | None = None):
    """Nearest-neighbour sampling of an image-resolution label map (H, W) or (B, H, W) onto the
    feature grid, returning the same kind (numpy or torch) and dtype.

    Give exactly one of:

    - ``stride``: the grid is (ceil(H / stride), ceil(W / stride)), the size a padded conv net of
      that output stride produces, and cell i takes the label of pixel ``stride * i + stride // 2``
      (clamped to the image), the centre of its stride cell. That is the position bilinear
      upsampling with ``align_corners=False`` (used to bring CAMs and random-walk results back to
      image size) assigns to cell i, so labels and upsampled maps agree on where a cell is. (The
      receptive-field centre of a padded strided conv stack sits at ``stride * i``, half a cell
      earlier; the network absorbs that constant shift during training.)
    - ``grid``: (h, w) explicitly; cell i takes pixel ``floor((i + 0.5) * H / h)``, which is what
      the released code's nearest-neighbour ``resize`` of the label image to 1/8 does and equals
      the ``stride`` rule when H is a multiple of the stride.

    No averaging or voting is done, so a cell never gets a label none of its pixels has, and
    neutral (255) pixels stay neutral.
    """
    if (stride is None) == (grid is None):
        raise ValueError("give exactly one of stride= and grid=")
    is_numpy = not isinstance(label_map, torch.Tensor)
    labels = torch.from_numpy(np.ascontiguousarray(label_map)) if is_numpy else label_map
    if labels.ndim not in (2, 3):
        raise ValueError(f"label_map must be (H, W) or (B, H, W), got {tuple(labels.shape)}")
    height, width = labels.shape[-2:]
    device = labels.device
    if stride is not None:
        stride = int(stride)
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        h, w = -(-height // stride), -(-width // stride)
        rows = (torch.arange(h, device=device) * stride + stride // 2).clamp_(max=height - 1)
        cols = (torch.arange(w, device=device) * stride + stride // 2).clamp_(max=width - 1)
    else:
        h, w = int(grid[0]), int(grid[1])
        if h < 1 or w < 1:
            raise ValueError(f"grid must be positive, got {grid}")
        # Integer arithmetic keeps floor((i + 0.5) * H / h) exact: floor((2i + 1) H / 2h).
        rows = ((2 * torch.arange(h, device=device) + 1) * height) // (2 * h)
        cols = ((2 * torch.arange(w, device=device) + 1) * width) // (2 * w)
    out = labels.index_select(-2, rows).index_select(-1, cols)
    return out.numpy() if is_numpy else out


def _as_label_tensor(label_map, device) -> torch.Tensor:
    if isinstance(label_map, torch.Tensor):
        labels = label_map
    else:
        labels = torch.from_numpy(np.ascontiguousarray(label_map))
    if device is not None:
        labels = labels.to(device)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"label_map must hold integer labels, got dtype {labels.dtype}")
    # int16 holds 0..255 and the pad value without the wrap-around uint8 arithmetic would risk.
    return labels.to(torch.int16)


def pair_labels(label_map, radius: int, *, device: torch.device | str | None = None
                ) -> dict[str, torch.Tensor]:
    """Affinity labels of Eq. 4-6 for every pair within ``radius`` on a feature-grid label map.

    ``label_map``: (h, w) or (B, h, w) integer labels (numpy or torch; 0 background, 1..K
    objects, 255 neutral). Returns boolean masks, each (num_offsets, h, w) or
    (B, num_offsets, h, w) in the layout of the module docstring:

    - ``pos_fg``: both ends the same object class (P+_fg),
    - ``pos_bg``: both ends background (P+_bg),
    - ``neg``:    both ends labelled, classes differ (P-),

    A pair with a neutral end, or whose second end lies outside the grid, is in none of them.
    Fully vectorised: one gather of the padded map for all offsets, on the map's device.
    """
    labels = _as_label_tensor(label_map, device)
    batched = labels.ndim == 3
    if not batched:
        labels = labels[None]
    if labels.ndim != 3:
        raise ValueError(f"label_map must be (h, w) or (B, h, w), got {tuple(label_map.shape)}")
    batch, h, w = labels.shape
    offsets = _offsets(radius)
    down = max(dy for dy, _ in offsets)
    side = max(abs(dx) for _, dx in offsets)
    # Padding with the neutral value makes every out-of-grid second end an ignored pair, so no
    # bounds test is needed after the gather.
    padded = F.pad(labels, (side, side, 0, down), value=NEUTRAL)
    padded_w = w + 2 * side
    dev = labels.device
    delta = torch.tensor([dy * padded_w + dx for dy, dx in offsets], device=dev)
    base = (torch.arange(h, device=dev)[:, None] * padded_w
            + torch.arange(w, device=dev)[None, :] + side)
    index = (delta[:, None, None] + base[None]).reshape(-1)
    to = padded.reshape(batch, -1).index_select(1, index).view(batch, len(offsets), h, w)
    frm = labels[:, None]
    labelled = (frm != NEUTRAL) & (to != NEUTRAL)
    same = frm == to
    result = {
        "pos_fg": labelled & same & (frm != 0),
        "pos_bg": labelled & same & (frm == 0),
        "neg": labelled & ~same,
    }
    if not batched:
        result = {key: value[0] for key, value in result.items()}
    return result


# --------------------------------------------------------------------------------------------
# Distances, affinities (Eq. 3) and boundaries

def _offset_views(h: int, w: int, radius: int):
    """For each offset: the (rows, cols) slices of the "from" and "to" views of a (.., h, w) map
    that hold its in-grid pairs; ``(None, None)`` when the offset leaves the grid entirely."""
    for dy, dx in _offsets(radius):
        x0, x1 = max(0, -dx), min(w, w - dx)
        if dy >= h or x1 <= x0:
            yield None, None
            continue
        yield (slice(0, h - dy), slice(x0, x1)), (slice(dy, h), slice(x0 + dx, x1 + dx))


# On the CPU, a temporary larger than glibc's mmap threshold (32 MiB at most) is mapped afresh
# and page-faulted in on every allocation; at batch 8 x 896 x 56 x 56 that fault traffic made the
# per-image cost many times that of batch 1 (python -m benchmarks.affinity_pairs measures it).
# Working through the batch in slices whose temporaries stay below it restores batch-independent cost. GPUs (caching allocator) take the whole batch at once.
_CPU_CHUNK_BYTES = 16 * 2 ** 20


def _batch_slices(features: torch.Tensor) -> list[slice]:
    batch = features.shape[0]
    if features.device.type != "cpu" or batch <= 1:
        return [slice(0, batch)]
    per_image = max(1, features[0].numel() * features.element_size())
    step = max(1, _CPU_CHUNK_BYTES // per_image)
    return [slice(i, min(batch, i + step)) for i in range(0, batch, step)]


class _PairL1(torch.autograd.Function):
    """L1 distances (B, num_offsets, h, w) between each pixel and its one-sided neighbours.

    Written as an autograd Function because the plain expression keeps one (B, D, h, w) |f_p - f_q|
    per offset alive for backward: 34 of them, about 3 GB for a batch of 8 at 56x56x896 in float32.
    Here backward recomputes sign(f_p - f_q) offset by offset from the saved features instead.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, radius: int, mean: bool) -> torch.Tensor:
        distance = "mean" if mean else "sum"
        out = torch.cat([pair_distances(features[part], radius, distance) for part in _batch_slices(features)])
        ctx.save_for_backward(features)
        ctx.radius, ctx.mean = radius, mean
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (features,) = ctx.saved_tensors
        batch, depth, h, w = features.shape
        grad = torch.zeros_like(features)
        scale = 1.0 / depth if ctx.mean else 1.0
        views = list(_offset_views(h, w, ctx.radius))
        for part in _batch_slices(features):
            f, g_in, g_out = features[part], grad[part], grad_out[part]
            for k, (frm, to) in enumerate(views):
                if frm is None:
                    continue
                # d|a - b|/da = sign(a - b) = -d|a - b|/db; sign(0) = 0 as in torch's abs.
                g = (f[:, :, frm[0], frm[1]] - f[:, :, to[0], to[1]]).sign_()
                g.mul_(g_out[:, k:k + 1, frm[0], frm[1]] * scale)
                g_in[:, :, frm[0], frm[1]] += g
                g_in[:, :, to[0], to[1]] -= g
        return grad, None, None


def feature_distances(features: torch.Tensor, radius: int, distance: str = "mean") -> torch.Tensor:
    """Per-pair L1 feature distances ``d_ij`` with ``W_ij = exp(-d_ij)`` (Eq. 3).

    ``features``: (B, D, h, w) or (D, h, w). ``distance="sum"`` is the L1 norm the paper writes;
    ``"mean"`` divides it by D, as the authors' released code does (it keeps affinities of a
    896-channel feature map away from exp(-hundreds) at initialisation). Returns
    (B, num_offsets, h, w) (or (num_offsets, h, w)) with +inf where the second end is outside the
    grid, so that the matching affinity is exactly 0. Differentiable (no gradient flows through
    the off-grid entries, which are constants); backward memory is one copy of ``features``.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    batched = features.ndim == 4
    if not batched:
        features = features[None]
    if features.ndim != 4:
        raise ValueError(f"features must be (B, D, h, w) or (D, h, w), got {tuple(features.shape)}")
    out = _PairL1.apply(features, int(radius), distance == "mean")
    return out if batched else out[0]


def feature_affinities(features: torch.Tensor, radius: int, distance: str = "mean") -> torch.Tensor:
    """Semantic affinities ``W_ij = exp(-||f_i - f_j||_1)`` of Eq. 3 (see :func:`feature_distances`
    for ``distance``), in (0, 1] for in-grid pairs and 0 where the second end is off the grid."""
    return torch.exp(-feature_distances(features, radius, distance))


def boundary_map(features: torch.Tensor, radius: int, distance: str = "mean") -> torch.Tensor:
    """``1 - mean affinity`` of each coordinate to its in-grid neighbours within ``radius`` (both
    directions: up to 2 * num_offsets of them), from ``features`` (D, h, w); (h, w) in [0, 1).

    High where AffinityNet separates a coordinate from its surroundings: the class boundaries
    visualised in the paper's Fig. 5(d).
    """
    if features.ndim != 3:
        raise ValueError(f"features must be (D, h, w), got {tuple(features.shape)}")
    with torch.no_grad():
        forward = feature_distances(features, radius, distance)
        # Rotating the grid by 180 degrees turns each pair (p, p - k) into (p', p' + k), so the
        # same one-sided computation yields the "backward" half; rotating back aligns it with p.
        backward = feature_distances(features.flip(-2, -1), radius, distance).flip(-2, -1)
        both = torch.cat([forward, backward], dim=0)
        inside = torch.isfinite(both)
        total = torch.exp(-both).sum(dim=0)
        count = inside.sum(dim=0).clamp_(min=1)
        return 1.0 - total / count


def boundary_image(boundaries, normalise: bool = True) -> np.ndarray:
    """Grey uint8 image (h, w) of a :func:`boundary_map`: brighter means a stronger boundary.
    ``normalise`` stretches the map's maximum to 255 (affinities of a trained network are often
    close to 1, leaving the raw map almost black); otherwise 1.0 maps to 255."""
    values = boundaries.detach().cpu().float().numpy() if isinstance(boundaries, torch.Tensor) \
        else np.asarray(boundaries, dtype=np.float32)
    values = np.clip(np.nan_to_num(values, nan=0.0), 0.0, None)
    if normalise:
        peak = float(values.max()) if values.size else 0.0
        values = values / peak if peak > 0 else values
    return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Loss (Eq. 7-10)

def _subset_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.where (not values * mask) so that inf/large values outside the subset, such as the
    # off-grid distances, never reach the sum or its gradient; an empty subset gives 0 / 1 = 0.
    mask = mask.to(torch.bool)
    count = mask.sum()
    total = torch.where(mask, values, values.new_zeros(())).sum()
    return total / count.clamp(min=1).to(values.dtype), count


def affinity_loss_from_distances(distances: torch.Tensor, pos_fg: torch.Tensor,
                                 pos_bg: torch.Tensor, neg: torch.Tensor, *, eps: float = 1e-5
                                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of Eq. 10, ``L = L+_fg + L+_bg + 2 L-``, from distances ``d`` with ``W = exp(-d)``.

    This is the numerically preferred form: ``-log W = d`` exactly (Eq. 7, 8), and
    ``log(1 - W) = log(-expm1(-d))`` (Eq. 9) stays accurate as W approaches 1, where ``1 - W`` in
    floating point would round to 0. ``1 - W`` is clamped below at ``eps`` so that a negative pair
    with (near-)identical features costs at most ``-log(eps)`` and has a finite gradient.

    Each term is averaged over its own subset, pooled over the whole batch (Eq. 7-9); an empty
    subset contributes 0. Masks are booleans shaped like ``distances``, e.g. from
    :func:`pair_labels`. (The released code's ``L+_bg/4 + L+_fg/4 + L-/2`` is this loss / 4.)

    Returns ``(loss, parts)``; ``parts`` holds the detached terms ``pos_fg``, ``pos_bg``, ``neg``
    and the subset sizes ``num_pos_fg``, ``num_pos_bg``, ``num_neg``.
    """
    pos_fg_loss, n_fg = _subset_mean(distances, pos_fg)
    pos_bg_loss, n_bg = _subset_mean(distances, pos_bg)
    one_minus_w = (-torch.expm1(-distances)).clamp(min=eps)
    neg_loss, n_neg = _subset_mean(-torch.log(one_minus_w), neg)
    return _combine(pos_fg_loss, pos_bg_loss, neg_loss, n_fg, n_bg, n_neg)


def affinity_loss(affinities: torch.Tensor, pos_fg: torch.Tensor, pos_bg: torch.Tensor,
                  neg: torch.Tensor, *, eps: float = 1e-5
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of Eq. 10, ``L = L+_fg + L+_bg + 2 L-`` (Eq. 7-9), from affinities W in [0, 1].

    ``W`` and ``1 - W`` are clamped below at ``eps`` before the logarithm, so values and gradients
    stay finite for W = 0 (off-grid entries, hopeless positives) and W = 1. Prefer
    :func:`affinity_loss_from_distances` when the distances are at hand (as with
    :meth:`AffinityNet.distances`): it needs no clamp for positives and is exact near W = 1.
    Averaging, empty subsets and ``parts`` as there.
    """
    pos_values = -torch.log(affinities.clamp(min=eps))
    pos_fg_loss, n_fg = _subset_mean(pos_values, pos_fg)
    pos_bg_loss, n_bg = _subset_mean(pos_values, pos_bg)
    neg_loss, n_neg = _subset_mean(-torch.log((1.0 - affinities).clamp(min=eps)), neg)
    return _combine(pos_fg_loss, pos_bg_loss, neg_loss, n_fg, n_bg, n_neg)


def _combine(pos_fg, pos_bg, neg, n_fg, n_bg, n_neg):
    loss = pos_fg + pos_bg + 2.0 * neg
    parts = {"pos_fg": pos_fg.detach(), "pos_bg": pos_bg.detach(), "neg": neg.detach(),
             "num_pos_fg": n_fg, "num_pos_bg": n_bg, "num_neg": n_neg}
    return loss, parts


# --------------------------------------------------------------------------------------------
# Network (Fig. 3, Section 4.2)

_ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU}


class AffinityNet(nn.Module):
    """Backbone + f_aff head of Fig. 3 / Section 4.2.

    The last three backbone levels each go through a 1x1 conv (``channels``, the paper's
    128/256/512; the released code used 64/128/256) and an activation, are resized to the deepest
    level's grid (bilinear, only if sizes differ: with a dilated stride-8 backbone they do not),
    concatenated (896 channels) and adapted by one more 1x1 conv (``out_channels``, default the
    concatenated width) and activation, giving f_aff.

    ``grid_stride``: the stride of f_aff's grid, on which the pairs of Eq. 4 and the walk's
    transition matrix live; by default the backbone's output stride. A backbone run at a coarser
    stride (16 for a grid of 8) has its deeper levels upsampled to the grid, as irn's edge branch
    upsamples its stride-16 levels to stride 4: a quarter of the FLOPs past stride 8, while the
    radius gamma keeps counting cells of the walk's grid. Training and the walk then see the same
    function, unlike a network trained coarse and dilated for inference.

    ``activation`` is ELU by default, as in the released code: unlike ReLU it has no dead
    units and keeps negative values, so every channel of f_aff can contribute to the L1 distances
    of Eq. 3 and receive gradient from them.

    ``backbone`` is a module with the :mod:`affinitynet.models.backbones` interface (``forward`` returns
    per-level maps shallow to deep; ``out_channels``).
    """

    def __init__(self, backbone: nn.Module, *, channels: Sequence[int] = (128, 256, 512),
                 out_channels: int | None = None, activation: str = "elu", radius: int = 5,
                 distance: str = "mean", grid_stride: int | None = None):
        super().__init__()
        levels = tuple(int(c) for c in backbone.out_channels)
        channels = tuple(int(c) for c in channels)
        if len(levels) < 3:
            raise ValueError(f"AffinityNet needs a backbone with >= 3 levels, got {len(levels)}")
        if len(channels) != 3:
            raise ValueError(f"channels must give 3 widths (one per level), got {channels}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        backbone_stride = int(getattr(backbone, "output_stride", 8))
        grid_stride = backbone_stride if grid_stride is None else int(grid_stride)
        if grid_stride > backbone_stride or backbone_stride % grid_stride:
            raise ValueError(f"grid_stride must divide the backbone's output stride {backbone_stride}, "
                             f"got {grid_stride}")
        self.backbone = backbone
        self.grid_stride, self.backbone_stride = grid_stride, backbone_stride
        self.radius = int(radius)
        self.distance = distance
        self.reducers = nn.ModuleList(nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
                                      for c_in, c_out in zip(levels[-3:], channels))
        self.out_channels = int(out_channels) if out_channels is not None else sum(channels)
        self.adapt = nn.Conv2d(sum(channels), self.out_channels, kernel_size=1, bias=False)
        self.act = _ACTIVATIONS[activation]()
        for conv in self.reducers:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.xavier_uniform_(self.adapt.weight)

    @property
    def output_stride(self) -> int:
        """The stride of f_aff's grid (``grid_stride``)."""
        return self.grid_stride

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """f_aff for images ``x`` (B, 3, H, W): (B, out_channels, h, w) on the deepest level's grid,
        or, for a coarser backbone, on the grid (ceil(H / s), ceil(W / s)) of ``grid_stride`` s
        that a padded conv net of that stride gives."""
        levels = list(self.backbone(x))[-3:]
        stride = self.grid_stride
        size = levels[-1].shape[-2:] if stride == self.backbone_stride else (-(-x.shape[-2] // stride),
                                                                              -(-x.shape[-1] // stride))
        reduced = []
        for conv, level in zip(self.reducers, levels):
            y = self.act(conv(level))
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            reduced.append(y)
        return self.act(self.adapt(torch.cat(reduced, dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def distances(self, feats: torch.Tensor, radius: int | None = None,
                  distance: str | None = None) -> torch.Tensor:
        """Pair distances (B, num_offsets, h, w) of f_aff, for :func:`affinity_loss_from_distances`."""
        return feature_distances(feats, self.radius if radius is None else radius,
                                 self.distance if distance is None else distance)

    def affinities(self, feats: torch.Tensor, radius: int | None = None,
                   distance: str | None = None) -> torch.Tensor:
        """Affinities ``W_ij = exp(-d(f_i, f_j))`` of Eq. 3, (B, num_offsets, h, w)."""
        return torch.exp(-self.distances(feats, radius, distance))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters of the layers added on top of the backbone (trained with a 10x learning rate)."""
        backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone]
