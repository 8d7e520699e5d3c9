"""Bad checkpoints where the pipeline and ``affinitynet predict`` load models: truncated files,
files of another backbone, pickles that would run code, models trained on other classes, files
that are not model checkpoints at all. Each is one line ``affinitynet: error: <file>: <problem>``
and exit code 2, and nothing is written from it.

The ImageNet weight files of the backbones themselves (``read_state_dict``,
``load_state_dict_file``) are covered at the function level by ``test_backbones.py``
(test_truncated_file_is_reported, test_another_backbones_file_is_rejected,
test_code_executing_pickle_is_refused, ...); here they are checked once more through the CLI only.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_pipeline as tiny
import torch

from affinitynet.models.backbones import create_backbone

OTHER_BACKBONE = "efficientnet_lite0"
REFUSED = "refused: the file holds Python objects beyond tensors (unsafe to unpickle)"


class RunsCode:
    """Unpickling this runs ``exec``: it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def write_code_pickle(path: Path, marker: Path) -> None:
    torch.save({"model": RunsCode(marker), "meta": {"kind": "segmentation"}}, path)


def test_the_code_pickle_is_live(tmp_path):
    """The payload used below does run code when unpickled without weights_only: so the tests
    that find no marker show a refusal, not a dud."""
    marker = tmp_path / "ran"
    write_code_pickle(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "affinitynet: error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("affinitynet: error: "), err
    return errors[0][len("affinitynet: error: "):]


# --- the model.pt files the pipeline's inference stages load ------------------------------------

# (stage that wrote model.pt, command that loads it, stages it needs copied, the output folder)
CONSUMERS = {
    "train_cam": ("infer-cam", ["train_cam"], "infer_cam"),
    "train_affinity": ("random-walk", ["infer_cam", "train_affinity"], "random_walk"),
    "train_seg": ("infer-seg", ["train_seg"], "infer_seg"),
}
TRAIN_COMMAND = {"train_cam": "train-cam", "train_affinity": "train-affinity", "train_seg": "train-seg"}


def other_backbone_state(producer: str, run: Path, data_root: Path) -> dict[str, torch.Tensor]:
    """The state dict that ``producer`` would save with the other backbone (random weights)."""
    config = tiny.config(run, data_root, f"backbone.name={OTHER_BACKBONE}")
    from affinitynet.models.networks import build_network, networks

    kind = next(net.kind for net in networks() if net.stage == producer)
    return build_network(kind, config, 6, pretrained=False).state_dict()


def expected(case: str, producer: str, path: Path) -> tuple[str, bool]:
    """(message, exact?) for a damaged model.pt of ``producer``."""
    train = TRAIN_COMMAND[producer]
    if case == "truncated":
        return f"{path}: not a readable checkpoint (truncated or damaged: ", False
    if case == "code":
        return f"{path}: {REFUSED}", True
    if case == "classes":
        return (f"{path}: trained on other classes than the dataset (class 1 is 'checker_tag' in it but "
                f"'stripe_tag' in the dataset); retrain it (affinitynet {train} --force) or use the dataset "
                f"it was trained on"), True
    if case == "other_backbone":
        if producer == "train_seg":   # built from its meta, which here claims the configured backbone
            return f"{path}: weights do not fit a mobilenetv2/resnet38 segmentation model (", False
        return (f"{path}: trained with backbone '{OTHER_BACKBONE}' but config key 'backbone.name' is "
                f"'mobilenetv2'; retrain it (affinitynet {train} --force)"), True
    if case == "no_meta":
        if producer == "train_seg":
            return (f"{path}: a checkpoint without model meta, not a segmentation model "
                    f"(use <run_dir>/train_seg/model.pt)"), True
        return f"{path}: weights do not fit the configured model (", False
    if case == "bare_state_dict":
        if producer == "train_seg":
            return (f"{path}: a checkpoint without model meta, not a segmentation model "
                    f"(use <run_dir>/train_seg/model.pt)"), True
        return f"{path}: not the model.pt of an affinitynet stage (no 'model' weights in it)", True
    raise ValueError(case)


def damage(case: str, path: Path, producer: str, run: Path, data_root: Path, marker: Path) -> None:
    good = torch.load(path, map_location="cpu", weights_only=True)
    if case == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "code":
        write_code_pickle(path, marker)
    elif case == "classes":
        names = list(good["meta"]["class_names"])
        names[1], names[2] = names[2], names[1]
        torch.save({**good, "meta": {**good["meta"], "class_names": names}}, path)
    elif case == "other_backbone":
        meta = dict(good["meta"])
        if producer != "train_seg":
            meta["backbone"] = OTHER_BACKBONE
        torch.save({**good, "model": other_backbone_state(producer, run, data_root), "meta": meta}, path)
    elif case == "no_meta":
        torch.save({"model": other_backbone_state(producer, run, data_root)}, path)
    elif case == "bare_state_dict":
        torch.save(good["model"], path)
    else:
        raise ValueError(case)


CASES = ("truncated", "code", "classes", "other_backbone", "no_meta", "bare_state_dict")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("producer", list(CONSUMERS))
def test_bad_model_checkpoint_stops_the_stage_with_one_line(reference, tmp_path, capsys, producer, case):
    ref_run, data_root = reference
    command, stages, out_stage = CONSUMERS[producer]
    run = tiny.copy_stages(ref_run, tmp_path / "run", stages)
    path = run / producer / "model.pt"
    marker = tmp_path / "code-ran"
    damage(case, path, producer, run, data_root, marker)

    code, out, err = tiny.cli(tiny.argv(command, run, data_root), capsys)
    message, exact = expected(case, producer, path)
    assert code == 2
    line = one_line_error(err)
    assert line == message if exact else line.startswith(message), line
    assert not marker.exists()
    outputs = [p for p in (run / out_stage).rglob("*") if p.is_file() and p.name != "_stage.json"]
    assert outputs == []
    assert tiny.stage_state(run, out_stage)["complete"] is False


@pytest.mark.parametrize("case", ["truncated", "code"])
def test_bad_resume_checkpoint_stops_training_with_one_line(reference, tmp_path, capsys, case):
    ref_run, data_root = reference
    run = tiny.copy_stages(ref_run, tmp_path / "run", ["train_cam"], checkpoints=True)
    # As if killed during the last epoch: no final model, the stage marked unfinished.
    (run / "train_cam" / "model.pt").unlink()
    state = tiny.stage_state(run, "train_cam")
    (run / "train_cam" / "_stage.json").write_text(json.dumps({**state, "complete": False}))
    path = run / "train_cam" / "checkpoint.pt"
    marker = tmp_path / "code-ran"
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    else:
        write_code_pickle(path, marker)
    code, out, err = tiny.cli(tiny.argv("train-cam", run, data_root), capsys)
    assert code == 2
    line = one_line_error(err)
    if case == "truncated":
        assert line.startswith(f"{path}: not a readable checkpoint (truncated or damaged: "), line
    else:
        assert line == f"{path}: {REFUSED}"
    assert not marker.exists() and not (run / "train_cam" / "model.pt").exists()


# --- affinitynet predict ---------------------------------------------------------------------------

PREDICT_CASES = ("truncated", "code", "cam_model", "other_backbone", "bare_state_dict", "missing")


@pytest.mark.parametrize("case", PREDICT_CASES)
def test_predict_refuses_bad_checkpoints_with_one_line(reference, tmp_path, capsys, case):
    ref_run, data_root = reference
    image = data_root / "JPEGImages" / "val_00000.png"
    path = tmp_path / "model.pt"
    marker = tmp_path / "code-ran"
    good = ref_run / "train_seg" / "model.pt"
    if case == "cam_model":
        path.write_bytes((ref_run / "train_cam" / "model.pt").read_bytes())
        message = f"{path}: a 'cam' checkpoint, not a segmentation model (use <run_dir>/train_seg/model.pt)"
    elif case == "missing":
        message = f"{path}: checkpoint not found"
    else:
        path.write_bytes(good.read_bytes())
        damage(case, path, "train_seg", tmp_path / "run", data_root, marker)
        message, _ = expected(case, "train_seg", path)
    out = tmp_path / "out"
    code, stdout, err = tiny.cli(["predict", str(path), str(image), "--out", str(out)], capsys)
    assert code == 2
    line = one_line_error(err)
    assert line.startswith(message), line
    assert not marker.exists() and not out.exists()


def test_predict_with_the_good_checkpoint_works(reference, tmp_path, capsys):
    """The control for the cases above: the same call with the undamaged model.pt."""
    ref_run, data_root = reference
    out = tmp_path / "out"
    code, stdout, err = tiny.cli(["predict", str(ref_run / "train_seg" / "model.pt"),
                                  str(data_root / "JPEGImages" / "val_00000.png"), "--out", str(out)], capsys)
    assert code == 0, err
    # The mask equals the one infer-seg made with the same scales and flip.
    assert (out / "val_00000.png").read_bytes() == (ref_run / "infer_seg" / "predictions" / "val_00000.png").read_bytes()


# --- ImageNet weight files (backbone.weights), through the CLI -----------------------------------

@pytest.mark.parametrize("case", ["truncated", "other_backbone", "code"])
def test_bad_backbone_weight_file_is_one_line_exit_2(reference, tmp_path, capsys, case):
    ref_run, data_root = reference
    weights = tmp_path / "imagenet.pth"
    marker = tmp_path / "code-ran"
    if case == "truncated":
        torch.save(create_backbone("mobilenetv2", pretrained=False).state_dict(), weights)
        weights.write_bytes(weights.read_bytes()[:20000])
    elif case == "other_backbone":
        torch.save(create_backbone(OTHER_BACKBONE, pretrained=False).state_dict(), weights)
    else:
        write_code_pickle(weights, marker)
    run = tmp_path / "run"
    code, out, err = tiny.cli(tiny.argv("train-cam", run, data_root, f"backbone.weights={weights}"), capsys)
    assert code == 2
    line = one_line_error(err)
    if case == "truncated":
        assert line.startswith(f"weight file '{weights}' could not be read: it is truncated or corrupt ("), line
    elif case == "other_backbone":
        assert line.startswith(f"weight file '{weights}' does not match backbone 'mobilenetv2': "), line
        assert "missing keys" in line and "unexpected keys" in line
    else:
        assert line.startswith(f"weight file '{weights}' was refused for safety"), line
    assert not marker.exists() and not (run / "train_cam" / "checkpoint.pt").exists()
