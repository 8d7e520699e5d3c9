"""Random walk with semantic affinities (Section 3.3 of the paper, Eqs. 3, 11 and 12).

The affinity matrix ``W`` of an ``h x w`` feature map is ``hw x hw`` but has at most
``2K + 1`` non-zeros per row (``K = len(neighbour_offsets(radius))``, 69 for radius 5), so the
transition matrix ``T`` of Eq. (11) is built as a sparse CSR matrix and Eq. (12) is evaluated as
``t`` sparse products ``X <- T X`` with all classes as right-hand sides. This is exact (no
truncation) and costs ``O(h w t (2K + 1) C)`` time and ``O(h w (2K + 1))`` memory, where the
released code's dense ``T`` needs ``(hw)^2`` memory and ``log2(t)`` dense ``(hw)^3`` squarings.
``benchmarks/random_walk.py`` measures this against the dense formulation and against the other
candidates (stencil shifts, squaring the sparse matrix, gathers).

Layout of pairwise affinities (used by :func:`pair_affinities` and by the ``affinities=``
argument of :func:`random_walk`): a tensor ``A`` of shape ``(K, h, w)`` with
``A[k, y, x] = W`` between pixel ``(y, x)`` and pixel ``(y + dy_k, x + dx_k)``, where
``(dy_k, dx_k) = neighbour_offsets(radius)[k]``. Each unordered pair appears once; the weight of
the mirrored pair, between ``(y, x)`` and ``(y - dy_k, x - dx_k)``, is ``A[k, y - dy_k, x - dx_k]``
(``W`` is symmetric). Entries whose second pixel falls outside the grid describe no pair:
:func:`pair_affinities` writes 0 there and :func:`random_walk` ignores whatever they hold.
"""
from __future__ import annotations

import math
import numbers
import operator
import time
import warnings
from functools import lru_cache

import torch

__all__ = ["neighbour_offsets", "pair_affinities", "transition_matrix", "random_walk"]

_DISTANCES = ("mean", "sum")


def _check_int(name: str, value) -> int:
    """A positive integer (bools refused: ``True`` is not a radius)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


@lru_cache(maxsize=None)
def _offsets(radius: int) -> tuple[tuple[int, int], ...]:
    return tuple(
        (dy, dx)
        for dy in range(radius)
        for dx in range(-radius + 1, radius)
        if dy * dy + dx * dx < radius * radius and (dy > 0 or dx > 0)
    )


def neighbour_offsets(radius: int) -> list[tuple[int, int]]:
    """One-sided neighbour offsets ``(dy, dx)`` of the pair set of Eq. (4) with ``gamma = radius``.

    Returns every offset with ``dy**2 + dx**2 < radius**2`` and either ``dy > 0``, or ``dy == 0``
    and ``dx > 0``, so each unordered pair of pixels is listed once (the psa convention). Order:
    row-major, i.e. by ``dy`` ascending, then ``dx`` ascending:
    ``(0, 1), ..., (0, r-1), (1, -(r-1)), ..., (r-1, ...)``.
    ``radius=5`` gives 34 offsets (68 neighbours); ``radius=1`` gives none.
    """
    return list(_offsets(_check_int("radius", radius)))


def _span(size: int, shift: int) -> tuple[slice, slice]:
    """Slices ``src`` (indices ``i`` with ``0 <= i + shift < size``) and ``dst = src + shift``."""
    start = max(0, -shift)
    stop = max(start, min(size, size - shift))
    return slice(start, stop), slice(start + shift, stop + shift)


def _pair_distances(features: torch.Tensor, offsets, distance: str) -> torch.Tensor:
    """``(..., K, h, w)``: ``mean_d`` (or ``sum_d``) ``|f(p) - f(p + offset_k)|`` of features
    ``(..., D, h, w)``, ``+inf`` off-grid."""
    *lead, _, h, w = features.shape
    out = features.new_full((*lead, len(offsets), h, w), math.inf)
    for k, (dy, dx) in enumerate(offsets):
        ys, ys2 = _span(h, dy)
        xs, xs2 = _span(w, dx)
        # One offset at a time keeps the temporary at D*h*w instead of K*D*h*w.
        diff = (features[..., ys, xs] - features[..., ys2, xs2]).abs_()
        out[..., k, ys, xs] = diff.sum(-3) if distance == "sum" else diff.mean(-3)
    return out


def pair_distances(features: torch.Tensor, radius: int = 5, distance: str = "mean") -> torch.Tensor:
    """The distances of Eq. (3), ``W_ij = exp(-d_ij)``, for every pair within ``radius``: the one
    definition that AffinityNet's training (``affinity.feature_distances``, which adds its
    backward) and the walk's affinities (:func:`pair_affinities`) share.

    ``features`` ``(D, h, w)`` or ``(B, D, h, w)``; returns ``(K, h, w)`` or ``(B, K, h, w)``
    with ``d[k, y, x] = dist(f(y, x), f(y + dy_k, x + dx_k))`` (mean or sum of absolute
    differences over the channels, see :func:`pair_affinities`) and ``+inf`` where the second end
    is off the grid, so that its affinity is exactly 0.
    """
    if not isinstance(features, torch.Tensor) or features.dim() not in (3, 4) or not features.is_floating_point():
        raise ValueError(f"features must be a floating-point (D, h, w) or (B, D, h, w) tensor, got "
                         f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}")
    _check_distance(distance)
    return _pair_distances(features, _offsets(_check_int("radius", radius)), distance)


def _check_distance(distance: str) -> None:
    if distance not in _DISTANCES:
        raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}")


_LEADING = {"cams": "C", "features": "D", "affinities": "num_offsets"}


def _check_map(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape ({_LEADING[name]}, h, w), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def pair_affinities(
    features: torch.Tensor, radius: int = 5, distance: str = "mean"
) -> torch.Tensor:
    """Semantic affinities of Eq. (3) for every pair within ``radius``, shape ``(K, h, w)``.

    ``features`` is AffinityNet's feature map ``f^aff`` of shape ``(D, h, w)``.
    ``A[k, y, x] = exp(-dist(f(y, x), f(y + dy_k, x + dx_k)))`` with
    ``(dy_k, dx_k) = neighbour_offsets(radius)[k]``; ``dist`` is the mean absolute difference over
    the ``D`` channels for ``distance="mean"`` (as the released code computes it) or the L1 norm for
    ``distance="sum"`` (as Eq. (3) writes it). Where ``(y + dy_k, x + dx_k)`` is outside the grid
    the entry is 0. See the module docstring for the layout.
    """
    _check_map("features", features)
    _check_distance(distance)
    offsets = _offsets(_check_int("radius", radius))
    return _pair_distances(features, offsets, distance).neg_().exp_()


def _normalised_neighbours(weights: torch.Tensor, offsets):
    """Rows of ``T = D^-1 W^{o beta}`` (Eq. 11) as per-neighbour maps.

    From one-sided ``W^{o beta}`` ``(K, h, w)``, returns ``full`` (the ``2K + 1`` offsets of the
    whole disc, centre included, in row-major ``(dy, dx)`` order), ``values`` ``(2K + 1, h, w)``
    with ``values[n, y, x] = T[(y, x), (y, x) + full[n]]`` and ``valid`` (bool, same shape), false
    where ``(y, x) + full[n]`` is off the grid (``values`` is 0 there). The diagonal weight is 1
    (``W_ii = 1``, also after the Hadamard power) and the mirrored pairs come from symmetry.
    """
    num, h, w = weights.shape
    # Row-major (dy, dx) order: for in-grid neighbours the flat column index (y + dy) * w + (x + dx)
    # then increases along it, which is the column order CSR requires.
    full = [(-dy, -dx) for dy, dx in reversed(offsets)] + [(0, 0)] + list(offsets)
    values = weights.new_zeros((2 * num + 1, h, w))
    valid = torch.zeros((2 * num + 1, h, w), dtype=torch.bool, device=weights.device)
    values[num] = 1.0
    valid[num] = True
    for k, (dy, dx) in enumerate(offsets):
        ys, ys2 = _span(h, dy)
        xs, xs2 = _span(w, dx)
        values[num + 1 + k, ys, xs] = weights[k, ys, xs]
        valid[num + 1 + k, ys, xs] = True
        # W is symmetric: pixel q = p + offset sees p through -offset with the same weight.
        values[num - 1 - k, ys2, xs2] = weights[k, ys, xs]
        valid[num - 1 - k, ys2, xs2] = True
    values /= values.sum(0, keepdim=True)  # row sums D_ii >= 1 (the diagonal), never 0
    return full, values, valid


def _transition_csr(weights: torch.Tensor, offsets) -> torch.Tensor:
    """Sparse CSR ``T = D^-1 W^{o beta}`` (Eq. 11) from one-sided ``W^{o beta}`` ``(K, h, w)``;
    off-grid neighbours are not stored."""
    num, h, w = weights.shape
    device, dtype = weights.device, weights.dtype
    full, values, valid = _normalised_neighbours(weights, offsets)

    n = h * w
    nnz = int(valid.sum())
    # MKL's int32 SpMM is faster than its int64 one on CPU (benchmarks/random_walk.py compares
    # them; docs/history.md, "Speed and memory").
    index_dtype = torch.int32 if max(n, nnz) < 2**31 - 1 else torch.int64
    shifts = torch.tensor([dy * w + dx for dy, dx in full], device=device, dtype=torch.int64)
    valid = valid.reshape(2 * num + 1, n).t()
    columns = (torch.arange(n, device=device).unsqueeze(1) + shifts)[valid]
    crow = torch.zeros(n + 1, dtype=torch.int64, device=device)
    torch.cumsum(valid.sum(1), 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(
            crow.to(index_dtype),
            columns.to(index_dtype),
            values.reshape(2 * num + 1, n).t()[valid],
            (n, n),
            dtype=dtype,
            device=device,
            check_invariants=False,  # built sorted and in range above
        )


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a number, got {beta!r}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    return float(beta)


def _check_affinities(affinities, shape, device, radius) -> None:
    _check_map("affinities", affinities)
    if tuple(affinities.shape) != shape:
        raise ValueError(
            f"affinities must have shape (num_offsets, h, w) = {shape} for radius {radius} "
            f"(num_offsets = len(neighbour_offsets(radius))), got {tuple(affinities.shape)}"
        )
    if affinities.device != device:
        raise ValueError(f"affinities are on {affinities.device} but cams on {device}")


def transition_matrix(
    affinities: torch.Tensor, radius: int = 5, beta: float = 8.0
) -> torch.Tensor:
    """Transition matrix ``T = D^-1 W^{o beta}`` of Eq. (11) as a sparse CSR ``(hw, hw)`` tensor.

    ``affinities`` has the ``(K, h, w)`` layout of the module docstring; ``W_ii = 1`` and pairs
    farther than ``radius`` have ``W_ij = 0``. Rows are indexed by the row-major flat pixel index
    ``y * w + x``; every row sums to 1. Entries of ``affinities`` must be finite and >= 0.
    """
    radius = _check_int("radius", radius)
    beta = _check_beta(beta)
    offsets = _offsets(radius)
    _check_map("affinities", affinities)
    if affinities.shape[0] != len(offsets):
        raise ValueError(
            f"affinities must have {len(offsets)} offsets for radius {radius}, "
            f"got shape {tuple(affinities.shape)}"
        )
    return _transition_csr(_powered(affinities, offsets, beta), offsets)


def _powered(affinities: torch.Tensor, offsets, beta: float) -> torch.Tensor:
    """``W^{o beta}`` of the in-grid entries; off-grid entries are ignored, so masked to 0."""
    _, h, w = affinities.shape
    powered = affinities.new_zeros(affinities.shape)
    for k, (dy, dx) in enumerate(offsets):
        ys, _ = _span(h, dy)
        xs, _ = _span(w, dx)
        powered[k, ys, xs] = affinities[k, ys, xs]
    if not bool(torch.isfinite(powered).all()) or bool((powered < 0).any()):
        raise ValueError("affinities must be finite and >= 0")
    return powered.pow_(beta)


@torch.no_grad()
def random_walk(
    cams: torch.Tensor,
    features: torch.Tensor | None = None,
    radius: int = 5,
    beta: float = 8.0,
    t: int = 256,
    *,
    affinities: torch.Tensor | None = None,
    distance: str = "mean",
) -> torch.Tensor:
    """Revise class maps by random walk with semantic affinities: Eqs. (3), (11) and (12).

    ``vec(M*_c) = T^t vec(M_c)`` for every map ``c`` (Eq. 12) with ``T = D^-1 W^{o beta}`` (Eq. 11):
    the row-normalised Hadamard power of the affinity matrix ``W``, where
    ``W_ij = exp(-dist(f_i, f_j))`` (Eq. 3) for pixel pairs with ``dy^2 + dx^2 < radius^2``,
    ``W_ii = 1`` and ``W_ij = 0`` otherwise. Each output pixel is a convex combination of input
    pixels (rows of ``T`` sum to 1).

    Args:
        cams: ``(C, h, w)`` float tensor, the class maps (background included) at the feature
            map's resolution.
        features: ``(D, h, w)`` AffinityNet feature map ``f^aff``. Give either this or
            ``affinities``.
        radius: ``gamma`` of Eq. (4); pairs with ``dy^2 + dx^2 < radius^2`` are connected.
        beta: exponent of the Hadamard power in Eq. (11), > 0.
        t: number of propagation steps in Eq. (12), any integer >= 1.
        affinities: precomputed ``W``, ``(K, h, w)`` with ``K = len(neighbour_offsets(radius))``,
            laid out as in the module docstring (finite, >= 0; off-grid entries ignored).
        distance: ``"mean"`` (mean absolute channel difference, the released code) or ``"sum"``
            (the L1 norm of Eq. 3); used only with ``features``.

    Returns:
        ``(C, h, w)`` tensor of the revised maps, on the inputs' device, in the dtype that
        ``cams`` and ``features``/``affinities`` promote to (float16/bfloat16 are computed in
        float32 and cast back). Not differentiable (runs under ``torch.no_grad``); the paper
        uses it only to synthesise labels.

    Raises:
        ValueError: mismatched shapes or devices, ``t < 1``, ``beta <= 0``, ``radius < 1``,
            negative or non-finite affinities, or not exactly one of ``features``/``affinities``.
        TypeError: non-tensor maps, or a non-integer ``t``/``radius``.
    """
    _check_map("cams", cams)
    radius = _check_int("radius", radius)
    beta = _check_beta(beta)
    t = _check_int("t", t)
    _check_distance(distance)
    if (features is None) == (affinities is None):
        raise ValueError("give exactly one of features and affinities")

    num_maps, h, w = cams.shape
    offsets = _offsets(radius)
    if features is not None:
        _check_map("features", features)
        if tuple(features.shape[1:]) != (h, w):
            raise ValueError(
                f"features (D, h, w) = {tuple(features.shape)} and cams (C, h, w) = "
                f"{tuple(cams.shape)} must share h and w"
            )
        if features.device != cams.device:
            raise ValueError(f"features are on {features.device} but cams on {cams.device}")
    else:
        _check_affinities(affinities, (len(offsets), h, w), cams.device, radius)
    source = features if features is not None else affinities
    out_dtype = torch.promote_types(cams.dtype, source.dtype)
    # Sparse kernels exist for float32/float64 only.
    dtype = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32

    if features is not None:
        # W^beta = exp(-beta * dist): one exp, and no underflow of W before the power.
        weights = _pair_distances(features.to(dtype), offsets, distance).mul_(-beta).exp_()
    else:
        weights = _powered(affinities.to(dtype), offsets, beta)

    transition = _transition_csr(weights, offsets)
    # Pixels as rows, maps as columns: each stored entry of T then scales a contiguous row of C
    # values, and one sparse product moves every class at once.
    state = cams.to(dtype).reshape(num_maps, h * w).t()
    # Zero columns up to a multiple of 4, which MKL's product handles in whole vector registers
    # and so walks faster than the maps alone (docs/performance.md, "The random walk against the
    # released code's dense walk"). The zero maps stay zero and are dropped.
    state = torch.nn.functional.pad(state, (0, -num_maps % 4)).contiguous()
    state = _propagate(transition, state, t)
    return state[:, :num_maps].t().reshape(num_maps, h, w).to(out_dtype).contiguous()


# Products timed per thread setting and round, and rounds, before the walk settles on one setting:
# under load a single product's time is mostly the scheduler's, so the probe takes 64 of them.
PROBE_STEPS, PROBE_ROUNDS = 8, 4


def _propagate(transition: torch.Tensor, state: torch.Tensor, t: int) -> torch.Tensor:
    """``T^t state`` by ``t`` sparse products, on the CPU with the thread count that its first
    products ran fastest with: the process's, or one.

    Each product is small (a fraction of a millisecond at 63x47), so with several threads each
    waits for the others at its end; when another job keeps a core busy, every such wait becomes
    a scheduler time slice, and one thread is the faster (``python -m benchmarks.random_walk
    --load`` measures both, alone and beside a CPU-bound process; docs/performance.md). The
    thread count changes neither the products nor their order within a row."""
    threads = torch.get_num_threads()
    probed = 2 * PROBE_STEPS * PROBE_ROUNDS
    if state.device.type != "cpu" or threads == 1 or t < 2 * probed:
        for _ in range(t):
            state = transition @ state
        return state
    seconds = {threads: 0.0, 1: 0.0}
    try:
        for _ in range(PROBE_ROUNDS):   # interleaved: a swing in load hits both settings
            for count in seconds:
                torch.set_num_threads(count)
                started = time.perf_counter()
                for _ in range(PROBE_STEPS):
                    state = transition @ state
                seconds[count] += time.perf_counter() - started
        torch.set_num_threads(min(seconds, key=seconds.get))
        for _ in range(t - probed):
            state = transition @ state
    finally:
        torch.set_num_threads(threads)
    return state
