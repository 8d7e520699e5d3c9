"""Parts from outside the package: a plug-in package, found on the path as an installed one would
be, adds a backbone (through its distribution's entry point, group ``affinitynet.plugins``) and a
dataset with a key of its own (through the config key ``plugins``), and the tiny pipeline runs on
them without a file of affinitynet's being touched."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_pipeline as tiny
import torch

# The lab's backbone is a model class from elsewhere (tests/tiny_backbone.py), registered under
# the lab's name.
BACKBONE = '''
from tiny_backbone import TinyBackbone

from affinitynet.models.backbones import register_backbone


@register_backbone("lab_net", output_strides=(8,))
def lab_net(output_stride=8, pretrained=True):
    return TinyBackbone(output_stride)
'''

DATASET = '''
from affinitynet.data.datasets import DATASETS, register_dataset


@register_dataset("lab_shapes", description="the lab's shapes (the demo's generator, at the lab's size)",
                  keys={"lab_size": 48}, needs_root=False)
def lab_shapes(section, split, progress=True):
    demo = DATASETS.get("demo")
    keys = {**demo.info["keys"], "demo_size": section["lab_size"], "demo_train": 12, "demo_val": 4}
    data = demo.builder({"root": section["root"], **keys}, split, progress)
    data.name = "lab_shapes"
    return data
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """A folder holding the package ``lab_parts`` and its distribution's metadata, as pip lays
    out an installed plug-in (``importlib.metadata`` finds its entry point on the path)."""
    root = tmp_path_factory.mktemp("site")
    package = root / "lab_parts"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "backbones.py").write_text(BACKBONE)
    (package / "datasets.py").write_text(DATASET)
    info = root / "lab_parts-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-parts\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[affinitynet.plugins]\nlab_backbones = lab_parts.backbones\n")
    return root


def affinitynet(args: list[str], cwd: Path, plugin_path: Path | None) -> subprocess.CompletedProcess:
    import affinitynet as package

    paths = [str(Path(package.__file__).resolve().parents[1]), str(Path(__file__).parent)]
    paths += [str(plugin_path)] if plugin_path else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop("AFFINITYNET_RUN_LOCK", None)
    return subprocess.run([sys.executable, "-m", "affinitynet", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_plugin_package_adds_a_backbone_and_a_dataset_and_the_tiny_pipeline_runs_on_them(plugin_path, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny.argv("run", run_dir, tmp_path / "data", "plugins=[lab_parts.datasets]", "dataset.name=lab_shapes",
                     "dataset.lab_size=64", "backbone.name=lab_net")
    done = affinitynet(args, tmp_path, plugin_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dataset lab_shapes, backbone lab_net" in done.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results and (run_dir / "infer_seg" / "predictions").is_dir()
    for stage in ("train_cam", "train_affinity", "train_seg"):
        meta = torch.load(run_dir / stage / "model.pt", weights_only=True)["meta"]
        assert meta["backbone"] == "lab_net", stage
    assert json.loads((run_dir / "_dataset.json").read_text())["name"] == "lab_shapes"

    # The saved config names the plug-in, so a later command needs the run directory alone.
    saved = (run_dir / "config.yaml").read_text()
    assert "plugins:\n- lab_parts.datasets\n" in saved and "lab_size: 64" in saved
    again = affinitynet(["run", "--run-dir", str(run_dir)], tmp_path, plugin_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("up to date, skipped") == 8

    # The installed entry point alone brings the backbone: `config show` lists it among the choices.
    shown = affinitynet(["config", "show"], tmp_path, plugin_path)
    line = next(line for line in shown.stdout.splitlines() if line.startswith("backbone.name "))
    assert "'lab_net'" in line and "'mobilenetv2'" in line


def test_without_the_plugin_its_names_are_unknown_and_a_missing_module_is_one_line(tmp_path, capsys):
    from affinitynet.cli import main

    run_dir = tmp_path / "run"
    assert main(tiny.argv("run", run_dir, tmp_path / "data", "backbone.name=lab_net")) == 2
    assert "got 'lab_net'" in capsys.readouterr().err
    assert main(tiny.argv("run", run_dir, tmp_path / "data", "plugins=[lab_parts.nope]")) == 2
    assert capsys.readouterr().err == ("affinitynet: error: config key 'plugins': plug-in module 'lab_parts.nope' "
                                       "could not be imported (ModuleNotFoundError: No module named 'lab_parts')\n")
    assert not run_dir.exists()
