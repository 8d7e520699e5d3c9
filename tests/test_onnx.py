"""``affinitynet export`` and ``predict`` of the ``.onnx`` file with onnxruntime (issue 39): the
same logits and labels as ``model.pt`` at any size, the meta in the file, and one line for a
missing package or a bad file. A tiny registered backbone keeps these fast."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from tiny_backbone import TinyBackbone
from tiny_pipeline import cli

from affinitynet.data.transforms import normalize
from affinitynet.engine.checkpoints import save_checkpoint
from affinitynet.errors import ExportError
from affinitynet.models.backbones import BACKBONES, register_backbone
from affinitynet.models.networks import build_segmentation_model, model_from_checkpoint
from affinitynet.models.onnx_model import INSTALL_HINT, export_onnx, load_onnx_model, relative_difference
from affinitynet.models.segmentation import predict_labels

TINY = "_test_tiny"
SIZED = "_test_tiny_size_dependent"
CLASSES = ["background", "red", "blue", "green"]
SIZES = [(37, 53), (64, 64), (97, 130)]


class SizeDependentBackbone(TinyBackbone):
    """Scales its input by its width computed in Python: a trace freezes that number, so the ONNX
    graph computes another function at any other width."""

    def forward(self, x):
        return super().forward(x * (float(x.shape[-1]) / 64.0))


if TINY not in BACKBONES:
    register_backbone(TINY)(lambda output_stride=8, pretrained=True: TinyBackbone(output_stride))
if SIZED not in BACKBONES:
    register_backbone(SIZED)(lambda output_stride=8, pretrained=True: SizeDependentBackbone(output_stride))


def _checkpoint(path: Path, backbone: str = TINY, seed: int = 0, **meta_changes) -> Path:
    """A segmentation model.pt whose network gives varied labels, as a trained one does: BatchNorm
    statistics measured on photos (far from the identity: an export in training mode would use
    each batch's own and differ) and random head weights."""
    torch.manual_seed(seed)
    model = build_segmentation_model(backbone, 8, len(CLASSES), "resnet38", pretrained=False)
    with torch.no_grad():
        for name, parameter in model.head.named_parameters():
            parameter.normal_(0, 0.3) if name.endswith("weight") else parameter.zero_()
            # Weights summing to zero over their (ReLU'd, non-negative) inputs: the logits follow
            # the features' pattern rather than their overall level.
            if name.endswith("weight"):
                parameter -= parameter.mean(dim=1, keepdim=True)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None        # the running statistics: the mean over the batches
        model.train()
        model(torch.stack([normalize(_photo(seed + 10, (64, 64)), [0.45, 0.5, 0.55], [0.2, 0.25, 0.3])]))
    meta = {"kind": "segmentation", "class_names": CLASSES, "num_classes": len(CLASSES), "backbone": backbone,
            "output_stride": 8, "head": "resnet38", "atrous": True, "mean": [0.45, 0.5, 0.55],
            "std": [0.2, 0.25, 0.3]}
    meta.update(meta_changes)
    save_checkpoint(path, {"model": model.state_dict(), "meta": meta, "history": []})
    return path


def _photo(seed: int, size: tuple[int, int]) -> np.ndarray:
    """Smooth colour blobs with some noise: regions of one label with boundaries between them, as a
    photo gives, rather than per-pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size[0] // 8 + 2, size[1] // 8 + 2, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize(size[::-1], Image.BILINEAR), dtype=np.int16)
    return np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(model.pt, its export model.onnx)."""
    folder = tmp_path_factory.mktemp("onnx")
    checkpoint = _checkpoint(folder / "model.pt")
    export_onnx(checkpoint, folder / "model.onnx")
    return checkpoint, folder / "model.onnx"


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    return lines[0]


# --- the file ------------------------------------------------------------------------------------

def test_export_records_the_meta_and_leaves_height_and_width_dynamic(exported):
    checkpoint, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    meta = {prop.key: json.loads(prop.value) for prop in proto.metadata_props}
    _, expected = model_from_checkpoint(checkpoint)
    for key in ("class_names", "mean", "std", "output_stride", "backbone", "head", "num_classes", "kind"):
        assert meta[key] == expected[key], key
    assert meta["mean"] == [0.45, 0.5, 0.55] and meta["output_stride"] == 8
    (graph_input,), (graph_output,) = proto.graph.input, proto.graph.output
    dims = graph_input.type.tensor_type.shape.dim
    assert [bool(dims[axis].dim_param) for axis in range(4)] == [True, False, True, True]
    assert dims[1].dim_value == 3
    assert graph_output.type.tensor_type.shape.dim[1].dim_value == len(CLASSES)


@pytest.mark.parametrize("size", SIZES)
def test_onnx_logits_and_labels_match_pytorch(exported, size):
    checkpoint, path = exported
    torch_model, meta = model_from_checkpoint(checkpoint)
    onnx_model, onnx_meta = load_onnx_model(path, "cpu")
    assert onnx_meta["class_names"] == CLASSES
    images = torch.stack([normalize(_photo(seed, size), meta["mean"], meta["std"]) for seed in (1, 2)])
    with torch.no_grad():
        expected = torch_model(images).numpy()
    got = onnx_model(images).numpy()
    assert got.shape == expected.shape == (2, len(CLASSES), *size)
    assert relative_difference(got, expected) < 1e-4

    # The whole of predict's inference (scales, flips, resizing, softmax averaging, argmax), each
    # with the meta its own file carries.
    image = _photo(3, size)
    reference = predict_labels(torch_model, image, meta["mean"], meta["std"], [0.75, 1.0, 1.25], True)
    labels = predict_labels(onnx_model, image, onnx_meta["mean"], onnx_meta["std"], [0.75, 1.0, 1.25], True)
    assert len(np.unique(reference)) >= 3      # varied labels: the comparison means something
    assert (labels == reference).mean() >= 0.999


def test_export_refuses_a_graph_that_differs_from_pytorch(tmp_path):
    checkpoint = _checkpoint(tmp_path / "model.pt", backbone=SIZED)
    with pytest.raises(ExportError, match="differ from PyTorch's") as caught:
        export_onnx(checkpoint, tmp_path / "model.onnx")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "model.onnx").exists()


# --- affinitynet export / predict -----------------------------------------------------------------

def test_predict_with_the_onnx_file_writes_what_model_pt_writes(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path / "run" / "train_seg" / "model.pt", seed=1)
    model_file = tmp_path / "deploy" / "model.onnx"
    code, out, err = cli(["export", str(checkpoint), "--out", str(model_file)], capsys)
    assert code == 0, err
    assert f"to {model_file}" in out and model_file.is_file()
    images = tmp_path / "images"
    images.mkdir()
    for seed, size in enumerate(SIZES):
        Image.fromarray(_photo(seed, size)).save(images / f"photo{seed}.png")

    outputs = {}
    for name, model in (("pt", checkpoint), ("onnx", model_file)):
        outputs[name] = tmp_path / f"out_{name}"
        code, out, err = cli(["predict", str(model), str(images), "--out", str(outputs[name]), "--scales", "0.75", "1",
                              "--device", "cpu"], capsys)
        assert code == 0, err
        assert "3 images segmented" in out
    written = sorted(p.name for p in outputs["pt"].iterdir())
    assert written == sorted(p.name for p in outputs["onnx"].iterdir())
    assert len(written) == 7                     # 3 masks, 3 overlays, the legend
    assert (outputs["pt"] / "legend.png").read_bytes() == (outputs["onnx"] / "legend.png").read_bytes()
    for seed, size in enumerate(SIZES):
        reference = np.asarray(Image.open(outputs["pt"] / f"photo{seed}.png"))
        labels = np.asarray(Image.open(outputs["onnx"] / f"photo{seed}.png"))
        assert labels.shape == reference.shape == size
        assert len(np.unique(reference)) >= 3
        assert (labels == reference).mean() >= 0.999


# --- one line for what is wrong, nothing written ---------------------------------------------------

def test_without_the_packages_export_and_onnx_predict_say_what_to_install(exported, tmp_path, capsys, monkeypatch):
    checkpoint, model_file = exported
    image = tmp_path / "a.png"
    Image.fromarray(_photo(0, (20, 30))).save(image)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)      # `import onnxruntime` raises ImportError
    code, _, err = cli(["predict", str(model_file), str(image), "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    line = _one_line(err)
    assert INSTALL_HINT in line and "onnxruntime" in line
    assert not (tmp_path / "out").exists()
    # model.pt needs neither.
    code, _, err = cli(["predict", str(checkpoint), str(image), "--out", str(tmp_path / "pt"), "--device", "cpu"],
                       capsys)
    assert code == 0, err

    monkeypatch.setitem(sys.modules, "onnx", None)
    code, _, err = cli(["export", str(checkpoint), "--out", str(tmp_path / "new.onnx")], capsys)
    assert code == 2
    assert INSTALL_HINT in _one_line(err)
    assert not (tmp_path / "new.onnx").exists()


def test_a_bad_onnx_file_is_one_line_naming_it(exported, tmp_path, capsys):
    _, model_file = exported
    image = tmp_path / "a.png"
    Image.fromarray(_photo(0, (20, 30))).save(image)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not an onnx model at all" * 10)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_file.read_bytes()[:2000])
    bare = tmp_path / "bare.onnx"                 # a valid graph, but not affinitynet's export
    proto = onnx.load(str(model_file))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    cases = {garbage: "not a readable ONNX model", truncated: "not a readable ONNX model",
             bare: "an ONNX model without affinitynet's metadata", tmp_path / "missing.onnx": "ONNX model not found"}
    for path, problem in cases.items():
        out = tmp_path / f"out_{path.stem}"
        code, _, err = cli(["predict", str(path), str(image), "--out", str(out)], capsys)
        assert code == 2, path
        line = _one_line(err)
        assert f"{path}: {problem}" in line, line
        assert not out.exists()


def test_export_refuses_bad_inputs_before_writing(exported, tmp_path, capsys):
    checkpoint, _ = exported
    cam = _checkpoint(tmp_path / "cam.pt", kind="cam")
    (tmp_path / "folder.onnx").mkdir()
    cases = [
        ([str(checkpoint), "--out", str(tmp_path / "model.txt")], "must end in .onnx"),
        ([str(checkpoint), "--out", str(tmp_path / "folder.onnx")], "is a directory"),
        ([str(cam), "--out", str(tmp_path / "cam.onnx")], "not a segmentation model"),
        ([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "nope.onnx")], "checkpoint not found"),
    ]
    for args, problem in cases:
        code, _, err = cli(["export", *args], capsys)
        assert code == 2, args
        assert problem in _one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cam.pt", "folder.onnx"]
    assert not any((tmp_path / "folder.onnx").iterdir())
