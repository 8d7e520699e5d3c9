"""Parts that plug in by registering themselves: a dataset, a segmentation head, a label method.
Each test adds one the way a new module would (its decorator or its ``STAGE``), and checks that the
config, the CLI and the pipeline take it with no other change."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import tiny_pipeline as tiny
import torch
from torch import nn

from affinitynet import pipeline
from affinitynet.data.datasets import DATASETS, build_dataset, register_dataset
from affinitynet.errors import ConfigError, InputError
from affinitynet.files import load_label_png, save_label_png
from affinitynet.pipeline.settings import load_run_config as load_config
from affinitynet.registry import Entry


@pytest.fixture
def extra_dataset():
    """A dataset module's registration: the demo's images under another name, with a key of
    its own."""
    from affinitynet.data.datasets.demo import build_demo

    @register_dataset("demo_copy", description="the demo under another name", keys={"copy_seed": 3},
                      needs_root=False)
    def from_config(section, split, progress=True):
        data = build_demo(section["root"], split, size=64, num_train=4, num_val=2, seed=section["copy_seed"],
                          progress=False)
        data.name = "demo_copy"
        return data

    yield "demo_copy"
    DATASETS._entries.pop("demo_copy")


def test_a_registered_dataset_is_a_choice_of_the_config_and_the_cli_and_is_hashed(extra_dataset, tmp_path, capsys):
    from affinitynet.cli import main

    assert "demo_copy" in DATASETS.names()
    config = load_config("demo", [f"dataset.name={extra_dataset}", "dataset.copy_seed=5"])
    assert config["dataset"]["copy_seed"] == 5
    with pytest.raises(ConfigError, match="dataset.copy_seed' must be int"):
        load_config("demo", [f"dataset.name={extra_dataset}", "dataset.copy_seed=many"])
    # The key it declares says which images every stage sees.
    assert "dataset.copy_seed" in pipeline.dataset_inputs()
    data = build_dataset({"name": extra_dataset, "root": str(tmp_path / "d")}, "train")
    assert data.name == "demo_copy" and len(data) == 4
    assert main(["datasets", "list"]) == 0
    assert "demo_copy" in capsys.readouterr().out
    assert main(["config", "show"]) == 0
    assert "dataset.copy_seed" in capsys.readouterr().out
    assert config["dataset"]["name"] == extra_dataset
    # --dataset is checked as dataset.name is: one line naming the registry's names.
    assert main(["datasets", "check", "--dataset", "nonesuch"]) == 2
    err = capsys.readouterr().err
    assert "'demo_copy'" in err and "got 'nonesuch'" in err and err.count("\n") == 1


def test_an_unknown_dataset_is_one_line_naming_the_registered_ones():
    with pytest.raises(ConfigError, match=r"'coco', 'demo', 'folder', 'msrc21', 'voc12', got 'imagenet'"):
        load_config("demo", ["dataset.name=imagenet"])
    with pytest.raises(InputError, match=r"unknown dataset 'imagenet' \(known: coco, demo, folder, msrc21, voc12\)"):
        build_dataset({"name": "imagenet", "root": "x"}, "train")


def test_a_registered_segmentation_head_builds_and_is_a_config_choice():
    from affinitynet.models.segmentation import HEADS, SegmentationNet, register_head

    @register_head("one_by_one", description="a 1x1 classifier with a bias-free 1x1 before it")
    def head(in_channels, num_classes, head_channels, dilation, dropout):
        return nn.Sequential(nn.Conv2d(in_channels, 8, 1, bias=False), nn.ReLU(), nn.Conv2d(8, num_classes, 1))

    try:
        assert load_config("demo", ["segmentation.head=one_by_one"])["segmentation"]["head"] == "one_by_one"

        class Backbone(nn.Module):
            out_channels = (4,)

            def forward(self, x):
                return [x[:, :1].repeat(1, 4, 1, 1)[:, :, ::8, ::8]]

        net = SegmentationNet(Backbone(), 3, head="one_by_one")
        assert net(torch.zeros(1, 3, 32, 40)).shape == (1, 3, 32, 40)
        assert [p.shape for p in net.new_parameters()] == [(8, 4, 1, 1), (3, 8, 1, 1), (3,)]
    finally:
        HEADS._entries.pop("one_by_one")
    with pytest.raises(ConfigError, match="segmentation.head.*'deeplab_largefov', 'resnet38'"):
        load_config("demo", ["segmentation.head=one_by_one"])


def copy_cam_labels(config, force=False):
    """A second label method in a dozen lines: the CAM labels, unrefined, as the pseudo labels."""
    from affinitynet.stages.common import label_images, setup

    setup(config)
    job = pipeline.StageRun(config, "cam_copy", force)
    source = pipeline.stage("infer_cam").output("labels", config)
    target = CAM_COPY.output("pseudo_labels", config)
    for sample in label_images(config).samples:
        save_label_png(target / f"{sample.id}.png", load_label_png(source / f"{sample.id}.png"))
        job.images += 1
    return job.finish()


CAM_COPY = pipeline.Stage("cam_copy", "cam-copy", "the CAM labels as pseudo labels", keys=(),
                          upstream=("infer_cam",), outputs={"pseudo_labels": "pseudo_labels"}, run=copy_cam_labels,
                          label_method="camcopy", label_rows=lambda config: [("CAM copy", "pseudo_labels")])


def test_a_label_method_is_a_stage_and_the_run_follows_the_config(reference, tmp_path, monkeypatch, capsys):
    """``labels.method`` picks the stage whose pseudo labels train the network: the graph that
    ``run`` executes drops AffinityNet's stages, and the network trains on the new labels."""
    ref_run, data_root = reference
    monkeypatch.setitem(pipeline.STAGES._entries, "cam_copy", Entry("cam_copy", CAM_COPY.run, {"spec": CAM_COPY}))
    with pytest.raises(ConfigError, match="labels.method.*'affinitynet', 'camcopy', 'irn'.*got 'nonesuch'"):
        load_config("demo", ["labels.method=nonesuch"])
    config = tiny.config(tmp_path / "run", data_root, "labels.method=camcopy")
    assert [s.name for s in pipeline.stages(config)] == ["train_cam", "infer_cam", "cam_copy", "train_seg",
                                                         "infer_seg", "evaluate_run"]
    run_dir = tmp_path / "run"
    tiny.copy_stages(ref_run, run_dir, ["train_cam", "infer_cam"])
    code, out, err = tiny.cli(tiny.argv("run", run_dir, data_root, "labels.method=camcopy"), capsys)
    assert code == 0, err
    assert not (run_dir / "random_walk").exists() and not (run_dir / "train_affinity").exists()
    labels = sorted((run_dir / "cam_copy" / "pseudo_labels").glob("*.png"))
    assert len(labels) == 12
    for path in labels:
        np.testing.assert_array_equal(load_label_png(path), load_label_png(ref_run / "infer_cam" / "labels" / path.name))
    results = (run_dir / "results.json").read_text()
    assert '"training_labels": "CAM copy"' in results and '"Network"' in results
    # The network of this run trained on other labels than the reference's.
    state = pipeline.run_dir.json_or_none(pipeline.stage("train_seg").marker(run_dir))
    assert state["inputs"]["upstream"] == {"cam_copy": pipeline.stage_hash(config, "cam_copy")}
    shutil.rmtree(run_dir)
