"""IRN as the label method (``labels.method: irn``) on the tiny pipeline: the graph runs IRNet's
stages instead of AffinityNet's, every key they read is hashed, their labels train the network,
and Table 1 shows them."""
from __future__ import annotations

import json

import numpy as np
import pytest

import tiny_pipeline as tiny
from affinitynet import pipeline
from affinitynet.io import load_label_png
from test_stage_contract import loose_reads


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return tiny.reference_run(tmp_path_factory)


def test_irn_runs_instead_of_affinitynet_and_its_labels_train_the_network(reference, tmp_path, monkeypatch):
    ref_run, data_root = reference
    run_dir = tmp_path / "irn"
    config = tiny.config(run_dir, data_root, "labels.method=irn")
    assert [s.name for s in pipeline.stages(config)] == ["train_cam", "infer_cam", "confident_regions", "train_irn",
                                                         "irn_walk", "train_seg", "infer_seg", "evaluate_run"]
    tiny.copy_stages(ref_run, run_dir, ["train_cam", "infer_cam", "confident_regions"])
    reads = tiny.recording_run(config, monkeypatch)
    assert list(reads) == ["train_irn", "irn_walk", "train_seg", "infer_seg", "evaluate_run"]
    assert loose_reads(config, reads) == {}, "keys read but not hashed"
    assert not (run_dir / "train_affinity").exists() and not (run_dir / "random_walk").exists()
    labels = sorted((run_dir / "irn_walk" / "pseudo_labels").glob("*.png"))
    assert len(labels) == 12
    for path in labels:
        label = load_label_png(path)
        cam_label = load_label_png(ref_run / "infer_cam" / "labels" / path.name)
        assert label.shape == cam_label.shape
        # Only the image's own classes (and background) appear in its labels.
        assert set(np.unique(label)) <= set(np.unique(cam_label)) | {0}
    results = json.loads((run_dir / "results.json").read_text())
    assert results["training_labels"] == "CAM+IRN+dCRF in band"
    assert {"CAM", "CAM+IRN", "CAM+IRN+dCRF", "CAM+IRN+dCRF in band", "Network"} <= set(results["rows"])
    state = json.loads(pipeline.stage("train_seg").marker(run_dir).read_text())
    assert list(state["inputs"]["upstream"]) == ["irn_walk"]
    meta = json.loads(pipeline.stage("train_irn").marker(run_dir).read_text())
    assert meta["complete"] is True and meta["images"] == 12
