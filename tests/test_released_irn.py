"""``import-weights irn-irn``: irn's res50_irn.pth (net/resnet50_irn.py, EdgeDisplacement) as the
finished ``train-irn`` stage. The file is built from irn's layout: its key names (with the aliases
its Net registers and the buffers of the loss module that train_irn.py saves) and shapes, random
weights, the branches at half irn's widths (``slim_irn``) on the full ResNet-50. The imported
network computes irn's ``Net.forward`` (written here from its steps), and the IRN stages run on it
in irn's modes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_pipeline as tiny
import torch
import torch.nn.functional as F
from test_released import _Weights, irn_cam_file, irn_resnet50

from affinitynet.models import irnet
from affinitynet.pipeline import stage_hash

# irn's widths halved: (channels, GroupNorm groups).
SLIM = {"IRN_BOUNDARY": (16, 4), "IRN_DISPLACEMENT": ((32, 8), (64, 16), (128, 16), (128, 16), (128, 16)),
        "IRN_DISPLACEMENT_MIX": (128, 16), "IRN_DISPLACEMENT_OUT": (128, 16)}
LEVELS = (64, 256, 512, 1024, 2048)


@pytest.fixture()
def slim_irn(monkeypatch):
    for name, value in SLIM.items():
        monkeypatch.setattr(irnet, name, value)


def irn_irn_file(path: Path, seed: int = 30) -> Path:
    """res50_irn.pth as irn's train_irn.py saves it: AffinityDisplacementLoss's state dict."""
    w = _Weights(seed)
    g = w.generator
    resnet = irn_resnet50(w)
    state = {f"resnet50.{k}": v for k, v in resnet.items()}
    stage_of = {"conv1": ("stage1.0", 0), "bn1": ("stage1.1", 0), "layer1": ("stage2.0", 1),
                "layer2": ("stage3.0", 2), "layer3": ("stage4.0", 3), "layer4": ("stage5.0", 4)}
    for key, value in resnet.items():
        head, rest = key.split(".", 1)
        alias, index = stage_of[head]
        state[f"{alias}.{rest}"] = value
        state[f"backbone.{index}.{alias.split('.', 1)[1]}.{rest}"] = value

    def unit(name, cin, cout, alias):
        state[f"{name}.0.weight"] = state[f"{alias}.0.weight"] = w.conv(cout, cin, 1)
        state[f"{name}.1.weight"] = state[f"{alias}.1.weight"] = 1 + 0.1 * torch.randn(cout, generator=g)
        state[f"{name}.1.bias"] = state[f"{alias}.1.bias"] = 0.1 * torch.randn(cout, generator=g)

    edge, _ = SLIM["IRN_BOUNDARY"]
    for i, cin in enumerate(LEVELS):
        unit(f"fc_edge{i + 1}", cin, edge, f"edge_layers.{i}")
    state["fc_edge6.weight"] = state["edge_layers.5.weight"] = w.conv(1, 5 * edge, 1)
    state["fc_edge6.bias"] = state["edge_layers.5.bias"] = torch.randn(1, generator=g)
    widths = [c for c, _ in SLIM["IRN_DISPLACEMENT"]]
    for i, (cin, cout) in enumerate(zip(LEVELS, widths)):
        unit(f"fc_dp{i + 1}", cin, cout, f"dp_layers.{i}")
    mix, _ = SLIM["IRN_DISPLACEMENT_MIX"]
    out, _ = SLIM["IRN_DISPLACEMENT_OUT"]
    unit("fc_dp6", sum(widths[2:]), mix, "dp_layers.5")
    unit("fc_dp7", sum(widths[:2]) + mix, out, "dp_layers.6")
    state["fc_dp7.3.weight"] = state["dp_layers.6.3.weight"] = w.conv(2, out, 1, gain=0.5)
    mean = torch.tensor([0.3, -0.2])
    state["mean_shift.running_mean"] = state["fc_dp7.4.running_mean"] = state["dp_layers.6.4.running_mean"] = mean
    # AffinityDisplacementLoss's buffers (EdgeDisplacement ignores them: strict=False).
    for i in range(3):
        state[f"path_indices{i}"] = torch.zeros(4, i + 1, 10, dtype=torch.int64)
    state["disp_target"] = torch.zeros(1, 2, 34, 1)
    torch.save({k: v.clone() for k, v in state.items()}, path)
    return path


def irn_forward(state, levels):
    """irn's Net.forward from its steps, on the released state dict: ResNet-50's levels (the stem
    max-pooled to stride 4), units conv - GroupNorm - (upsample) - ReLU, cropped."""
    x1 = F.max_pool2d(levels[0], 3, 2, 1)
    x2, x3, x4, x5 = levels[1:]

    def unit(name, x, groups, up=1):
        x = F.conv2d(x, state[f"{name}.0.weight"])
        x = F.group_norm(x, groups, state[f"{name}.1.weight"], state[f"{name}.1.bias"])
        if up > 1:
            x = F.interpolate(x, scale_factor=up, mode="bilinear", align_corners=False)
        return F.relu(x)

    edge1, edge2 = unit("fc_edge1", x1, 4), unit("fc_edge2", x2, 4)
    h, w = edge2.shape[-2:]
    edge3 = unit("fc_edge3", x3, 4, 2)[..., :h, :w]
    edge4 = unit("fc_edge4", x4, 4, 4)[..., :h, :w]
    edge5 = unit("fc_edge5", x5, 4, 4)[..., :h, :w]
    edge_out = F.conv2d(torch.cat([edge1, edge2, edge3, edge4, edge5], 1), state["fc_edge6.weight"],
                        state["fc_edge6.bias"])
    dp1, dp2, dp3 = unit("fc_dp1", x1, 8), unit("fc_dp2", x2, 16), unit("fc_dp3", x3, 16)
    dp4 = unit("fc_dp4", x4, 16, 2)[..., :dp3.size(2), :dp3.size(3)]
    dp5 = unit("fc_dp5", x5, 16, 2)[..., :dp3.size(2), :dp3.size(3)]
    dp_up3 = unit("fc_dp6", torch.cat([dp3, dp4, dp5], 1), 16, 2)[..., :dp2.size(2), :dp2.size(3)]
    dp = unit("fc_dp7", torch.cat([dp1, dp2, dp_up3], 1), 16)
    dp = F.conv2d(dp, state["fc_dp7.3.weight"]) - state["mean_shift.running_mean"].view(1, 2, 1, 1)
    return edge_out, dp


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("released-irn-data") / "data"
    assert tiny.cli(["datasets", "generate", "--config", "demo", *tiny.overrides(root.parent / "run", root)])[0] == 0
    return root


def _import(kind, file, run, data_root, capsys, *extra):
    return tiny.cli(["import-weights", kind, str(file), "--config", "demo",
                     *tiny.overrides(run, data_root, *extra)], capsys)


def test_irn_irn_is_irns_network_and_the_irn_stages_run_on_it(tmp_path, data, capsys, slim_irn):
    from affinitynet.config import load_config
    from affinitynet.stages.common import load_network

    run = tmp_path / "run"
    file = irn_irn_file(tmp_path / "res50_irn.pth")
    extra = ("labels.method=irn", "irn.background=threshold", "affinity.confidence=threshold", 'irn.crf="off"')
    code, out, err = _import("irn-irn", file, run, data, capsys, *extra)
    assert (code, err) == (0, ""), err
    assert ("backbone.name=resnet50, backbone.output_stride=16, backbone.atrous=false, irn.layout=irn "
            "(the network of irn's res50_irn.pth)") in out
    config = load_config(run / "config.yaml")
    state = json.loads((run / "train_irn" / "_stage.json").read_text())
    assert state["complete"] is True and state["hash"] == stage_hash(config, "train_irn")
    assert state["imported"]["kind"] == "irn-irn"
    saved = torch.load(run / "train_irn" / "model.pt", weights_only=True)
    released = torch.load(file, weights_only=True)
    assert saved["meta"]["layout"] == "irn" and saved["meta"]["atrous"] is False
    for ours, theirs in (("boundary_units.2.0.weight", "fc_edge3.0.weight"), ("boundary_out.bias", "fc_edge6.bias"),
                         ("displacement_units.4.1.bias", "fc_dp5.1.bias"), ("displacement_mix.0.weight", "fc_dp6.0.weight"),
                         ("displacement_out.3.weight", "fc_dp7.3.weight"), ("displacement_mean", "mean_shift.running_mean"),
                         ("backbone.layer4.2.conv2.weight", "resnet50.layer4.2.conv2.weight")):
        assert torch.equal(saved["model"][ours], released[theirs]), ours

    # The imported network computes irn's Net.forward (eval: the mean shift subtracted), on an
    # image irn would pad to a multiple of 16 and on one it would not.
    model = load_network("irn", config, torch.device("cpu"), 6)
    for size in ((64, 80), (61, 75)):
        images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[1]))
        with torch.no_grad():
            boundary, displacement = model(images)
            levels = model.backbone(images)
            edge, dp = irn_forward(released, levels)
        assert boundary.shape == (2, 1, -(-size[0] // 4), -(-size[1] // 4))
        torch.testing.assert_close(boundary, edge, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(displacement, dp, rtol=1e-4, atol=1e-5)

    # irn's CAMs and IRNet: the IRN stages in irn's modes, nothing trained.
    cam_file = irn_cam_file(tmp_path / "res50_cam.pth", classes=5)
    code, out, err = tiny.cli(["import-weights", "irn-cam", str(cam_file), "--config", str(run / "config.yaml")],
                              capsys)
    assert (code, err) == (0, ""), err
    assert json.loads((run / "train_irn" / "_stage.json").read_text())["complete"] is True
    for command in ("infer-cam", "irn-walk", "irn-instances"):
        code, out, err = tiny.cli([command, "--config", str(run / "config.yaml")], capsys)
        assert code == 0, f"{command}: {err}"
    assert len(list((run / "irn_walk" / "pseudo_labels").glob("*.png"))) == 12
    assert len(list((run / "irn_instances" / "detections").glob("*.json"))) == 12
    assert not (run / "confident_regions").exists()


def test_a_file_of_another_layout_is_refused_in_one_line(tmp_path, data, capsys, slim_irn):
    file = irn_irn_file(tmp_path / "res50_irn.pth")
    state = torch.load(file, weights_only=True)
    del state["fc_dp7.3.weight"]
    state["fc_dp8.weight"] = torch.zeros(2, 2, 1, 1)
    torch.save(state, file)
    code, out, err = _import("irn-irn", file, tmp_path / "run", data, capsys)
    assert code != 0
    assert "is not irn's res50_irn.pth (irn-irn): 1 missing keys: fc_dp7.3.weight; 1 unexpected keys: fc_dp8.weight" \
        in err, err
    assert len(err.strip().splitlines()) == 1
