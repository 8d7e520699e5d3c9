"""IRN's inter-pixel relations and instance AP against slow references written from the
definitions: the path-max affinity, the displacement losses, centroids, mAP^r."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from affinitynet.metrics import Instance, average_precision, instance_average_precision
from affinitynet.models.affinity import pair_labels
from affinitynet.ops.inter_pixel import (
    displacement_loss,
    instance_map,
    path_cells,
    path_max_affinities,
    refine_centroids,
)
from affinitynet.ops.random_walk import neighbour_offsets


def test_paths_are_the_cells_within_unit_distance_of_the_segment():
    paths = dict(zip(neighbour_offsets(5), path_cells(5)))
    assert paths[(0, 3)] == ((0, 0), (0, 1), (0, 2), (0, 3))
    assert paths[(3, 0)] == ((0, 0), (1, 0), (2, 0), (3, 0))
    assert set(paths[(2, 2)]) == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)}
    for (dy, dx), cells in paths.items():
        assert (0, 0) in cells and (dy, dx) in cells
        for cy, cx in cells:   # the distance to the line, from the geometry
            assert abs(dy * cx - dx * cy) / math.hypot(dy, dx) < 1


@pytest.mark.parametrize("radius", [3, 5])
def test_path_max_affinity_equals_the_loop_over_each_pair(radius):
    generator = torch.Generator().manual_seed(0)
    boundary = torch.rand(2, 9, 11, generator=generator, dtype=torch.float64)
    got = path_max_affinities(boundary, radius)
    for n in range(2):
        for k, ((dy, dx), cells) in enumerate(zip(neighbour_offsets(radius), path_cells(radius))):
            for y in range(9):
                for x in range(11):
                    if 0 <= y + dy < 9 and 0 <= x + dx < 11:
                        expected = 1 - max(float(boundary[n, y + cy, x + cx]) for cy, cx in cells)
                    else:
                        expected = 0.0
                    assert float(got[n, k, y, x]) == expected
    # One boundary cell separates exactly the pairs whose path crosses it.
    wall = torch.zeros(7, 7, dtype=torch.float64)
    wall[:, 3] = 1
    single = path_max_affinities(wall, radius)
    assert float(single[neighbour_offsets(radius).index((0, 2)), 0, 1]) == 0     # (0,1) -> (0,3)
    assert float(single[neighbour_offsets(radius).index((0, 2)), 0, 4]) == 1     # (0,4) -> (0,6)


def centred_field(instances: list[tuple[np.ndarray, tuple[float, float]]], shape) -> np.ndarray:
    """The ideal field: every cell of an instance points at its centroid, the background at 0."""
    field = np.zeros((2, *shape))
    y, x = np.mgrid[:shape[0], :shape[1]]
    for mask, (cy, cx) in instances:
        field[0][mask] = (cy - y)[mask]
        field[1][mask] = (cx - x)[mask]
    return field


def disc(shape, centre, radius):
    y, x = np.mgrid[:shape[0], :shape[1]]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius ** 2


def test_displacement_loss_is_zero_for_the_ideal_field_and_the_loop_elsewhere():
    shape = (20, 30)
    a, b = disc(shape, (6, 7), 5), disc(shape, (12, 21), 6)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[a], labels[b] = 1, 2
    masks = pair_labels(labels[None], 4)
    ideal = torch.from_numpy(centred_field([(a, (6, 7)), (b, (12, 21))], shape))[None]
    loss, parts = displacement_loss(ideal, masks["pos_fg"], masks["pos_bg"], 4)
    assert float(parts["disp_fg"]) == 0 and float(parts["disp_bg"]) == 0 and float(loss) == 0

    field = torch.randn(1, 2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss, parts = displacement_loss(field, masks["pos_fg"], masks["pos_bg"], 4)
    sums = {"fg": [0.0, 0], "bg": [0.0, 0]}
    d = field[0].numpy()
    for k, (dy, dx) in enumerate(neighbour_offsets(4)):
        for y in range(shape[0]):
            for x in range(shape[1]):
                for name, offset in (("fg", (dy, dx)), ("bg", (0, 0))):
                    if bool(masks[f"pos_{name}"][0, k, y, x]):
                        diff = d[:, y, x] - d[:, y + dy, x + dx]
                        sums[name][0] += abs(diff[0] - offset[0]) + abs(diff[1] - offset[1])
                        sums[name][1] += 2
    assert float(parts["disp_fg"]) == pytest.approx(sums["fg"][0] / sums["fg"][1], rel=1e-12)
    assert float(parts["disp_bg"]) == pytest.approx(sums["bg"][0] / sums["bg"][1], rel=1e-12)
    assert float(loss) == pytest.approx(float(parts["disp_fg"] + parts["disp_bg"]), rel=1e-12)


def test_centroids_of_the_ideal_field_give_one_instance_each():
    shape = (24, 40)
    a, b = disc(shape, (8, 9), 6), disc(shape, (14, 29), 7)
    field = centred_field([(a, (8.0, 9.0)), (b, (14.0, 29.0))], shape)
    ends = refine_centroids(field, iterations=5)
    np.testing.assert_allclose(ends[:, a], np.array([[8.0], [9.0]]).repeat(a.sum(), 1))
    np.testing.assert_allclose(ends[:, b], np.array([[14.0], [29.0]]).repeat(b.sum(), 1))
    ids = instance_map(field, iterations=5)
    assert len(np.unique(ids[a])) == 1 and len(np.unique(ids[b])) == 1
    assert ids[a][0] != ids[b][0] and ids[a][0] > 0 and ids[b][0] > 0
    background = ~(a | b)
    assert not set(np.unique(ids[background])) & {ids[a][0], ids[b][0]}


def ap_by_definition(scores, correct, num_true):
    """Precision and recall at every rank; AP = sum over ranks where recall grows of the growth
    times the best precision at that recall or beyond."""
    ranked = sorted(zip(scores, correct), key=lambda item: -item[0])
    tp = fp = 0
    points = []
    for _, hit in ranked:
        tp, fp = tp + hit, fp + (not hit)
        points.append((tp / num_true, tp / (tp + fp)))
    total, previous = 0.0, 0.0
    for index, (recall, _) in enumerate(points):
        if recall > previous:
            total += (recall - previous) * max(p for _, p in points[index:])
            previous = recall
    return total


def test_average_precision_matches_the_definition():
    assert average_precision([0.9, 0.8, 0.7], [True, False, True], 2) == pytest.approx(0.5 + 0.5 * 2 / 3)
    rng = np.random.default_rng(0)
    for _ in range(50):
        count = int(rng.integers(1, 12))
        scores, correct = rng.random(count).tolist(), (rng.random(count) < 0.5).tolist()
        num_true = sum(correct) + int(rng.integers(0, 3))
        if num_true == 0:
            assert math.isnan(average_precision(scores, correct, num_true))
            continue
        assert average_precision(scores, correct, num_true) == pytest.approx(ap_by_definition(scores, correct, num_true))


def map_by_definition(predictions, truths, num_classes, threshold):
    aps = []
    for label in range(1, num_classes):
        ranked = sorted(((p.score, i, j) for i, preds in enumerate(predictions) for j, p in enumerate(preds)
                         if p.label == label), key=lambda item: -item[0])
        num_true = sum(t.label == label for truth in truths for t in truth)
        used, scores, correct = set(), [], []
        for score, i, j in ranked:
            best, best_iou = None, -1.0
            for g, t in enumerate(truths[i]):
                if t.label != label:
                    continue
                inter = np.logical_and(predictions[i][j].mask, t.mask).sum()
                union = np.logical_or(predictions[i][j].mask, t.mask).sum()
                iou = inter / union if union else 0.0
                if iou > best_iou:
                    best, best_iou = g, iou
            hit = best is not None and best_iou >= threshold and (i, best) not in used
            if hit:
                used.add((i, best))
            scores.append(score)
            correct.append(hit)
        if num_true:
            aps.append(ap_by_definition(scores, correct, num_true))
    return 100 * float(np.mean(aps))


def test_instance_map_r_matches_the_definition():
    rng = np.random.default_rng(3)
    predictions, truths = [], []
    for _ in range(6):
        truth = [Instance(int(rng.integers(1, 4)), rng.random((12, 12)) < 0.3) for _ in range(int(rng.integers(1, 4)))]
        preds = []
        for t in truth:   # noisy copies of the truth, some with the wrong class, plus strays
            noisy = t.mask ^ (rng.random((12, 12)) < 0.1)
            preds.append(Instance(t.label if rng.random() < 0.8 else int(rng.integers(1, 4)), noisy, float(rng.random())))
        preds += [Instance(int(rng.integers(1, 4)), rng.random((12, 12)) < 0.3, float(rng.random())) for _ in range(2)]
        predictions.append(preds)
        truths.append(truth)
    result = instance_average_precision(predictions, truths, num_classes=4)
    for threshold in (0.25, 0.5, 0.75):
        assert result[f"{threshold:g}"]["map"] == pytest.approx(map_by_definition(predictions, truths, 4, threshold))
    perfect = instance_average_precision(truths, truths, num_classes=4)
    assert all(perfect[key]["map"] == pytest.approx(100.0) for key in perfect)


class _Levels(torch.nn.Module):
    """Two levels at strides 2 and 4, with a BatchNorm (which must stay frozen)."""

    out_channels = (6, 10)

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, 2, 1), torch.nn.BatchNorm2d(6), torch.nn.ReLU())
        self.b = torch.nn.Sequential(torch.nn.Conv2d(6, 10, 3, 2, 1), torch.nn.ReLU())

    def forward(self, x):
        first = self.a(x)
        return [first, self.b(first)]


def test_irnet_trains_its_branches_only_and_learns_boundaries_and_centroids():
    from affinitynet.models.irnet import IRNet, irn_loss

    torch.manual_seed(0)
    net = IRNet(_Levels()).train()
    assert not net.backbone.training
    image = torch.zeros(1, 3, 38, 50)
    a, b = disc((38, 50), (12, 12), 7), disc((38, 50), (22, 36), 9)
    image[0, 0][torch.from_numpy(a)] = 1.0
    image[0, 1][torch.from_numpy(b)] = 1.0
    logits, field = net(image)
    assert logits.shape == (1, 1, 10, 13) and field.shape == (1, 2, 10, 13)
    grid = np.zeros((10, 13), dtype=np.uint8)
    grid[disc((10, 13), (3, 3), 1.5)] = 1
    grid[disc((10, 13), (5.5, 9), 2)] = 2
    masks = pair_labels(grid[None], 3)
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    optimizer = torch.optim.Adam(net.new_parameters(), lr=0.01)
    losses = []
    for _ in range(60):
        loss, parts = irn_loss(*net(image), masks, 3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.backbone.state_dict().items())
    assert losses[-1] < 0.7 * losses[0], losses[::10]
    assert set(parts) >= {"boundary_pos_fg", "boundary_neg", "disp_fg", "disp_bg"}
    # What it learned: pairs across the two objects' border are less related than pairs inside.
    with torch.no_grad():
        affinities = path_max_affinities(torch.sigmoid(net(image)[0][:, 0]), 3)
    assert float(affinities[masks["neg"]].mean()) < float(affinities[masks["pos_fg"]].mean()) - 0.2


def test_predict_is_mirror_equivariant_so_the_field_flips_its_column_component():
    from affinitynet.models.irnet import IRNet, predict

    torch.manual_seed(1)
    net = IRNet(_Levels()).eval()
    image = torch.rand(3, 24, 40)
    with torch.no_grad():
        boundary, field = predict(net, image)
        mirror_boundary, mirror_field = predict(net, image.flip(-1))
        _, plain = net(image[None])
    assert boundary.shape == (6, 10) and field.shape == (2, 6, 10)
    torch.testing.assert_close(mirror_boundary, boundary.flip(-1))
    torch.testing.assert_close(mirror_field[0], field[0].flip(-1))
    torch.testing.assert_close(mirror_field[1], -field[1].flip(-1))
    # The average of the image's field and its mirror's, not the image's alone.
    assert not torch.allclose(field, plain[0])
