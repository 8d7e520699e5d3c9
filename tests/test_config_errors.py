"""Configuration errors: each is one line naming the key and what is allowed, from
``load_config`` (ConfigError) and from the CLI (``affinitynet: error: <that line>`` on stderr,
exit code 2, nothing written)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from affinitynet.cli import main
from affinitynet.config import DEFAULTS
from affinitynet.errors import ConfigError
from affinitynet.pipeline.settings import load_run_config

TOP_LEVEL = ", ".join(sorted(DEFAULTS))

# (overrides, message)
OVERRIDE_CASES = [
    # unknown keys
    (["random_walk.betta=3"],
     "command line: unknown config key 'random_walk.betta' (known keys in 'random_walk': alpha, beta, crf, flip, radius, scale, t)"),
    (["randomwalk.beta=3"], f"command line: unknown config key 'randomwalk.beta' (known top-level keys: {TOP_LEVEL})"),
    (["random_walk=5"],
     "command line: 'random_walk' is a section of keys, not a value (its keys: alpha, beta, crf, flip, radius, scale, t)"),
    (["beta"], "command line: override 'beta' must look like key=value (e.g. random_walk.beta=8)"),
    # wrong types
    (["random_walk.beta=abc"], "config key 'random_walk.beta' must be a number > 0 and <= 1000, got 'abc'"),
    (["random_walk.crf=maybe"], "config key 'random_walk.crf' must be one of 'band', 'full', 'off' (or true/false), got 'maybe'"),
    (["random_walk.t=true"], "config key 'random_walk.t' must be an integer >= 1 and <= 1000000, got True"),
    (["cam.epochs=1.5"], "config key 'cam.epochs' must be an integer >= 1 and <= 10000, got 1.5"),
    (["cam.scales=1.0"], "config key 'cam.scales' must be a list of 1 to 16 numbers each > 0 and <= 8, got 1.0"),
    (["cam.color_jitter=[0.3,0.3]"], "config key 'cam.color_jitter' must be 4 numbers each >= 0 and <= 10, got [0.3, 0.3]"),
    (["dataset.root=5"], "config key 'dataset.root' must be a string (or null), got 5"),
    (["device=gpu"], "config key 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    # out of range
    (["random_walk.beta=-1"], "config key 'random_walk.beta' must be a number > 0 and <= 1000, got -1"),
    (["random_walk.beta=0"], "config key 'random_walk.beta' must be a number > 0 and <= 1000, got 0"),
    (["random_walk.beta=.nan"], "config key 'random_walk.beta' must be a number > 0 and <= 1000, got nan"),
    (["random_walk.beta=.inf"], "config key 'random_walk.beta' must be a number > 0 and <= 1000, got inf"),
    (["random_walk.radius=0"], "config key 'random_walk.radius' must be an integer >= 1 and <= 64, got 0"),
    (["affinity.radius=0"], "config key 'affinity.radius' must be an integer >= 1 and <= 64, got 0"),
    (["random_walk.t=0"], "config key 'random_walk.t' must be an integer >= 1 and <= 1000000, got 0"),
    (["random_walk.alpha=0.5"], "config key 'random_walk.alpha' must be a number >= 1 and <= 1000, got 0.5"),
    (["affinity.alpha_low=0.5"], "config key 'affinity.alpha_low' must be a number >= 1 and <= 1000, got 0.5"),
    (["affinity.alpha_high=0"], "config key 'affinity.alpha_high' must be a number >= 1 and <= 1000, got 0"),
    (["cam.eval_alpha=0.9"], "config key 'cam.eval_alpha' must be a number >= 1 and <= 1000, got 0.9"),
    (["cam.lr=-0.1"], "config key 'cam.lr' must be a number > 0 and <= 10, got -0.1"),
    (["cam.resize_long=[8,600]"], "config key 'cam.resize_long' must be 2 integers each >= 16 and <= 8192, got [8, 600]"),
    (["backbone.output_stride=4"], "config key 'backbone.output_stride' must be 8 or 16, got 4"),
    (["cam.train_output_stride=32"], "config key 'cam.train_output_stride' must be null, 8 or 16, got 32"),
    (["segmentation.fine_tune_epochs=-1"],
     "config key 'segmentation.fine_tune_epochs' must be an integer >= 0 and <= 10000, got -1"),
    (["backbone.output_stride=16", "segmentation.train_output_stride=8"],
     "config key 'segmentation.train_output_stride' must be at least backbone.output_stride (16): a network "
     "trained at a finer stride cannot run at a coarser one, got 8"),
    (["affinity.backbone_stride=4"], "config key 'affinity.backbone_stride' must be null, 8 or 16, got 4"),
    (["backbone.output_stride=16", "affinity.backbone_stride=8"],
     "config key 'affinity.backbone_stride' must be at least backbone.output_stride (16), the stride of the "
     "walk's grid, got 8"),
    # layouts of the released networks
    (["cam.head=gap"], "config key 'cam.head' must be one of 'conv', 'irn', 'psa', got 'gap'"),
    (["affinity.channels=[64,128]"], "config key 'affinity.channels' must be 3 integers each >= 1 and <= 8192, got [64, 128]"),
    (["backbone.atrous=false"], "config key 'backbone.atrous' can be false only for backbone 'resnet50' "
                                "(irn's undilated ResNet-50), not 'mobilenetv2'"),
    (["seed=-1"], "config key 'seed' must be an integer >= 0 and <= 4294967295, got -1"),
    # names the registries hold, misspelt; and settings each allowed but not together
    (["labels.method=irm"], "config key 'labels.method' must be one of 'affinitynet', 'irn', got 'irm' (did you mean 'irn'?)"),
    (["segmentation.head=deeplab_largefv"], "config key 'segmentation.head' must be one of 'deeplab_largefov', "
                                            "'resnet38', got 'deeplab_largefv' (did you mean 'deeplab_largefov'?)"),
    (["backbone.name=vgg16", "backbone.output_stride=16"],
     "config key 'backbone.output_stride' must be a stride backbone 'vgg16' supports (8), got 16"),
    (["backbone.name=vgg16", "segmentation.train_output_stride=16"],
     "config key 'segmentation.train_output_stride' must be a stride backbone 'vgg16' supports (8), got 16"),
    (["random_walk.scale=3"],
     "config key 'random_walk.scale' must divide the output stride 8 into whole pixels (e.g. 1, 2, 4), got 3"),
    (["cam.resize_long=[512,256]"], "config key 'cam.resize_long' must be [low, high] with low <= high, got [512, 256]"),
    (["dataset.train_split=../train"],
     "config key 'dataset.train_split' must be a name without path separators, got '../train'"),
    (["cam.scales=[" + ",".join(["1"] * 17) + "]"],
     "config key 'cam.scales' must be a list of 1 to 16 numbers each > 0 and <= 8, got [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, "
     "1, 1, 1, 1, 1, 1, 1]"),
    (["sweep.ts=[" + ",".join(["1"] * 100) + "]"],
     "config key 'sweep.ts' must be a list of 1 to 64 integers each >= 1 and <= 1000000, got ["
     + "1, " * 25 + "1..."),                                           # a huge value cut to 80 characters
    # the dataset
    (["dataset.name=imagenet"], "config key 'dataset.name' must be one of 'coco', 'demo', 'folder', 'msrc21', 'voc12', got 'imagenet'"),
    (["dataset.name=voc12", "dataset.root=null"],
     "config key 'dataset.root' must name the voc12 dataset directory (it is null)"),
    (["dataset.name=msrc21", "dataset.root="],
     "config key 'dataset.root' must name the msrc21 dataset directory (it is null)"),
    (["dataset.name=voc12", "dataset.root=/nonexistent/VOC2012"],
     "config key 'dataset.root': directory '/nonexistent/VOC2012' does not exist"),
]


def _id(case):
    return " ".join(case[0])


@pytest.mark.parametrize("overrides, message", OVERRIDE_CASES, ids=[_id(c) for c in OVERRIDE_CASES])
def test_load_config_gives_one_exact_line(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_run_config("demo", overrides)
    assert str(caught.value) == message


@pytest.mark.parametrize("command", ["run", "infer-cam", "random-walk"])
@pytest.mark.parametrize("overrides, message", OVERRIDE_CASES, ids=[_id(c) for c in OVERRIDE_CASES])
def test_cli_prints_the_line_and_exits_2_before_writing(tmp_path, capsys, command, overrides, message):
    run_dir = tmp_path / "run"
    code = main([command, "--config", "demo", f"run_dir={run_dir}", *overrides])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == f"affinitynet: error: {message}\n"
    assert captured.out == ""
    assert not run_dir.exists()


def test_dataset_options_are_checked_the_same_way(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    cases = [
        (["--dataset", "voc12", "--root", str(tmp_path / "absent")],
         f"config key 'dataset.root': directory '{tmp_path / 'absent'}' does not exist"),
        (["--dataset", "folder", "--root", str(tmp_path / "photos")],
         "config key 'dataset.labels_file' must name a CSV or JSON of tags for the folder dataset"),
        (["--dataset", "folder", "dataset.root=null", "dataset.labels_file=tags.csv"],
         "config key 'dataset.root' must name the folder dataset directory (it is null)"),
    ]
    for options, message in cases:
        code = main(["train-cam", "--config", "demo", f"run_dir={tmp_path / 'run'}", *options])
        captured = capsys.readouterr()
        assert (code, captured.err) == (2, f"affinitynet: error: {message}\n")
    assert not (tmp_path / "run").exists()


# --- YAML files --------------------------------------------------------------------------------------

FILE_CASES = [
    ("random_walk:\n  betta: 3\n",
     "{path}: unknown config key 'random_walk.betta' (known keys in 'random_walk': alpha, beta, crf, flip, radius, scale, t)"),
    ("random_walk: 5\n", "{path}: 'random_walk' is a section of keys, not a value (its keys: alpha, beta, crf, flip, radius, scale, t)"),
    ("random_walk:\n  beta: -2\n", "config key 'random_walk.beta' must be a number > 0 and <= 1000, got -2"),
    ("random_walk:\n  t: 0\n", "config key 'random_walk.t' must be an integer >= 1 and <= 1000000, got 0"),
    ("affinity:\n  radius: 0\n", "config key 'affinity.radius' must be an integer >= 1 and <= 64, got 0"),
    ("random_walk:\n  alpha: 0.5\n", "config key 'random_walk.alpha' must be a number >= 1 and <= 1000, got 0.5"),
    ("dataset:\n  name: voc12\n", "config key 'dataset.root' must name the voc12 dataset directory (it is null)"),
    ("random_walk: [1, 2\n", "{path}: not valid YAML (line 2)"),
    ("- a\n- b\n", "{path}: 'top level' must be a mapping of keys"),
]


@pytest.mark.parametrize("text, message", FILE_CASES, ids=[m.split(": ", 1)[-1][:40] for _, m in FILE_CASES])
def test_config_file_errors(tmp_path, capsys, text, message):
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    expected = message.format(path=path)
    with pytest.raises(ConfigError) as caught:
        load_run_config(path)
    assert str(caught.value) == expected
    code = main(["run", "--config", str(path), f"run_dir={tmp_path / 'run'}"])
    assert (code, capsys.readouterr().err) == (2, f"affinitynet: error: {expected}\n")
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_run_config(path)
    assert str(caught.value) == f"{path}: config file not found"
    assert main(["run", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"affinitynet: error: {path}: config file not found\n"


# --- a real process ------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("random_walk.beta=-1", "config key 'random_walk.beta' must be a number > 0 and <= 1000, got -1"),
    ("random_walk.betta=3", "command line: unknown config key 'random_walk.betta' "
                            "(known keys in 'random_walk': alpha, beta, crf, flip, radius, scale, t)"),
])
def test_python_m_affinitynet_exits_2_with_one_line(tmp_path, override, message):
    result = subprocess.run([sys.executable, "-m", "affinitynet", "run", "--config", "demo",
                             f"run_dir={tmp_path / 'run'}", override],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"affinitynet: error: {message}\n"
    assert result.stdout == "" and not (tmp_path / "run").exists()


# --- an error that is not the user's ---------------------------------------------------------------------

def test_a_bug_is_one_line_naming_the_file_with_its_traceback(monkeypatch, capsys):
    import re

    from affinitynet import cli

    def broken():
        raise KeyError("boom")

    monkeypatch.setattr(cli, "defaults", broken)
    code = main(["config", "show"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    found = re.fullmatch(r"affinitynet: error: KeyError: 'boom' \(the full traceback is in (\S+); --verbose prints it\)\n",
                         err)
    assert found, err
    saved = Path(found.group(1))
    text = saved.read_text()
    saved.unlink()
    assert text.startswith("Traceback (most recent call last):") and "in broken" in text
    assert text.rstrip().endswith("KeyError: 'boom'")
    with pytest.raises(KeyError):
        main(["--verbose", "config", "show"])


@pytest.mark.parametrize("command", ["run", "train-cam"])
def test_a_misspelt_backbone_is_one_line_with_the_nearest_name(tmp_path, capsys, command):
    """The issue's `train-cam --run-dir R backbone.name=mobilenetv3`, which printed a traceback
    and left config.yaml, _dataset.json and train_cam/_stage.json behind."""
    from affinitynet.models.backbones import list_backbones

    run_dir = tmp_path / "R"
    code = main([command, "--config", "demo", "--run-dir", str(run_dir), "backbone.name=mobilenetv3"])
    known = ", ".join(repr(name) for name in list_backbones())   # a test may have registered its own
    assert (code, capsys.readouterr().err) == (
        2, f"affinitynet: error: config key 'backbone.name' must be one of {known}, got 'mobilenetv3' "
           f"(did you mean 'mobilenetv2'?)\n")
    assert not run_dir.exists()
