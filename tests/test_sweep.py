"""The hyper-parameter sweep (Fig. 8) reuses the run's CAMs and affinities and reproduces the
run's own CAM+RW score exactly at the run's (alpha, beta, t)."""
import json

import pytest
import tiny_pipeline as tiny

from affinitynet.files import read_json


def test_sweep_reproduces_the_runs_cam_rw_miou(reference, tmp_path):
    from affinitynet.sweep import run_sweep

    run_dir, data_root = reference
    copy = tiny.copy_stages(run_dir, tmp_path / "run", ["train_cam", "infer_cam", "confident_regions",
                                                         "train_affinity", "random_walk"])
    config = tiny.config(copy, data_root, "sweep.betas=[4,8]", "sweep.ts=[4,16]", "sweep.alphas=[16,24]")
    result = run_sweep(config)
    own = read_json(copy / "random_walk" / "_stage.json")["table1"]["CAM+RW"]["miou"]
    section = config["random_walk"]
    at_run = [row for row in result["beta_t"] if row["beta"] == section["beta"] and row["t"] == section["t"]]
    assert len(at_run) == 1 and at_run[0]["miou"] == own
    by_alpha = {row["alpha"]: row["miou"] for row in result["alpha"]}
    assert by_alpha[section["alpha"]] == own
    assert (copy / "sweep" / "fig8.png").stat().st_size > 0
    saved = json.loads((copy / "sweep" / "sweep.json").read_text())
    assert len(saved["beta_t"]) == 4 and len(saved["alpha"]) == 2


def test_sweep_refuses_a_run_without_a_random_walk(tmp_path):
    from affinitynet.sweep import run_sweep

    config = tiny.config(tmp_path / "empty", tmp_path / "data")
    with pytest.raises(RuntimeError, match="random_walk|infer_cam"):
        run_sweep(config)
