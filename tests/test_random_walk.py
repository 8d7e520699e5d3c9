"""Tests of the sparse random walk (Eqs. 3, 11, 12) against a dense reference built from the
equations, pixel pair by pixel pair."""
import math

import pytest
import torch

from affinitynet.ops.random_walk import (
    neighbour_offsets,
    pair_affinities,
    random_walk,
    transition_matrix,
)

F64 = torch.float64


# --- dense reference: obviously correct, slow, straight from the equations -------------------

def _coords(h, w):
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ys.reshape(-1), xs.reshape(-1)  # flat index i = y * w + x


def _dense_connected(h, w, radius):
    ys, xs = _coords(h, w)
    d2 = (ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2
    return d2 < radius**2  # includes i == j (d2 = 0)


def dense_affinity_from_features(features, radius, distance="mean"):
    """Eq. (3): W_ij = exp(-dist(f_i, f_j)) within the radius, W_ii = 1, 0 elsewhere."""
    d = features.shape[0]
    flat = features.reshape(d, -1).t().to(F64)
    l1 = torch.cdist(flat, flat, p=1)
    dist = l1 / d if distance == "mean" else l1
    conn = _dense_connected(*features.shape[1:], radius)
    W = torch.where(conn, torch.exp(-dist), torch.zeros((), dtype=F64))
    W.fill_diagonal_(1.0)
    return W


def dense_affinity_from_pairs(A, radius, h, w):
    """W from the documented (K, h, w) layout, filling the mirrored pair by symmetry."""
    W = torch.eye(h * w, dtype=F64)
    for k, (dy, dx) in enumerate(neighbour_offsets(radius)):
        for y in range(h):
            for x in range(w):
                y2, x2 = y + dy, x + dx
                if 0 <= y2 < h and 0 <= x2 < w:
                    i, j = y * w + x, y2 * w + x2
                    W[i, j] = W[j, i] = float(A[k, y, x])
    return W


def dense_random_walk(cams, W, beta, t):
    """Eq. (11) T = D^-1 W^(o beta) (row-normalised), Eq. (12) vec(M*) = T^t vec(M)."""
    Wb = W**beta
    T = Wb / Wb.sum(1, keepdim=True)
    Tt = torch.linalg.matrix_power(T, t)
    c, h, w = cams.shape
    return (Tt @ cams.reshape(c, h * w).t().to(F64)).t().reshape(c, h, w)


def assert_rel_close(actual, expected, rel=1e-6):
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.to(F64), expected, rtol=rel, atol=rel * scale)


def _inputs(c, d, h, w, seed=0, dtype=F64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    cams = torch.rand(c, h, w, generator=g, dtype=dtype)
    feats = scale * torch.randn(d, h, w, generator=g, dtype=dtype)
    return cams, feats


# --- neighbour_offsets ---------------------------------------------------------------------

def test_offsets_radius5_psa_convention():
    offs = neighbour_offsets(5)
    assert len(offs) == 34
    assert offs[:5] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, -4)]
    assert offs[-1] == (4, 2)
    assert offs == sorted(offs)  # row-major order
    brute = {(dy, dx) for dy in range(-6, 7) for dx in range(-6, 7)
             if 0 < dy * dy + dx * dx < 25}
    assert len(brute) == 68
    assert set(offs) | {(-a, -b) for a, b in offs} == brute
    assert all(dy > 0 or (dy == 0 and dx > 0) for dy, dx in offs)


def test_offsets_small_radii():
    assert neighbour_offsets(1) == []
    assert neighbour_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    assert [len(neighbour_offsets(r)) for r in range(1, 6)] == [0, 4, 12, 22, 34]


@pytest.mark.parametrize("bad", [0, -3])
def test_offsets_bad_radius(bad):
    with pytest.raises(ValueError, match="radius"):
        neighbour_offsets(bad)


@pytest.mark.parametrize("bad", [2.5, True, "5"])
def test_offsets_non_integer_radius(bad):
    with pytest.raises(TypeError, match="radius"):
        neighbour_offsets(bad)


# --- pair_affinities -----------------------------------------------------------------------

@pytest.mark.parametrize("distance", ["mean", "sum"])
def test_pair_affinities_layout(distance):
    _, feats = _inputs(1, 6, 7, 9, seed=1)
    A = pair_affinities(feats, radius=4, distance=distance)
    offs = neighbour_offsets(4)
    assert A.shape == (len(offs), 7, 9)
    for k, (dy, dx) in enumerate(offs):
        for y in range(7):
            for x in range(9):
                y2, x2 = y + dy, x + dx
                if 0 <= y2 < 7 and 0 <= x2 < 9:
                    diff = (feats[:, y, x] - feats[:, y2, x2]).abs()
                    dist = diff.mean() if distance == "mean" else diff.sum()
                    assert math.isclose(float(A[k, y, x]), math.exp(-float(dist)), rel_tol=1e-12)
                else:
                    assert A[k, y, x] == 0  # off-grid partner: documented 0


@pytest.mark.parametrize("distance", ["mean", "sum"])
def test_pair_affinities_is_differentiable(distance):
    """AffinityNet's training loss goes through these affinities."""
    feats = torch.randn(3, 4, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: pair_affinities(f, 3, distance), (feats,))


# --- exactness against the dense formulation -----------------------------------------------

@pytest.mark.parametrize("t", [1, 3, 8, 100, 256])
def test_matches_dense_various_t(t):
    cams, feats = _inputs(3, 5, 9, 13, seed=t, scale=0.3)
    expected = dense_random_walk(cams, dense_affinity_from_features(feats, 5), 8.0, t)
    assert_rel_close(random_walk(cams, feats, radius=5, beta=8.0, t=t), expected)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("maps", [1, 3, 4, 5])
def test_thread_probe_and_padded_maps_stay_exact(threads, maps):
    """t = 100 with two threads times its first products with two threads and with one before
    going on (``_propagate``); maps are padded with zero maps to a multiple of 4 and dropped."""
    cams, feats = _inputs(maps, 5, 9, 13, seed=maps, scale=0.3)
    expected = dense_random_walk(cams, dense_affinity_from_features(feats, 5), 8.0, 100)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        actual = random_walk(cams, feats, radius=5, beta=8.0, t=100)
        assert torch.get_num_threads() == threads   # the probe gives the process its threads back
    finally:
        torch.set_num_threads(before)
    assert actual.shape == cams.shape
    assert_rel_close(actual, expected)


@pytest.mark.parametrize("radius", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("h,w", [(6, 11), (12, 5), (1, 9), (3, 2), (1, 1)])
def test_matches_dense_radii_and_grids(radius, h, w):
    cams, feats = _inputs(2, 4, h, w, seed=radius * 100 + h, scale=0.5)
    expected = dense_random_walk(cams, dense_affinity_from_features(feats, radius), 8.0, 7)
    assert_rel_close(random_walk(cams, feats, radius=radius, beta=8.0, t=7), expected)


@pytest.mark.parametrize("beta", [0.5, 1, 3.5, 8, 16])
@pytest.mark.parametrize("distance", ["mean", "sum"])
def test_matches_dense_beta_and_distance(beta, distance):
    cams, feats = _inputs(4, 3, 8, 10, seed=int(beta * 10), scale=0.2)
    expected = dense_random_walk(
        cams, dense_affinity_from_features(feats, 5, distance), float(beta), 32)
    actual = random_walk(cams, feats, radius=5, beta=beta, t=32, distance=distance)
    assert_rel_close(actual, expected)


def test_matches_dense_two_regions():
    """Two regions with near-zero cross affinity: mass stays on its own side, as dense says."""
    h, w = 10, 14
    feats = torch.zeros(8, h, w, dtype=F64)
    feats[:, :, 7:] = 3.0  # mean |diff| = 3 across the boundary, 0 within a side
    feats += 0.01 * torch.randn(8, h, w, generator=torch.Generator().manual_seed(3), dtype=F64)
    cams = torch.zeros(2, h, w, dtype=F64)
    cams[0, 4, 2] = 1.0  # a single activation on the left
    cams[1, :, 10:] = 1.0  # a stripe on the right
    expected = dense_random_walk(cams, dense_affinity_from_features(feats, 5), 8.0, 256)
    actual = random_walk(cams, feats, radius=5, beta=8.0, t=256)
    assert_rel_close(actual, expected)
    assert actual[0, :, 7:].max() < 1e-6 * actual[0, :, :7].max()
    assert actual[0, :, :7].std() < 0.05 * actual[0, :, :7].mean()  # diffused over its side
    assert actual[1, :, :7].max() < 1e-6


@pytest.mark.parametrize("t", [1, 5, 256])
def test_precomputed_affinities_match_dense(t):
    h, w, radius = 7, 10, 4
    g = torch.Generator().manual_seed(t)
    cams = torch.rand(3, h, w, generator=g, dtype=F64)
    A = torch.rand(len(neighbour_offsets(radius)), h, w, generator=g, dtype=F64)
    expected = dense_random_walk(cams, dense_affinity_from_pairs(A, radius, h, w), 2.0, t)
    # Off-grid entries must be ignored, whatever they hold.
    actual = random_walk(cams, affinities=A, radius=radius, beta=2.0, t=t)
    assert_rel_close(actual, expected)


def test_features_and_precomputed_paths_agree():
    cams, feats = _inputs(3, 6, 11, 8, seed=5, scale=0.4)
    A = pair_affinities(feats, radius=5)
    assert_rel_close(random_walk(cams, affinities=A, t=9),
                     random_walk(cams, feats, t=9).to(F64), rel=1e-10)


def test_transition_matrix_matches_eq11():
    h, w = 6, 7
    A = torch.rand(len(neighbour_offsets(3)), h, w, dtype=F64)
    Wb = dense_affinity_from_pairs(A, 3, h, w) ** 3.0
    T = transition_matrix(A, radius=3, beta=3.0)
    assert T.layout == torch.sparse_csr and T.shape == (h * w, h * w)
    torch.testing.assert_close(T.to_dense(), Wb / Wb.sum(1, keepdim=True), rtol=1e-12, atol=0)


# --- invariants ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_constant_map_stays_constant_and_rows_sum_to_one(dtype):
    _, feats = _inputs(1, 8, 20, 17, seed=9, dtype=dtype)
    cams = torch.full((2, 20, 17), 0.7, dtype=dtype)
    cams[1] = -2.0
    out = random_walk(cams, feats, t=256)
    assert out.dtype == dtype
    tol = 5e-4 if dtype == torch.float32 else 1e-12  # float32: 256 roundings of each step
    torch.testing.assert_close(out, cams, rtol=tol, atol=tol)
    T = transition_matrix(pair_affinities(feats, 5), 5, 8.0).to_dense()
    torch.testing.assert_close(T.sum(1), torch.ones(20 * 17, dtype=dtype), rtol=tol, atol=tol)
    assert (T >= 0).all()


def test_output_is_convex_combination():
    cams, feats = _inputs(3, 4, 12, 9, seed=4)
    out = random_walk(cams, feats, t=17)
    lo = cams.amin(dim=(1, 2), keepdim=True)
    hi = cams.amax(dim=(1, 2), keepdim=True)
    assert ((out >= lo - 1e-12) & (out <= hi + 1e-12)).all()


def test_t1_is_one_application_and_steps_compose():
    cams, feats = _inputs(2, 5, 9, 12, seed=6)
    T = transition_matrix(pair_affinities(feats, 5), 5, 8.0).to_dense()
    one = random_walk(cams, feats, t=1)
    torch.testing.assert_close(one, (T @ cams.reshape(2, -1).t()).t().reshape(cams.shape),
                               rtol=1e-12, atol=1e-14)
    three_then_five = random_walk(random_walk(cams, feats, t=3), feats, t=5)
    torch.testing.assert_close(three_then_five, random_walk(cams, feats, t=8),
                               rtol=1e-12, atol=1e-14)


def test_radius1_is_identity():
    cams, feats = _inputs(2, 3, 5, 6)
    torch.testing.assert_close(random_walk(cams, feats, radius=1, t=10), cams, rtol=0, atol=0)


def test_inputs_untouched_and_dtypes():
    cams, feats = _inputs(2, 3, 5, 6, dtype=torch.float32)
    c0, f0 = cams.clone(), feats.clone()
    out = random_walk(cams, feats, t=4)
    assert out.dtype == torch.float32 and out.shape == cams.shape and out.is_contiguous()
    assert torch.equal(cams, c0) and torch.equal(feats, f0)
    half = random_walk(cams.half(), feats.half(), t=4)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), out, rtol=1e-2, atol=1e-2)
    assert random_walk(cams, feats.double(), t=2).dtype == F64


def test_non_power_of_two_t_differs_from_neighbours():
    cams, feats = _inputs(1, 3, 8, 8, seed=2)
    outs = [random_walk(cams, feats, t=t) for t in (99, 100, 101)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cams, feats = _inputs(4, 16, 30, 23, seed=8, dtype=torch.float32)
    cpu = random_walk(cams, feats, t=64)
    gpu = random_walk(cams.cuda(), feats.cuda(), t=64)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


# --- validation ----------------------------------------------------------------------------

def test_validation_errors():
    cams, feats = _inputs(2, 3, 5, 6)
    A = pair_affinities(feats, 5)
    cases = [
        (dict(features=feats[:, :4]), "share h and w"),
        (dict(features=feats, t=0), "t must be >= 1"),
        (dict(features=feats, t=-4), "t must be >= 1"),
        (dict(features=feats, beta=0), "beta"),
        (dict(features=feats, beta=-1.0), "beta"),
        (dict(features=feats, beta=float("nan")), "beta"),
        (dict(features=feats, radius=0), "radius"),
        (dict(features=feats, distance="l2"), "distance"),
        (dict(), "exactly one"),
        (dict(features=feats, affinities=A), "exactly one"),
        (dict(affinities=A[:10]), "num_offsets"),
        (dict(affinities=A, radius=4), "num_offsets"),
        (dict(affinities=-A), "finite and >= 0"),
        (dict(features=feats[0]), r"\(D, h, w\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            random_walk(cams, **kwargs)
    with pytest.raises(ValueError, match=r"\(C, h, w\)"):
        random_walk(cams[0], feats)
    with pytest.raises(ValueError, match="floating"):
        random_walk(cams.long(), feats)
    with pytest.raises(TypeError, match="t must be an integer"):
        random_walk(cams, feats, t=2.5)
    with pytest.raises(ValueError, match=r"\(num_offsets, h, w\)"):
        random_walk(cams, affinities=A[0])
    with pytest.raises(TypeError, match="cams"):
        random_walk(cams.numpy(), feats)
    with pytest.raises(ValueError, match="distance"):
        pair_affinities(feats, 5, distance="max")
