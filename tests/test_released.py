"""``affinitynet import-weights``: the authors' released checkpoints (psa's res38_cls.pth and
resnet38_aff.pth, irn's res50_cam.pth) as finished training stages of a run.

The files are written here in the released key layout from a description of the authors'
networks (psa ``network/resnet38d.py``, ``resnet38_cls.py``, ``resnet38_aff.py``; irn
``net/resnet50.py``, ``resnet50_cam.py``), not from this project's modules, with random weights.
The full-size ResNet-38 (105M parameters) is used where only the import runs; the pipeline runs
on a ResNet-38 with every width divided by 16 (same units, keys and structure).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from pathlib import Path

import pytest
import tiny_pipeline as tiny
import torch

from affinitynet.models.backbones import resnet38d
from affinitynet.pipeline import stage_hash


# psa's ResNet-38 units: (name, in, mid, out, has conv_branch1); bottlenecks (name, in, out).
def _psa_units(scale: int = 1):
    c = lambda n: n // scale  # noqa: E731
    residual = [("b2", 64, 128, 128, True), ("b2_1", 128, 128, 128, False), ("b2_2", 128, 128, 128, False),
                ("b3", 128, 256, 256, True), ("b3_1", 256, 256, 256, False), ("b3_2", 256, 256, 256, False),
                ("b4", 256, 512, 512, True)] + [(f"b4_{i}", 512, 512, 512, False) for i in range(1, 6)] + \
               [("b5", 512, 512, 1024, True), ("b5_1", 1024, 512, 1024, False), ("b5_2", 1024, 512, 1024, False)]
    residual = [(n, c(i), c(m), c(o), b) for n, i, m, o, b in residual]
    bottleneck = [("b6", c(1024), c(2048)), ("b7", c(2048), c(4096))]
    return c(64), residual, bottleneck


class _Weights:
    """Weights for released-layout files: random (He-initialised convs, BatchNorm with real
    statistics), or, with ``distinct=True``, one constant per tensor stored as a stride-0 view
    (a full-size file of a few kilobytes whose every tensor can still be told apart)."""

    def __init__(self, seed: int, distinct: bool = False):
        self.generator = torch.Generator().manual_seed(seed)
        self.distinct = distinct
        self.count = 0

    def _make(self, shape, draw):
        self.count += 1
        if self.distinct:
            return torch.full((1,) * len(shape), float(self.count)).expand(shape)
        return draw()

    def conv(self, cout, cin, k, gain=1.0):
        scale = gain * (2.0 / (cin * k * k)) ** 0.5
        return self._make((cout, cin, k, k), lambda: torch.randn(cout, cin, k, k, generator=self.generator) * scale)

    def bn(self, prefix, channels, state, tracked=False):
        g = self.generator
        state[f"{prefix}.weight"] = self._make((channels,), lambda: 1 + 0.1 * torch.randn(channels, generator=g))
        state[f"{prefix}.bias"] = self._make((channels,), lambda: 0.1 * torch.randn(channels, generator=g))
        state[f"{prefix}.running_mean"] = self._make((channels,), lambda: 0.1 * torch.randn(channels, generator=g))
        state[f"{prefix}.running_var"] = self._make((channels,), lambda: 0.5 + torch.rand(channels, generator=g))
        if tracked:
            state[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)


def psa_backbone(scale: int = 1, seed: int = 0, weights: _Weights | None = None) -> dict[str, torch.Tensor]:
    """psa's resnet38d.Net state dict as PyTorch 0.4.0 saved it (no num_batches_tracked)."""
    w = weights or _Weights(seed)
    stem, residual, bottleneck = _psa_units(scale)
    state = {"conv1a.weight": w.conv(stem, 3, 3)}
    for name, cin, mid, cout, branch1 in residual:
        w.bn(f"{name}.bn_branch2a", cin, state)
        state[f"{name}.conv_branch2a.weight"] = w.conv(mid, cin, 3)
        w.bn(f"{name}.bn_branch2b1", mid, state)
        state[f"{name}.conv_branch2b1.weight"] = w.conv(cout, mid, 3)
        if branch1:
            state[f"{name}.conv_branch1.weight"] = w.conv(cout, cin, 1)
    for name, cin, cout in bottleneck:
        w.bn(f"{name}.bn_branch2a", cin, state)
        state[f"{name}.conv_branch2a.weight"] = w.conv(cout // 4, cin, 1)
        w.bn(f"{name}.bn_branch2b1", cout // 4, state)
        state[f"{name}.conv_branch2b1.weight"] = w.conv(cout // 2, cout // 4, 3)
        w.bn(f"{name}.bn_branch2b2", cout // 2, state)
        state[f"{name}.conv_branch2b2.weight"] = w.conv(cout, cout // 2, 1)
        state[f"{name}.conv_branch1.weight"] = w.conv(cout, cin, 1)
    w.bn("bn7", bottleneck[-1][2], state)
    return state


def psa_cam_file(path: Path, classes: int, scale: int = 1, seed: int = 0, distinct: bool = False) -> Path:
    """res38_cls.pth: the backbone and fc8 (classes x 4096, no bias)."""
    w = _Weights(seed, distinct)
    state = psa_backbone(scale, weights=w)
    state["fc8.weight"] = w.conv(classes, 4096 // scale, 1, gain=0.05)
    torch.save(state, path)
    return path


def psa_aff_file(path: Path, scale: int = 1, seed: int = 10, distinct: bool = False) -> Path:
    """resnet38_aff.pth: the backbone, f8_3/f8_4/f8_5 (512/1024/4096 -> 64/128/256) and f9 (448)."""
    w = _Weights(seed, distinct)
    state = psa_backbone(scale, weights=w)
    for name, cin, cout in (("f8_3", 512 // scale, 64), ("f8_4", 1024 // scale, 128), ("f8_5", 4096 // scale, 256)):
        state[f"{name}.weight"] = w.conv(cout, cin, 1)
    state["f9.weight"] = w.conv(448, 448, 1, gain=0.5)
    torch.save(state, path)
    return path


def irn_resnet50(w: _Weights) -> dict[str, torch.Tensor]:
    """irn's torchvision-style ResNet-50 (net/resnet50.py), as its Nets hold it under ``resnet50.``."""
    resnet: dict[str, torch.Tensor] = {"conv1.weight": w.conv(64, 3, 7)}
    w.bn("bn1", 64, resnet, tracked=True)
    cin = 64
    for layer, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for block in range(blocks):
            p = f"layer{layer}.{block}"
            resnet[f"{p}.conv1.weight"] = w.conv(width, cin, 1)
            w.bn(f"{p}.bn1", width, resnet, tracked=True)
            resnet[f"{p}.conv2.weight"] = w.conv(width, width, 3)
            w.bn(f"{p}.bn2", width, resnet, tracked=True)
            resnet[f"{p}.conv3.weight"] = w.conv(width * 4, width, 1, gain=0.2)
            w.bn(f"{p}.bn3", width * 4, resnet, tracked=True)
            if block == 0:
                resnet[f"{p}.downsample.0.weight"] = w.conv(width * 4, cin, 1)
                w.bn(f"{p}.downsample.1", width * 4, resnet, tracked=True)
            cin = width * 4
    return resnet


def irn_cam_file(path: Path, classes: int, seed: int = 20) -> Path:
    """res50_cam.pth: irn's Net registers its torchvision-style ResNet-50 as ``resnet50`` and the
    same modules again as stage1..4 and ``backbone``; the classifier also as ``newly_added``."""
    w = _Weights(seed)
    resnet = irn_resnet50(w)
    classifier = w.conv(classes, 2048, 1, gain=0.05)
    state = {f"resnet50.{k}": v for k, v in resnet.items()}
    stage_of = {"conv1": "stage1.0", "bn1": "stage1.1", "layer1": "stage1.4", "layer2": "stage2.0",
                "layer3": "stage3.0", "layer4": "stage4.0"}
    for key, value in resnet.items():
        head, rest = key.split(".", 1)
        alias = stage_of[head]
        state[f"{alias}.{rest}"] = value
        state[f"backbone.{int(alias[5]) - 1}.{alias.split('.', 1)[1]}.{rest}"] = value
    state["classifier.weight"] = classifier
    state["newly_added.0.weight"] = classifier
    torch.save(state, path)
    return path


@pytest.fixture()
def slim_resnet38(monkeypatch):
    """ResNet-38 with every width divided by 16: the units, keys and dilations of the real one."""
    levels = tuple((names, cin // 16, mid // 16, cout // 16) for names, cin, mid, cout in resnet38d._RESIDUAL_LEVELS)
    bottlenecks = tuple((name, cin // 16, cout // 16, p) for name, cin, cout, p in resnet38d._BOTTLENECK_LEVELS)
    monkeypatch.setattr(resnet38d, "_RESIDUAL_LEVELS", levels)
    monkeypatch.setattr(resnet38d, "_BOTTLENECK_LEVELS", bottlenecks)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The tiny demo dataset, generated once for the module."""
    root = tmp_path_factory.mktemp("released-data") / "data"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert tiny.cli(["datasets", "generate", "--config", "demo", *tiny.overrides(root.parent / "run", root)])[0] == 0
    return root


def _stage(run: Path, name: str) -> dict:
    return json.loads((run / name / "_stage.json").read_text())


def _import(kind, file, run, data_root, capsys, *extra):
    return tiny.cli(["import-weights", kind, str(file), "--config", "demo",
                     *tiny.overrides(run, data_root, *extra)], capsys)


# --- the full-size files -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["psa-cam", "psa-aff"])
def test_full_size_psa_files_land_where_psa_had_them(tmp_path, kind):
    """Every tensor of a full-size released file (105M parameters; psa's real widths: fc8 on
    4096 channels, f8_3/f8_4/f8_5 on 512/1024/4096) lands in the real ResNet-38 network."""
    from affinitynet.config import load_config
    from affinitynet.models.networks import build_network
    from affinitynet.released import apply_layout, mapped_state

    config = load_config("demo", check=False)
    apply_layout(config, kind)
    if kind == "psa-cam":
        file = psa_cam_file(tmp_path / "res38_cls.pth", classes=20, distinct=True)
        renames = {"fc8.": "classifier."}
        with torch.device("meta"):
            model = build_network("cam", config, 21, pretrained=False)
    else:
        file = psa_aff_file(tmp_path / "resnet38_aff.pth", distinct=True)
        renames = {"f8_3.": "reducers.0.", "f8_4.": "reducers.1.", "f8_5.": "reducers.2.", "f9.": "adapt."}
        with torch.device("meta"):
            model = build_network("affinity", config, 21, pretrained=False)
    released = torch.load(file, weights_only=True)
    state = mapped_state(kind, file, released, model)
    assert set(state) == set(model.state_dict())
    for key, value in released.items():
        ours = next((new + key[len(old):] for old, new in renames.items() if key.startswith(old)), "backbone." + key)
        assert state[ours] is value, key
    tracked = [k for k in state if k.endswith("num_batches_tracked")]   # absent in psa's files: 0
    assert len(tracked) == 37 and all(int(state[k]) == 0 for k in tracked)


def test_psa_has_20_classes_and_a_demo_run_has_5(tmp_path, data, capsys):
    cam_file = psa_cam_file(tmp_path / "res38_cls.pth", classes=20, scale=16)
    code, out, err = _import("psa-cam", cam_file, tmp_path / "run", data, capsys)
    assert code == 2
    assert err == (f"affinitynet: error: '{cam_file}' is not psa's res38_cls.pth (psa-cam): its fc8.weight "
                   f"(20, 256, 1, 1) scores 20 classes but dataset 'demo' has 5 object classes (the released "
                   f"files are for PASCAL VOC's 20: --config voc12)\n")
    assert not (tmp_path / "run" / "train_cam").exists()


# --- bad files, one line each, nothing written ----------------------------------------------------

def test_bad_files_are_one_line_and_write_nothing(tmp_path, data, capsys, slim_resnet38):
    run = tmp_path / "run"
    aff_file = psa_aff_file(tmp_path / "resnet38_aff.pth", scale=16)
    code, _, err = _import("psa-cam", aff_file, run, data, capsys)
    assert code == 2
    assert err == (f"affinitynet: error: '{aff_file}' is not psa's res38_cls.pth (psa-cam): 1 missing keys: "
                   f"fc8.weight; 4 unexpected keys: f8_3.weight, f8_4.weight, f8_5.weight, f9.weight\n")

    cam_file = psa_cam_file(tmp_path / "res38_cls.pth", classes=5, scale=16)
    code, _, err = _import("psa-aff", cam_file, run, data, capsys)
    assert code == 2 and err.startswith(f"affinitynet: error: '{cam_file}' is not psa's resnet38_aff.pth "
                                        f"(psa-aff): 4 missing keys: f8_3.weight, f8_4.weight, f8_5.weight, "
                                        f"f9.weight; 1 unexpected keys: fc8.weight\n")

    full = psa_cam_file(tmp_path / "full.pth", classes=5, distinct=True)   # a full-size file into the slim net
    code, _, err = _import("psa-cam", full, run, data, capsys)
    assert code == 2 and "keys of another shape: conv1a.weight (64, 3, 3, 3) (needs (4, 3, 3, 3))" in err

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(cam_file.read_bytes()[:5000])
    code, _, err = _import("psa-cam", truncated, run, data, capsys)
    assert code == 2 and err.startswith(f"affinitynet: error: weight file '{truncated}' could not be read: "
                                        f"it is truncated or corrupt")
    assert err.count("\n") == 1

    code, _, err = _import("psa-cam", tmp_path / "absent.pth", run, data, capsys)
    assert (code, err) == (2, f"affinitynet: error: weight file '{tmp_path / 'absent.pth'}' does not exist "
                              f"(or is not a file)\n")

    code, _, err = _import("psa-cam", cam_file, run, data, capsys, "cam.head=conv")
    assert (code, err) == (2, "affinitynet: error: command line: cam.head=conv does not fit psa's res38_cls.pth, "
                              "whose network has cam.head=psa (import-weights psa-cam sets it)\n")
    assert not run.exists()


def test_a_model_pt_of_another_layout_is_refused_in_one_line(tmp_path):
    from affinitynet.errors import TrainingError
    from affinitynet.models.networks import check_meta

    with pytest.raises(TrainingError) as caught:
        check_meta(tmp_path / "model.pt", {"head": "psa"}, command="train-cam",
                         layout={"head": ("cam.head", "irn")})
    assert str(caught.value) == (f"{tmp_path / 'model.pt'}: made with cam.head=psa but the config has "
                                 f"cam.head=irn; retrain it (affinitynet train-cam --force) or set cam.head=psa")
    check_meta(tmp_path / "model.pt", {}, layout={"head": ("cam.head", "irn")})   # older meta: no check


# --- imported stages feed the pipeline --------------------------------------------------------------

def test_imported_psa_networks_run_through_the_stages(tmp_path, data, capsys, slim_resnet38):
    """psa-cam and psa-aff imported; `run` skips both trainings and confident regions (read only
    by the imported AffinityNet), and runs infer-cam, random-walk, train-seg (1 step), infer-seg."""
    from affinitynet.config import load_config

    run = tmp_path / "run"
    # The segmentation network starts from ImageNet weights (here: random ones in psa's layout).
    imagenet = tmp_path / "resnet38_imagenet.pth"
    torch.save(psa_backbone(scale=16, seed=5), imagenet)
    seg = ("segmentation.epochs=1", "segmentation.batch_size=12", f"backbone.weights={imagenet}")
    cam_file = psa_cam_file(tmp_path / "res38_cls.pth", classes=5, scale=16)
    aff_file = psa_aff_file(tmp_path / "resnet38_aff.pth", scale=16)
    code, out, err = _import("psa-aff", aff_file, run, data, capsys, *seg)
    assert (code, err) == (0, ""), err
    assert "import-weights: backbone.name=resnet38d, affinity.channels=[64,128,256]" in out
    code, out, err = _import("psa-cam", cam_file, run, data, capsys, *seg)
    assert (code, err) == (0, ""), err
    assert ("import-weights: backbone.name=resnet38d, affinity.channels=[64,128,256], cam.head=psa "
            "(the network of psa's res38_cls.pth and of the imported psa-aff)") in out
    cam_model = (run / "train_cam" / "model.pt").read_bytes()

    config = load_config(run / "config.yaml")
    assert config["cam"]["head"] == "psa" and config["affinity"]["channels"] == [64, 128, 256]
    for stage, file, kind in (("train_cam", cam_file, "psa-cam"), ("train_affinity", aff_file, "psa-aff")):
        marker = _stage(run, stage)
        assert marker["complete"] is True and marker["hash"] == stage_hash(config, stage)
        assert marker["imported"]["file"] == str(file.resolve()) and marker["imported"]["kind"] == kind
        saved = torch.load(run / stage / "model.pt", weights_only=True)
        assert set(saved) == {"model", "meta", "history"}
        meta = saved["meta"]
        assert meta["kind"] == ("cam" if stage == "train_cam" else "affinity")
        assert meta["backbone"] == "resnet38d" and meta["class_names"][0] == "background"
        assert meta["imported"]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert torch.load(run / "train_cam" / "model.pt", weights_only=True)["meta"]["head"] == "psa"

    code, out, err = tiny.cli(["run", "--config", str(run / "config.yaml")], capsys)
    assert code == 0, err
    assert "[train_cam] up to date, skipped" in out
    assert "[confident_regions] not needed (train_affinity up to date), skipped" in out
    assert "[train_affinity] up to date, skipped" in out
    assert not (run / "confident_regions").exists()
    for stage in ("infer_cam", "random_walk", "train_seg", "infer_seg", "evaluate_run"):
        assert _stage(run, stage)["complete"] is True, stage
    assert (run / "train_cam" / "model.pt").read_bytes() == cam_model
    assert len(list((run / "random_walk" / "pseudo_labels").glob("*.png"))) == 12
    assert sum(1 for _ in open(run / "train_seg" / "log.csv")) == 2   # header + one epoch of one step
    assert "Table 1" in out and "CAM+RW" in out
    assert tiny.cli(["report", str(run)], capsys)[0] == 0
    html = (run / "report" / "index.html").read_text()
    assert "imported = psa-cam (res38_cls.pth)" in html and "train_affinity: weights imported (psa-aff" in html

    # Other CAM weights: the stages made from the old ones are out of date, AffinityNet is kept.
    psa_cam_file(cam_file, classes=5, scale=16, seed=7)
    code, out, err = _import("psa-cam", cam_file, run, data, capsys, *seg)
    assert code == 0, err
    assert ("import-weights: out of date now, redone by the next run: infer_cam, random_walk, train_seg, "
            "infer_seg, evaluate_run") in out
    assert _stage(run, "infer_cam")["hash"] is None and _stage(run, "train_affinity")["complete"] is True
    code, out, err = tiny.cli(["infer-cam", "--config", str(run / "config.yaml")], capsys)
    assert code == 0, err
    assert re.search(r"\[infer_cam\] [\d.]+s, 12 images, 0 skipped", out), out


def test_irn_cam_is_an_undilated_resnet50_at_stride_16(tmp_path, data, capsys):
    from affinitynet.config import load_config

    run = tmp_path / "run"
    file = irn_cam_file(tmp_path / "res50_cam.pth", classes=5)
    code, out, err = _import("irn-cam", file, run, data, capsys)
    assert (code, err) == (0, ""), err
    assert ("backbone.name=resnet50, backbone.output_stride=16, backbone.atrous=false, cam.head=irn "
            "(the network of irn's res50_cam.pth)") in out
    config = load_config(run / "config.yaml")
    assert _stage(run, "train_cam")["hash"] == stage_hash(config, "train_cam")
    saved = torch.load(run / "train_cam" / "model.pt", weights_only=True)
    released = torch.load(file, weights_only=True)
    assert torch.equal(saved["model"]["classifier.weight"], released["classifier.weight"])
    assert torch.equal(saved["model"]["backbone.layer4.2.conv2.weight"], released["resnet50.layer4.2.conv2.weight"])
    assert saved["meta"]["atrous"] is False and saved["meta"]["head"] == "irn"
    code, out, err = tiny.cli(["infer-cam", "--config", str(run / "config.yaml")], capsys)
    assert code == 0, err
    assert len(list((run / "infer_cam" / "cams").glob("*.npz"))) == 12
