"""Segmentation network (4.2, Fig. 7d), multi-scale inference (A.2), the train-seg / infer-seg
stages and ``affinitynet predict``. A tiny registered backbone keeps these fast; one test runs the
real MobileNetV2 for the odd-size check."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_backbone import TinyBackbone
from torch import nn

from affinitynet.config import DEFAULTS
from affinitynet.data.datasets.base import Sample, SegmentationDataset
from affinitynet.engine.checkpoints import save_checkpoint
from affinitynet.errors import TrainingError
from affinitynet.files import load_label_png, save_label_png
from affinitynet.models.backbones import (
    BACKBONES,
    freeze_batchnorm,
    register_backbone,
)
from affinitynet.models.networks import build_segmentation_model
from affinitynet.models.segmentation import SegmentationNet, predict_scores
from affinitynet.predict import overlay, predict_files

TINY = "_test_tiny"


if TINY not in BACKBONES:
    register_backbone(TINY)(lambda output_stride=8, pretrained=True: TinyBackbone(output_stride))

CLASSES = ["background", "red", "blue"]


def _tiny_model(head="resnet38", num_classes=3, seed=0):
    torch.manual_seed(seed)
    return build_segmentation_model(TINY, 8, num_classes, head, pretrained=False)


def _write_checkpoint(path: Path, model: SegmentationNet, **meta_changes) -> Path:
    meta = {"kind": "segmentation", "class_names": CLASSES, "num_classes": 3, "backbone": TINY,
            "output_stride": 8, "head": model.head_name, "mean": list(TinyBackbone.mean),
            "std": list(TinyBackbone.std)}
    meta.update(meta_changes)
    save_checkpoint(path, {"model": model.state_dict(), "meta": meta, "history": []})
    return path


def _scene(seed: int, size: int = 64):
    """Grey background with a red and a blue rectangle on a 16-pixel grid; mask 0/1/2."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 128, np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for cls, colour in ((1, (220, 30, 30)), (2, (30, 30, 220))):
        h, w = (int(v) * 16 for v in rng.integers(1, 3, size=2))
        top, left = (int(v) * 16 for v in rng.integers(0, size // 16 - 1, size=2))
        image[top:top + h, left:left + w] = colour
        mask[top:top + h, left:left + w] = cls
    noise = rng.integers(-6, 7, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8), mask


class PNGDataset(SegmentationDataset):
    def load_mask(self, sample):
        return None if sample.mask_path is None else load_label_png(sample.mask_path)


def _dataset(root: Path, count: int = 4) -> PNGDataset:
    samples = []
    for index in range(count):
        image, mask = _scene(index)
        image_path, mask_path = root / f"img{index}.png", root / f"img{index}_gt.png"
        Image.fromarray(image).save(image_path)
        save_label_png(mask_path, mask)
        labels = tuple(int(c) for c in np.unique(mask) if c)
        samples.append(Sample(f"img{index}", image_path, labels, mask_path))
    return PNGDataset("tiny", root, "train", CLASSES, samples)


# --- the network -------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["resnet38", "deeplab_largefov"])
@pytest.mark.parametrize("size", [(37, 53), (65, 97)])
def test_logits_have_the_input_size_for_odd_sizes(head, size):
    model = _tiny_model(head).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 3, *size)


def test_mobilenetv2_segmentation_output_size_for_odd_sizes():
    model = build_segmentation_model("mobilenetv2", 8, 21, "resnet38", pretrained=False).eval()
    with torch.no_grad():
        for size in [(37, 53), (65, 97)]:
            assert model(torch.randn(1, 3, *size)).shape == (1, 21, *size)


def test_resnet38_head_is_two_atrous_convs_with_dilation_12():
    model = _tiny_model("resnet38")
    convs = [m for m in model.head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.dilation, c.out_channels) for c in convs] == [((3, 3), (12, 12), 512),
                                                                            ((3, 3), (12, 12), 3)]
    assert any(isinstance(m, nn.ReLU) for m in model.head)
    largefov = [m for m in _tiny_model("deeplab_largefov").head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.out_channels) for c in largefov] == [((1, 1), 3)]
    with pytest.raises(ValueError, match="unknown segmentation head"):
        SegmentationNet(TinyBackbone(), 3, head="fcn")


def test_parameter_groups_split_the_model_and_batchnorm_stays_frozen():
    model = _tiny_model()
    new, old = model.new_parameters(), model.backbone_parameters()
    assert {id(p) for p in new}.isdisjoint(id(p) for p in old)
    assert len(new) + len(old) == len(list(model.parameters()))
    model.train()
    freeze_batchnorm(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)


# --- multi-scale inference (A.2) ------------------------------------------------------------------

def test_multiscale_flip_scores_are_the_mean_of_each_version():
    model = _tiny_model().eval()
    # A non-trivial head so that scales and flips give visibly different maps.
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.normal_(0, 0.3)
    image = torch.randn(3, 37, 53)
    scales = [0.5, 1.0, 1.5]
    expected = []
    with torch.no_grad():
        for scale in scales:
            size = (round(37 * scale), round(53 * scale))
            scaled = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
            for mirrored in (False, True):
                x = scaled.flip(-1) if mirrored else scaled
                probs = torch.softmax(model(x), dim=1)
                probs = probs.flip(-1) if mirrored else probs
                expected.append(F.interpolate(probs, size=(37, 53), mode="bilinear", align_corners=False)[0])
    expected = torch.stack(expected)
    assert (expected[0] - expected[-1]).abs().max() > 1e-3  # the versions really differ
    got = predict_scores(model, image, scales, flip=True)
    assert got.shape == (3, 37, 53)
    torch.testing.assert_close(got, expected.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.sum(0), torch.ones(37, 53), atol=1e-5, rtol=0)
    single = predict_scores(model, image, [1.0], flip=False)
    torch.testing.assert_close(single, torch.softmax(model(image[None]), 1)[0], atol=1e-5, rtol=1e-4)


def test_overlay_blends_objects_and_leaves_background():
    image = np.full((4, 6, 3), 100, np.uint8)
    labels = np.zeros((4, 6), np.uint8)
    labels[1:3, 2:4] = 1  # VOC colour of class 1 is (128, 0, 0)
    out = overlay(image, labels)
    assert (out[labels == 0] == 100).all()
    assert tuple(out[1, 2]) == (114, 50, 50)


# --- affinitynet predict --------------------------------------------------------------------------

def test_checkpoint_round_trips_into_predict_files_and_bad_images_are_skipped(tmp_path, capsys):
    ckpt = _write_checkpoint(tmp_path / "model.pt", _tiny_model())
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (65, 97, 3), dtype=np.uint8)).save(images / "sub" / "b.jpg")
    (images / "broken.png").write_bytes(b"not an image at all")
    out = tmp_path / "out"

    code = predict_files(ckpt, [images], out, scales=[0.75, 1.0], flip=True, device="cpu")
    assert code == 0
    for stem, size in (("a", (53, 37)), ("b", (97, 65))):
        mask = Image.open(out / f"{stem}.png")
        assert mask.mode == "P" and mask.size == size
        assert np.asarray(mask).max() < 3
        assert Image.open(out / f"{stem}_overlay.png").size == size
    assert (out / "legend.png").exists()
    assert not (out / "broken.png").exists()
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "skipped" in captured.err
    assert "2 images segmented" in captured.out and "1 skipped" in captured.out

    assert predict_files(ckpt, [images], tmp_path / "strict", device="cpu", strict=True) == 2
    assert predict_files(ckpt, [images / "broken.png"], tmp_path / "none", device="cpu") == 2
    # A missing input is one more skipped line, not a crash.
    assert predict_files(ckpt, [images / "a.png", tmp_path / "nope.png"], tmp_path / "m", device="cpu") == 0
    assert "nope.png: file not found" in capsys.readouterr().err


def test_same_stem_in_two_folders_does_not_overwrite(tmp_path):
    ckpt = _write_checkpoint(tmp_path / "model.pt", _tiny_model("deeplab_largefov"))
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / folder / "same.png")
    assert predict_files(ckpt, [tmp_path / "x", tmp_path / "y"], tmp_path / "out", flip=False, device="cpu") == 0
    assert (tmp_path / "out" / "same.png").exists() and (tmp_path / "out" / "same_png.png").exists()


def test_predict_refuses_a_checkpoint_that_is_not_a_segmentation_model(tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
    cam = _write_checkpoint(tmp_path / "cam.pt", _tiny_model(), kind="cam")
    with pytest.raises(TrainingError, match="not a segmentation model") as caught:
        predict_files(cam, [image], tmp_path / "out", device="cpu")
    assert "\n" not in str(caught.value)
    with pytest.raises(TrainingError, match="checkpoint not found"):
        predict_files(tmp_path / "missing.pt", [image], tmp_path / "out", device="cpu")
    wrong = _write_checkpoint(tmp_path / "wrong.pt", _tiny_model(num_classes=5))
    with pytest.raises(TrainingError, match="do not fit"):
        predict_files(wrong, [image], tmp_path / "out", device="cpu")


# --- train-seg / infer-seg stages -------------------------------------------------------------------

def _config(tmp_path: Path, supervision: str = "gt") -> dict:
    config = copy.deepcopy(DEFAULTS)
    config.update(run_dir=str(tmp_path / "run"), device="cpu", seed=0)
    config["dataset"].update(name="tiny", root=str(tmp_path), train_split="train", eval_split="train")
    config["backbone"].update(name=TINY, output_stride=8, weights=None)
    config["segmentation"].update(supervision=supervision, crop_size=64, scale_range=[1.0, 1.0],
                                  color_jitter=[0.1, 0.1, 0.0, 0.0], batch_size=2, epochs=20,
                                  optimizer="adam", lr=5e-3, new_layer_lr_mult=1.0, weight_decay=0.0,
                                  scales=[1.0], flip=True, crf=False)
    return config


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    data = _dataset(tmp_path)
    import affinitynet.stages.common as steps
    import affinitynet.stages.infer_seg as infer_seg
    from affinitynet.pipeline import all_stages, run_dir

    # Every stage module imported first, so that none binds the replaced function for good.
    all_stages()
    # train-seg reads its images through stages.train_stage.
    for module in (steps, infer_seg):
        monkeypatch.setattr(module, "dataset", lambda config, key: data)
    monkeypatch.setattr(run_dir, "training_split", lambda config: data)   # the run's dataset record
    return data


def test_training_overfits_a_tiny_dataset_and_predicts_its_masks(tmp_path, tiny_data, capsys):
    from affinitynet.stages import infer_seg, train_seg

    config = _config(tmp_path)
    summary = train_seg.run(config)
    model_path = Path(config["run_dir"]) / "train_seg" / "model.pt"
    state = torch.load(model_path, weights_only=True)
    history = state["history"]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert summary["complete"] and summary["images"] == 4
    assert {"class_names", "mean", "std", "backbone", "output_stride", "head", "num_classes"} <= set(state["meta"])

    # The checkpoint alone (no config, no dataset) segments the training images back.
    out = tmp_path / "pred"
    assert predict_files(model_path, [s.image_path for s in tiny_data.samples], out, device="cpu") == 0
    correct = total = 0
    for sample in tiny_data.samples:
        truth = load_label_png(sample.mask_path)
        pred = np.asarray(Image.open(out / f"{sample.image_path.stem}.png"))
        correct += int((pred == truth).sum())
        total += truth.size
    assert correct / total > 0.9

    result = infer_seg.run(config)
    assert result["segmentation"]["miou"] > 70.0
    assert (Path(config["run_dir"]) / "infer_seg" / "predictions" / "img0.png").exists()
    printed = capsys.readouterr().out
    assert "Table 2 layout" in printed and "blue" in printed and "mean" in printed


def test_killed_training_resumes_to_the_same_weights(tmp_path, tiny_data, monkeypatch):
    from affinitynet.stages import common, train_seg

    config = _config(tmp_path)
    config["segmentation"]["epochs"] = 3
    straight = copy.deepcopy(config)
    straight["run_dir"] = str(tmp_path / "straight")
    train_seg.run(straight)
    expected = torch.load(tmp_path / "straight" / "train_seg" / "model.pt", weights_only=True)["model"]

    real_step, calls = common.segmentation_step, []

    def dying_step(model, batch):
        calls.append(1)
        if len(calls) == 5:  # two steps per epoch: dies in epoch 3, after epoch 2's checkpoint
            raise KeyboardInterrupt
        return real_step(model, batch)

    monkeypatch.setattr(common, "segmentation_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_seg.run(config)
    monkeypatch.setattr(common, "segmentation_step", real_step)
    train_seg.run(config)
    resumed = torch.load(Path(config["run_dir"]) / "train_seg" / "model.pt", weights_only=True)
    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3]
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed["model"][name], tensor, msg=name)


def test_pseudo_supervision_reads_the_random_walk_labels(tmp_path, tiny_data):
    from affinitynet.errors import InputError
    from affinitynet.pipeline import training_label_stage
    from affinitynet.stages.common import check_labels_exist, label_loader

    config = _config(tmp_path, "pseudo")
    labels = training_label_stage(config)
    with pytest.raises(TrainingError, match="no pseudo labels"):
        check_labels_exist(config, tiny_data, labels)
    label_dir = labels.output("pseudo_labels", config)
    assert label_dir == Path(config["run_dir"]) / "random_walk" / "pseudo_labels"
    pseudo = np.full((64, 64), 2, np.uint8)
    save_label_png(label_dir / "img0.png", pseudo)
    save_label_png(label_dir / "img1.png", np.full((64, 64), 7, np.uint8))
    check_labels_exist(config, tiny_data, labels)
    load = label_loader(config, tiny_data, labels)
    np.testing.assert_array_equal(load(tiny_data[0]), pseudo)
    with pytest.raises(InputError, match="out of range"):
        load(tiny_data[1])
    with pytest.raises(InputError, match="file not found"):
        load(tiny_data[2])
    gt = label_loader(_config(tmp_path, "gt"), tiny_data, labels)
    np.testing.assert_array_equal(gt(tiny_data[0]), load_label_png(tiny_data[0].mask_path))


def test_a_batch_without_labelled_pixels_gives_a_finite_zero_loss():
    from affinitynet.stages.common import segmentation_step

    model = _tiny_model()
    labels = torch.full((2, 24, 24), 255, dtype=torch.long)
    loss, parts = segmentation_step(model, (torch.randn(2, 3, 24, 24), labels))
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
    loss.backward()  # still differentiable: the training loop calls backward on it
