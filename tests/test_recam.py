"""ReCAM (cam.method 'recam', issue 41): the loss against a loop over images and classes as
ReCAM's code computes it, the network's maps and pooled features against their definitions, the
graph with and without it, and a tiny run through ``train_recam``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tiny_pipeline as tiny
from tiny_backbone import TinyBackbone

from affinitynet import pipeline
from affinitynet.data.transforms import normalize
from affinitynet.files import load_npz
from affinitynet.models.cam import CAMNet, ReCAMNet, infer_cams, method_network, recam_loss
from affinitynet.config import DEFAULTS, load_config
from affinitynet.models.networks import load_checkpoint_meta, networks, train_output_stride, training_section
from affinitynet.stages.common import label_images, load_network


def _networks(seed=0):
    torch.manual_seed(seed)
    recam = ReCAMNet(TinyBackbone(), 5, head_channels=6).eval()
    cam = CAMNet(TinyBackbone(), 5, head_channels=6).eval()
    cam.load_state_dict({k: v for k, v in recam.state_dict().items() if not k.startswith("recam.")})
    return recam, cam


def test_the_loss_is_recams_per_image_cross_entropy():
    torch.manual_seed(0)
    logits, recam_logits = torch.randn(3, 5), torch.randn(3, 5, 5)
    targets = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 1, 0, 0]], dtype=torch.float32)
    expected_ce = sum(F.cross_entropy(recam_logits[i][targets[i] > 0], targets[i].nonzero()[:, 0])
                      for i in range(3)) / 3
    loss, cross_entropy = recam_loss(logits, recam_logits, targets, 0.7)
    torch.testing.assert_close(cross_entropy, expected_ce)
    torch.testing.assert_close(loss, F.multilabel_soft_margin_loss(logits, targets) + 0.7 * expected_ce)


def test_forward_pools_each_class_under_its_normalised_map():
    recam, _ = _networks()
    images = torch.randn(2, 3, 32, 32)
    logits, recam_logits = recam(images)
    features = recam.features(images)
    for n in range(2):
        for c in range(5):
            m = F.relu(F.conv2d(features[n:n + 1], recam.classifier.weight[c:c + 1]))[0, 0]
            pooled = (features[n] * (m / (m.max() + 1e-5))).mean((1, 2))
            torch.testing.assert_close(recam_logits[n, c], recam.recam.weight[:, :, 0, 0] @ pooled,
                                       rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, recam.classify(features))


def test_the_maps_use_the_product_of_the_weights():
    recam, cam = _networks()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = F.conv2d(recam.features(images), recam.recam.weight * recam.classifier.weight)
        torch.testing.assert_close(recam.cams(images), expected)
        # With ReCAM's weights all one, the maps are the CAM network's (Eq. 1).
        recam.recam.weight.fill_(1.0)
        torch.testing.assert_close(recam.cams(images), cam.cams(images))
        image = torch.randn(3, 40, 40)
        torch.testing.assert_close(infer_cams(recam, image, [1, 4], [1.0, 1.5], True, "recam"),
                                   infer_cams(cam, image, [1, 4], [1.0, 1.5], True, "cam"))
    # Only ReCAM's classifier is new; the CAM network's layers are fine-tuned at the base rate.
    assert {id(p) for p in recam.new_parameters()} == {id(recam.recam.weight)}
    assert len(recam.backbone_parameters()) + 1 == len(list(recam.parameters()))
    assert method_network("recam") == "recam" and method_network("cam") == method_network("gradcam") == "cam"


def test_recam_trains_with_the_cam_networks_keys_and_its_own_rates():
    config = load_config("msrc21", ["cam.train_output_stride=16"])
    section = training_section("recam", config)
    assert section["batch_size"] == config["cam"]["batch_size"] and section["crop_size"] == config["cam"]["crop_size"]
    assert section["lr"] == config["recam"]["lr"] != config["cam"]["lr"]
    assert section["epochs"] == config["recam"]["epochs"] != config["cam"]["epochs"]
    assert train_output_stride("recam", config) == train_output_stride("cam", config) == 16
    # Every network's own keys are settings of its own section that its training section also has.
    for spec in networks():
        assert all(key in DEFAULTS[spec.kind] and key in DEFAULTS[spec.section] for key in spec.own_keys), spec.kind
        assert training_section(spec.kind, config).keys() == config[spec.section].keys(), spec.kind


def test_the_graph_reads_recams_network_only_when_asked(reference):
    ref_dir, data_root = reference
    config = tiny.config(ref_dir, data_root)
    assert pipeline.upstream_stages(config, "infer_cam") == ("train_cam",)
    assert "train_recam" not in [spec.name for spec in pipeline.stages(config)]
    recam = tiny.config(ref_dir, data_root, "cam.method=recam")
    order = [spec.name for spec in pipeline.stages(recam)]
    assert order[:3] == ["train_cam", "train_recam", "infer_cam"]
    assert pipeline.upstream_stages(recam, "infer_cam") == ("train_recam",)
    assert pipeline.stage_hash(recam, "train_cam") == pipeline.stage_hash(config, "train_cam")
    assert pipeline.stage_hash(recam, "infer_cam") != pipeline.stage_hash(config, "infer_cam")
    heavier = tiny.config(ref_dir, data_root, "cam.method=recam", "recam.loss_weight=0.5")
    assert pipeline.stage_hash(heavier, "train_recam") != pipeline.stage_hash(recam, "train_recam")


@pytest.mark.slow
def test_a_run_with_recam(tmp_path, reference):
    ref_dir, data_root = reference
    run_dir = tiny.copy_stages(ref_dir, tmp_path / "run", ("train_cam",))
    code, out, err = tiny.cli(tiny.argv("run", run_dir, data_root, "cam.method=recam", "recam.epochs=2",
                                        "recam.lr=0.01"))
    assert code == 0, err
    trained, meta = load_checkpoint_meta(run_dir / "train_recam" / "model.pt")
    start, _ = load_checkpoint_meta(ref_dir / "train_cam" / "model.pt")
    assert meta["kind"] == "recam" and set(trained) == set(start) | {"recam.weight"}
    # Fine-tuned from the CAM network: its layers moved.
    assert any(not torch.equal(trained[key], value) for key, value in start.items())
    # infer_cam read ReCAM's maps off that network.
    config = tiny.config(run_dir, data_root, "cam.method=recam")
    data = label_images(config)
    model = load_network("recam", config, torch.device("cpu"), data.num_classes, data.class_names)
    for sample in data.samples[:3]:
        image = normalize(data.load_image(sample), model.backbone.mean, model.backbone.std)
        with torch.no_grad():
            expected = infer_cams(model, image, sample.labels, [1.0], True, "recam").numpy()
        saved = load_npz(run_dir / "infer_cam" / "cams" / f"{sample.id}.npz")["cams"]
        np.testing.assert_allclose(saved.astype(np.float32), expected, atol=2e-3)
