"""CAMs (Eq. 1-2), multi-scale inference, frozen BatchNorm, and the pseudo-label plumbing."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from affinitynet.models.backbones import freeze_batchnorm
from affinitynet.models.cam import CAMNet, infer_cams, normalise_cams
from affinitynet.ops.background import background_map, labels_from_scores, with_background
from affinitynet.ops.pseudo_labels import to_grid, to_image


class TinyBackbone(nn.Module):
    """Three levels at stride 2, 4 and 4, with BatchNorm: enough to exercise the CAM network."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(6, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.out_channels, self.output_stride = (4, 6, 8), 4
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def forward(self, x):
        a = self.a(x)
        b = self.b(a)
        return [a, b, self.c(b)]


@pytest.fixture()
def model():
    torch.manual_seed(0)
    net = CAMNet(TinyBackbone(), num_object_classes=4, head_channels=5)
    with torch.no_grad():
        net.classifier.weight.normal_(0, 1)   # visible CAMs, not the near-zero initial ones
    return net.eval()


def test_logits_are_the_gap_of_the_cams(model):
    """Eq. 1: pooling then classifying equals classifying every position then pooling."""
    x = torch.randn(2, 3, 24, 20)
    assert torch.allclose(model(x), model.cams(x).mean(dim=(2, 3)), atol=1e-5)


def test_normalisation_and_background_against_eq_1_and_2():
    rng = np.random.default_rng(0)
    summed = torch.from_numpy(rng.random((4, 7, 9)).astype(np.float32)) * 3
    cams = normalise_cams(summed, [2, 4]).numpy()
    direct = np.stack([summed[1].numpy() / (summed[1].numpy().max() + 1e-5),
                       summed[3].numpy() / (summed[3].numpy().max() + 1e-5)])
    np.testing.assert_allclose(cams, direct, rtol=1e-6)
    for alpha in (1.0, 4.0, 16.0, 24.0):
        expected = (1 - direct.max(axis=0)) ** alpha
        np.testing.assert_allclose(background_map(cams, alpha), expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(background_map(torch.from_numpy(cams), alpha).numpy(), expected, rtol=1e-5, atol=1e-7)
    assert np.all(background_map(np.zeros((0, 3, 5), np.float32), 16.0) == 1)
    scores = with_background(cams, alpha=16.0)
    np.testing.assert_array_equal(labels_from_scores(scores, [2, 4]), np.array([0, 2, 4])[scores.argmax(0)])
    constant = with_background(cams, threshold=0.2)
    assert np.all(constant[0] == np.float32(0.2))


def separate_maps(model, image, scales, per_map=lambda cam: cam):
    """ReLU'd CAMs of every scale and mirror, each through ``per_map``, upsampled to the image
    and mirrored back: the maps that multi-scale inference sums, computed one by one."""
    maps = []
    with torch.no_grad():
        for scale in scales:
            size = (round(21 * scale), round(27 * scale))
            scaled = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
            for flipped in (False, True):
                cam = per_map(F.relu(model.cams(scaled.flip(-1) if flipped else scaled)))
                cam = F.interpolate(cam, size=(21, 27), mode="bilinear", align_corners=False)[0]
                maps.append(cam.flip(-1) if flipped else cam)
    return maps


def test_multiscale_flip_equals_the_mean_of_the_separate_maps(model):
    image = torch.randn(3, 21, 27)
    scales, classes = (1.0, 0.5, 1.5), [1, 3]
    got = infer_cams(model, image, classes, scales, flip=True)
    maps = separate_maps(model, image, scales)
    mean = torch.stack(maps).mean(0)[[0, 2]]
    expected = mean / (mean.flatten(1).amax(1).view(-1, 1, 1) + 1e-5 / len(maps))
    # The sum of the maps, max-normalised, equals their mean, max-normalised (up to the epsilon).
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert got.shape == (2, 21, 27) and float(got.amax()) <= 1.0
    assert infer_cams(model, image, [], scales, True).shape == (0, 21, 27)


def test_gradcam_is_the_cam_divided_by_the_map_area(model):
    """Grad-CAM's weights are the spatial mean of d logit_c / d f_cam, which under GAP + a linear
    classifier is w_c / (h w): its map at each scale is that scale's CAM over its area. The
    reference builds exactly that from the CAMs, without autograd."""
    image = torch.randn(3, 21, 27)
    scales, classes = (1.0, 0.5, 1.5), [1, 3]
    got = infer_cams(model, image, classes, scales, flip=True, method="gradcam")
    maps = separate_maps(model, image, scales, per_map=lambda cam: cam / (cam.shape[-2] * cam.shape[-1]))
    summed = torch.stack(maps).sum(0)[[0, 2]]
    expected = summed / (summed.flatten(1).amax(1).view(-1, 1, 1) + 1e-5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # At one scale the area is common to every map: Grad-CAM is the CAM up to the epsilon.
    one = infer_cams(model, image, classes, (1.0,), flip=True, method="gradcam")
    torch.testing.assert_close(one, infer_cams(model, image, classes, (1.0,), flip=True), atol=2e-3, rtol=0)
    assert got.grad_fn is None and not got.requires_grad


def test_a_cam_method_registers_itself_and_the_config_accepts_it(model):
    from affinitynet.errors import ConfigError
    from affinitynet.models.cam import METHODS, CAMMethod
    from affinitynet.pipeline.settings import load_run_config as load_config

    with pytest.raises(ConfigError, match="cam.method.*'cam'.*'gradcam'"):
        load_config("demo", ["cam.method=scorecam"])

    @METHODS.register("squared")
    class Squared(CAMMethod):
        def maps(self, model, batch):
            return model.cams(batch) ** 2

    try:
        assert load_config("demo", ["cam.method=squared"])["cam"]["method"] == "squared"
        image = torch.randn(3, 16, 16)
        got = infer_cams(model, image, [2], (1.0,), flip=False, method="squared")
        with torch.no_grad():
            raw = F.relu(model.cams(image[None]) ** 2)[0, 1]
        raw = F.interpolate(raw[None, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(got[0], raw / (raw.max() + 1e-5))
    finally:
        METHODS._entries.pop("squared")


def test_frozen_batchnorm_stays_frozen_after_a_training_step(model):
    model.train()
    freeze_batchnorm(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "bn" in k or ".1." in k}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    loss = F.multilabel_soft_margin_loss(model(torch.randn(4, 3, 16, 16)), torch.ones(4, 4))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert model.head[0].weight.grad is not None


def test_grid_round_trip_and_partial_cells():
    maps = torch.rand(3, 19, 13)
    grid = to_grid(maps, 8)
    assert grid.shape == (3, 3, 2)
    # A cell hanging over the edge averages only the pixels it covers.
    torch.testing.assert_close(grid[:, 2, 1], maps[:, 16:19, 8:13].mean(dim=(1, 2)))
    torch.testing.assert_close(grid[:, 0, 0], maps[:, :8, :8].mean(dim=(1, 2)))
    constant = to_image(torch.full((2, 3, 2), 0.25), 19, 13, 8)
    assert constant.shape == (2, 19, 13) and torch.allclose(constant, torch.tensor(0.25))


@pytest.mark.parametrize("head", ["psa", "irn"])
def test_released_heads_classify_the_backbone_map_directly(head):
    """psa's res38_cls and irn's res50_cam: no 3x3 conv, CAM = ReLU(conv(features, fc8)) (Eq. 1 with
    f_cam the backbone's last map); only the classifier is added to the backbone's parameters."""
    torch.manual_seed(0)
    net = CAMNet(TinyBackbone(), num_object_classes=3, head=head)
    assert set(net.state_dict()) - set(f"backbone.{k}" for k in net.backbone.state_dict()) == {"classifier.weight"}
    assert net.classifier.weight.shape == (3, 8, 1, 1)
    net.eval()
    x = torch.randn(2, 3, 16, 20)
    with torch.no_grad():
        direct = F.conv2d(net.backbone(x)[-1], net.classifier.weight)
        torch.testing.assert_close(net.cams(x), direct)
        torch.testing.assert_close(net(x), direct.mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)
    # psa drops whole channels before GAP in training (its dropout7); irn does not.
    net.train()
    freeze_batchnorm(net)
    torch.manual_seed(1)
    with torch.no_grad():
        trained = net.features(x)
    changed = not torch.equal(trained, net.backbone(x)[-1])
    assert changed == (head == "psa")


def test_unknown_head_is_refused():
    with pytest.raises(ValueError, match="unknown CAM head 'gap'"):
        CAMNet(TinyBackbone(), 3, head="gap")
