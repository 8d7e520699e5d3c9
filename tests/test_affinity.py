import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from affinitynet.models.affinity import (
    AffinityNet,
    affinity_loss,
    affinity_loss_from_distances,
    boundary_image,
    boundary_map,
    confident_regions,
    downsample_labels,
    feature_affinities,
    feature_distances,
    num_offsets,
    pair_labels,
)
from affinitynet.ops.background import background_map
from affinitynet.ops.random_walk import neighbour_offsets

# ---------------------------------------------------------------------------- pair set (Eq. 4)

def test_radius_5_pair_set():
    offsets = neighbour_offsets(5)
    assert len(offsets) == 34 == num_offsets(5)
    assert all(dy * dy + dx * dx < 25 for dy, dx in offsets)
    assert len(set(offsets)) == 34
    # One-sided: no offset is the negation of another, so each unordered pair is stored once,
    # and together with the negations they are all 68 neighbours within the radius.
    assert not set(offsets) & {(-dy, -dx) for dy, dx in offsets}
    full = {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
            if 0 < dy * dy + dx * dx < 25}
    assert set(offsets) | {(-dy, -dx) for dy, dx in offsets} == full
    assert len(full) == 68


# ---------------------------------------------------------------------------- labels (Eq. 5-6)

def _hand_made_labels():
    n = 255
    return np.array([
        [0, 0, 0, 0, n, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, n, n, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, n, 1, 1, 1, 1, n, 0, 0],
        [2, 2, 0, 0, 1, 1, 1, n, n, 0, 0],
        [2, 2, 2, 0, 0, 1, 1, 0, 0, 0, 3],
        [2, 2, 2, n, 0, 0, 0, 0, 0, 3, 3],
        [2, n, 2, n, n, 0, 0, 0, 3, 3, 3],
        [2, 2, 2, 2, 0, 0, 0, 0, 3, 3, n],
        [2, 2, 2, 2, 0, 0, 0, 0, 0, 3, 3],
    ], dtype=np.uint8)


def _reference_pairs(labels, radius):
    """Every unordered pair within the radius, by brute force: {frozenset(p, q): subset}."""
    h, w = labels.shape
    pixels = [(y, x) for y in range(h) for x in range(w)]
    result = {}
    for p, q in itertools.combinations(pixels, 2):
        if (p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= radius ** 2:
            continue
        a, b = int(labels[p]), int(labels[q])
        if a == 255 or b == 255:
            continue
        if a != b:
            result[frozenset((p, q))] = "neg"
        elif a == 0:
            result[frozenset((p, q))] = "pos_bg"
        else:
            result[frozenset((p, q))] = "pos_fg"
    return result


def _pairs_from_masks(masks, radius):
    offsets = neighbour_offsets(radius)
    result, count = {}, 0
    for name, mask in masks.items():
        for k, y, x in torch.nonzero(mask).tolist():
            dy, dx = offsets[k]
            key = frozenset(((y, x), (y + dy, x + dx)))
            assert key not in result, "pair stored twice"
            result[key] = name
            count += 1
    return result, count


@pytest.mark.parametrize("radius", [5, 3, 2])
def test_pair_labels_match_brute_force(radius):
    labels = _hand_made_labels()
    masks = pair_labels(labels, radius)
    assert set(masks) == {"pos_fg", "pos_bg", "neg"}
    for mask in masks.values():
        assert mask.dtype == torch.bool and mask.shape == (num_offsets(radius),) + labels.shape
    got, count = _pairs_from_masks(masks, radius)
    expected = _reference_pairs(labels, radius)
    assert count == len(got) == len(expected)
    assert got == expected
    for name in masks:
        assert int(masks[name].sum()) == sum(v == name for v in expected.values())
    # The hand-made map must exercise every subset.
    assert all(int(m.sum()) > 0 for m in masks.values())


def test_pair_labels_out_of_grid_and_batched():
    labels = _hand_made_labels()
    h, w = labels.shape
    masks = pair_labels(torch.from_numpy(labels), 5)
    union = masks["pos_fg"] | masks["pos_bg"] | masks["neg"]
    assert not (masks["pos_fg"] & masks["neg"]).any() and not (masks["pos_bg"] & masks["neg"]).any()
    for k, (dy, dx) in enumerate(neighbour_offsets(5)):
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        outside = (ys + dy >= h) | (xs + dx < 0) | (xs + dx >= w)
        assert not union[k][outside].any()
    batch = np.stack([labels, labels[::-1, ::-1], np.full_like(labels, 255)])
    batched = pair_labels(batch, 5)
    for name in batched:
        assert batched[name].shape == (3, 34, h, w)
        for i in range(3):
            assert torch.equal(batched[name][i], pair_labels(batch[i], 5)[name])
    assert not any(m[2].any() for m in batched.values())


def test_downsample_labels():
    labels = np.arange(16 * 24, dtype=np.int64).reshape(16, 24) % 256
    by_stride = downsample_labels(labels, stride=8)
    assert by_stride.shape == (2, 3) and by_stride.dtype == labels.dtype
    np.testing.assert_array_equal(by_stride, labels[4::8, 4::8])
    # Not a multiple of the stride: ceil(H / 8) cells like a padded conv net, last centre clamped.
    odd = np.arange(19 * 21).reshape(19, 21)
    np.testing.assert_array_equal(downsample_labels(odd, stride=8),
                                  odd[np.ix_([4, 12, 18], [4, 12, 20])])
    # An explicit grid matches PIL's nearest-neighbour resize (the released code's approach).
    from PIL import Image
    image = (np.arange(37 * 53).reshape(37, 53) % 251).astype(np.uint8)
    resized = np.asarray(Image.fromarray(image).resize((7, 5), Image.NEAREST))
    np.testing.assert_array_equal(downsample_labels(image, grid=(5, 7)), resized)
    batch = torch.from_numpy(np.stack([labels, labels + 1]))
    out = downsample_labels(batch, stride=8)
    assert isinstance(out, torch.Tensor) and torch.equal(out[1], out[0] + 1)
    with pytest.raises(ValueError):
        downsample_labels(labels)


# ---------------------------------------------------------------------------- loss (Eq. 7-10)

def _reference_loss(aff, fg, bg, neg):
    def mean_of(values):
        return sum(values) / len(values) if values else 0.0
    a, fg, bg, neg = (t.flatten().tolist() for t in (aff, fg, bg, neg))
    l_fg = mean_of([-math.log(w) for w, m in zip(a, fg) if m])
    l_bg = mean_of([-math.log(w) for w, m in zip(a, bg) if m])
    l_neg = mean_of([-math.log(1 - w) for w, m in zip(a, neg) if m])
    return l_fg + l_bg + 2 * l_neg, (l_fg, l_bg, l_neg)


def _random_subsets(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(0, 4, shape, generator=g)  # 3: ignored pair
    return which == 0, which == 1, which == 2


def test_loss_matches_direct_evaluation():
    shape = (2, 34, 5, 6)
    g = torch.Generator().manual_seed(1)
    aff = torch.rand(shape, generator=g, dtype=torch.float64) * 0.9 + 0.05
    fg, bg, neg = _random_subsets(shape)
    expected, (e_fg, e_bg, e_neg) = _reference_loss(aff, fg, bg, neg)
    loss, parts = affinity_loss(aff, fg, bg, neg)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert parts["pos_fg"].item() == pytest.approx(e_fg, rel=1e-10)
    assert parts["pos_bg"].item() == pytest.approx(e_bg, rel=1e-10)
    assert parts["neg"].item() == pytest.approx(e_neg, rel=1e-10)
    assert (int(parts["num_pos_fg"]), int(parts["num_pos_bg"]), int(parts["num_neg"])) == \
        (int(fg.sum()), int(bg.sum()), int(neg.sum()))
    # The distance form is the same loss.
    loss_d, _ = affinity_loss_from_distances(-torch.log(aff), fg, bg, neg)
    assert loss_d.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("empty", [("neg",), ("pos_fg", "pos_bg"), ("pos_fg", "pos_bg", "neg")])
def test_loss_with_empty_subsets_is_finite(empty):
    shape = (2, 34, 4, 4)
    masks = dict(zip(("pos_fg", "pos_bg", "neg"), _random_subsets(shape, seed=3)))
    for name in empty:
        masks[name] = torch.zeros(shape, dtype=torch.bool)
    # Includes extreme values: identical features (d = 0) and off-grid entries (d = inf).
    d = torch.rand(shape, generator=torch.Generator().manual_seed(2)) * 3
    d[0, 0] = 0.0
    d[1, -1] = float("inf")
    for name in masks:
        masks[name][1, -1] = False  # off-grid entries are never pairs
    dist = d.clone().requires_grad_(True)
    loss, parts = affinity_loss_from_distances(dist, **masks)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(dist.grad).all()
    for name in empty:
        assert parts[name].item() == 0.0
    aff = torch.exp(-d).requires_grad_(True)
    loss_a, _ = affinity_loss(aff, **masks)
    loss_a.backward()
    assert torch.isfinite(loss_a) and torch.isfinite(aff.grad).all()
    if len(empty) == 3:
        assert loss.item() == 0.0 and loss_a.item() == 0.0


# ---------------------------------------------------------------------------- affinities (Eq. 3)

def test_affinity_identical_features_and_range():
    feats = torch.randn(1, 8, 1, 1).expand(2, 8, 7, 9).contiguous()
    d = feature_distances(feats, 5)
    aff = feature_affinities(feats, 5)
    inside = torch.isfinite(d)
    assert torch.equal(aff[inside], torch.ones_like(aff[inside]))
    assert (aff[~inside] == 0).all()
    # Every pixel has at least one in-grid forward pair except the last one of the grid.
    assert inside.any(1)[..., :-1, :].all()

    feats = torch.randn(2, 16, 7, 9, dtype=torch.float64)
    aff = feature_affinities(feats, 5)
    d = feature_distances(feats, 5)
    inside = torch.isfinite(d)
    assert (aff[inside] > 0).all() and (aff[inside] <= 1).all()
    # "sum" is the L1 norm of Eq. 3, "mean" the released code's per-channel mean.
    torch.testing.assert_close(feature_distances(feats, 5, "sum")[inside], 16 * d[inside])
    # Direct check of a few pairs.
    offsets = neighbour_offsets(5)
    for k, y, x in [(0, 0, 0), (7, 3, 4), (33, 2, 2)]:
        dy, dx = offsets[k]
        direct = (feats[1, :, y, x] - feats[1, :, y + dy, x + dx]).abs().mean()
        torch.testing.assert_close(d[1, k, y, x], direct)


def test_distance_gradients():
    # The hand-written backward against finite differences, for both distances and a grid smaller
    # than the radius in one direction (offsets that leave the grid entirely).
    for shape, distance in [((2, 3, 5, 6), "mean"), ((1, 2, 3, 7), "sum")]:
        feats = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        weights = torch.randn((shape[0], 34) + shape[2:], dtype=torch.float64)

        def finite_part(f):
            d = feature_distances(f, 5, distance)
            return (torch.where(torch.isfinite(d), d, 0.0) * weights).sum()

        assert torch.autograd.gradcheck(finite_part, (feats,))
        # Same gradient as autograd through the plain expression.
        d = feature_distances(feats, 5, distance)
        plain = []
        for dy, dx in neighbour_offsets(5):
            shifted = torch.roll(feats, shifts=(-dy, -dx), dims=(-2, -1))
            diff = (feats - shifted).abs()
            plain.append(diff.mean(1) if distance == "mean" else diff.sum(1))
        plain = torch.stack(plain, 1)
        inside = torch.isfinite(d)
        torch.testing.assert_close(d[inside], plain[inside])
        g1, = torch.autograd.grad((torch.where(inside, d, 0.0) * weights).sum(), feats)
        g2, = torch.autograd.grad((torch.where(inside, plain, 0.0) * weights).sum(), feats)
        torch.testing.assert_close(g1, g2)


def test_affinity_is_symmetric():
    feats = torch.randn(16, 6, 8)
    forward = feature_affinities(feats, 5)
    # Rotating by 180 degrees swaps the ends of every pair: the pair (p, p + k) is then stored at
    # the rotated image of p + k. W computed from that end must agree.
    rotated = feature_affinities(feats.flip(-2, -1), 5)
    h, w = feats.shape[-2:]
    for k, (dy, dx) in enumerate(neighbour_offsets(5)):
        for y in range(h):
            for x in range(w):
                if y + dy < h and 0 <= x + dx < w:
                    other = rotated[k, h - 1 - (y + dy), w - 1 - (x + dx)]
                    assert forward[k, y, x].item() == pytest.approx(other.item(), rel=1e-6)


def test_batched_distances_are_each_images_and_the_gradient_is_the_reference_one():
    """The one Eq. 3 (``random_walk.pair_distances``) over a batch, through the training path's
    backward, against autograd on the plain expression."""
    feats = torch.randn(3, 6, 7, 9, dtype=torch.float64, requires_grad=True)
    got = feature_distances(feats, 3, "sum")
    for b in range(3):
        torch.testing.assert_close(got[b], feature_distances(feats[b], 3, "sum"))
    weights = torch.rand_like(got).masked_fill(~torch.isfinite(got), 0)
    (got.masked_fill(~torch.isfinite(got), 0) * weights).sum().backward()
    plain = feats.detach().clone().requires_grad_(True)
    total = 0
    for k, (dy, dx) in enumerate(neighbour_offsets(3)):
        for y in range(7 - dy):
            for x in range(max(0, -dx), min(9, 9 - dx)):
                total = total + weights[:, k, y, x] @ (plain[:, :, y, x] - plain[:, :, y + dy, x + dx]).abs().sum(1)
    total.backward()
    torch.testing.assert_close(feats.grad, plain.grad)


def test_boundary_map_highlights_region_border():
    feats = torch.zeros(4, 12, 12)
    feats[:, :, 6:] = 1.0
    bmap = boundary_map(feats, 3)
    assert bmap.shape == (12, 12)
    # Far from the border: all neighbours identical, so affinity 1 and boundary 0.
    assert torch.allclose(bmap[:, :3], torch.zeros(12, 3)) and torch.allclose(bmap[:, 9:], torch.zeros(12, 3))
    assert (bmap[:, 5] > 0.2).all() and (bmap[:, 6] > 0.2).all()
    image = boundary_image(bmap)
    assert image.dtype == np.uint8 and image.shape == (12, 12)
    assert image.max() == 255 and image[:, 0].max() == 0


# ---------------------------------------------------------------------------- CAM side (Eq. 2)

def test_background_map_matches_eq2():
    rng = np.random.default_rng(0)
    cams = rng.random((3, 5, 7)).astype(np.float32)
    for alpha in (1.0, 4.0, 24.0):
        expected = np.array([[(1 - max(cams[:, y, x])) ** alpha for x in range(7)] for y in range(5)])
        np.testing.assert_allclose(background_map(cams, alpha), expected, rtol=1e-5)
        torch.testing.assert_close(background_map(torch.from_numpy(cams), alpha),
                                   torch.from_numpy(expected).float(), rtol=1e-5, atol=1e-7)
    assert (background_map(np.zeros((0, 5, 7)), 4.0) == 1).all()
    assert (background_map(torch.zeros(0, 5, 7), 4.0) == 1).all()
    # Values a hair above 1 from the normalisation must not give NaN.
    assert np.isfinite(background_map(np.full((1, 2, 2), 1.0000001), 4.5)).all()


def _blob_scene(size=48):
    """A smoothly shaded bright object with a CAM peaked at its centre. Smooth shading (no sharp
    colour edge for the CRF to snap both maps to) lets the two alphas disagree in a ring."""
    yy, xx = np.mgrid[:size, :size]
    dist2 = (yy - size / 2) ** 2 + (xx - size / 2) ** 2
    shade = 255 * np.exp(-dist2 / (2 * 12.0 ** 2))
    image = np.stack([shade, 0.8 * shade, np.full_like(shade, 60)], -1).astype(np.uint8)
    cam = np.exp(-dist2 / (2 * 7.0 ** 2)).astype(np.float32)
    return image, cam[None] / cam.max(), np.sqrt(dist2)


def test_confident_regions_on_synthetic_object():
    image, cams, radius = _blob_scene()
    labels = confident_regions(image, cams, [7], alpha_low=4.0, alpha_high=24.0, crf_params=None)
    assert labels.dtype == np.uint8 and labels.shape == radius.shape
    assert set(np.unique(labels)) <= {0, 7, 255}
    assert (labels[radius < 8] == 7).all()      # object core: its class
    assert (labels[radius > 18] == 0).all()     # far background
    # Without the CRF, M > (1 - M)^4 up to r ~ 11 and (1 - M)^24 > M from r ~ 15: a neutral ring.
    neutral = radius[labels == 255]
    assert neutral.size > 100 and neutral.min() > 8 and neutral.max() < 18
    assert radius[labels == 7].max() < radius[labels == 0].min()


def test_confident_regions_without_classes_is_background():
    image, cams, _ = _blob_scene(16)
    labels = confident_regions(image, cams[:0], [], 4.0, 24.0, {"iterations": 2})
    assert labels.dtype == np.uint8 and (labels == 0).all()
    with pytest.raises(ValueError):
        confident_regions(image, cams, [1, 2], 4.0, 24.0)


# ---------------------------------------------------------------------------- network

class _FakeBackbone(nn.Module):
    """Four levels like the backbones module's interface; the last three at two sizes."""

    out_channels = (8, 16, 24, 32)
    output_stride = 8

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.l2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.l3 = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.l4 = nn.Conv2d(24, 32, 3, stride=1, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(32)

    def forward(self, x):
        a = self.stem(x)
        b = self.l2(a)
        c = self.l3(b)
        return [a, b, c, self.bn(self.l4(c))]


def test_affinitynet_shapes_and_parameter_split():
    net = AffinityNet(_FakeBackbone())
    x = torch.randn(2, 3, 64, 48)
    feats = net.features(x)
    assert feats.shape == (2, 896, 8, 6)
    aff = net.affinities(feats, 5)
    assert aff.shape == (2, 34, 8, 6)
    assert net.distances(feats).shape == (2, 34, 8, 6)
    masks = pair_labels(torch.randint(0, 3, (2, 8, 6)), 5)
    loss, _ = affinity_loss_from_distances(net.distances(feats), **masks)
    loss.backward()
    new, old = net.new_parameters(), net.backbone_parameters()
    all_ids = [id(p) for p in net.parameters()]
    assert sorted(id(p) for p in new + old) == sorted(all_ids)
    assert len(set(all_ids)) == len(new) + len(old)
    assert {id(p) for p in old} == {id(p) for p in net.backbone.parameters()}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in new)

    small = AffinityNet(_FakeBackbone(), channels=(64, 128, 256), activation="relu")
    assert small(x).shape == (2, 448, 8, 6)
    with pytest.raises(ValueError):
        AffinityNet(_FakeBackbone(), activation="tanh")
