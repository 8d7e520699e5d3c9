"""A run directory describes itself and cannot be clobbered: a command given ``--run-dir`` of an
existing run uses its saved config, a command that fails its checks changes nothing, another
dataset is refused, and a stage that runs again says why.

Every test works on a copy of the tiny reference run of ``tiny_pipeline.py``.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import tiny_pipeline as tiny
import yaml

from affinitynet.config import load_config, save_resolved


@pytest.fixture
def mine(reference, tmp_path) -> Path:
    """A user's finished run: a copy of the reference whose saved config names the copy."""
    ref_run, _ = reference
    run = tmp_path / "runs" / "mine"
    shutil.copytree(ref_run, run)
    config = load_config(run / "config.yaml", [f"run_dir={run}"])
    save_resolved(config, run / "config.yaml")
    return run


def snapshot(run: Path) -> dict[str, str]:
    """Every file of the run and a digest of its bytes."""
    return {str(path.relative_to(run)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(run.rglob("*")) if path.is_file()}


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("affinitynet: error: ")]
    assert len(lines) == 1, err
    return lines[0][len("affinitynet: error: "):]


def test_a_failed_command_changes_nothing_and_the_saved_config_retrains_nothing(mine, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(mine)
    # The case: dataset arguments forgotten, and the demo default in their place.
    code, out, err = tiny.cli(["infer-seg", "--run-dir", str(mine), "--config", "demo"], capsys)
    assert code == 2
    line = error_line(err)
    assert line.startswith(f"{mine}: holds the outputs of another dataset (root ") and "--force" in line, line
    assert snapshot(mine) == before and not (tmp_path / "runs" / "demo").exists()
    # A stage whose inputs are missing fails without a stub directory or a new config.yaml.
    shutil.rmtree(mine / "train_seg")
    before = snapshot(mine)
    code, out, err = tiny.cli(["infer-seg", "--run-dir", str(mine), "--force"], capsys)
    assert code == 2 and "needs the outputs of 'train_seg'" in error_line(err)
    assert not error_line(err).startswith('"')
    assert snapshot(mine) == before
    # The saved config, reused as the README suggests: every stage is current, nothing is retrained.
    code, out, err = tiny.cli(["run", "--config", str(mine / "config.yaml"), "--force", "train_seg"], capsys)
    assert code == 0, err
    assert "dataset demo" in out and f"outputs in {mine}" in out
    after = snapshot(mine)
    for stage in ("train_cam", "infer_cam", "confident_regions", "train_affinity", "random_walk"):
        assert {k: v for k, v in after.items() if k.startswith(stage + "/")} == \
            {k: v for k, v in before.items() if k.startswith(stage + "/")}, stage
        assert f"[{stage}] up to date, skipped" in out
    assert after["train_seg/model.pt"]


def test_a_run_directory_alone_gives_its_config(mine, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = yaml.safe_load((mine / "config.yaml").read_text())
    code, out, err = tiny.cli(["evaluate-run", "--run-dir", str(mine), "--force"], capsys)
    assert code == 0, err
    assert "[evaluate_run] re-running: forced (--force)" in out
    assert yaml.safe_load((mine / "config.yaml").read_text()) == saved
    # Overrides go on top of the saved config: only the stages that read the key run again.
    code, out, err = tiny.cli(["random-walk", "--run-dir", str(mine), "random_walk.beta=10"], capsys)
    assert code == 0, err
    assert "[random_walk] re-running: random_walk.beta 8.0 -> 10" in out
    now = yaml.safe_load((mine / "config.yaml").read_text())
    assert now["random_walk"]["beta"] == 10 and {k: v for k, v in now.items() if k != "random_walk"} == \
        {k: v for k, v in saved.items() if k != "random_walk"}


def test_another_dataset_is_refused_unless_forced(reference, mine, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, data_root = reference
    other = tmp_path / "other-data"
    before = snapshot(mine)
    for argv in (["run", "--run-dir", str(mine), f"dataset.root={other}"],
                 ["train-cam", "--run-dir", str(mine), f"dataset.root={other}"],
                 ["run", "--run-dir", str(mine), "--force", "train_cam", f"dataset.root={other}"]):
        code, out, err = tiny.cli(argv, capsys)
        assert code == 2, (argv, err)
        assert error_line(err) == (f"{mine}: holds the outputs of another dataset (root {data_root.resolve()} -> "
                                   f"{other.resolve()}); nothing was changed: pass --force to replace them, or "
                                   f"choose a new --run-dir")
        assert snapshot(mine) == before
    # --force on the stage: the other dataset's outputs are all marked for redoing, this stage is redone.
    code, out, err = tiny.cli(["train-cam", "--run-dir", str(mine), f"dataset.root={other}", "--force"], capsys)
    assert code == 0, err
    assert "replacing the outputs of another dataset" in out
    assert tiny.stage_state(mine, "train_cam")["complete"] is True
    assert all(tiny.stage_state(mine, name)["complete"] is False for name in tiny.STAGE_NAMES[1:])
    assert yaml.safe_load((mine / "config.yaml").read_text())["dataset"]["root"] == str(other)
    code, out, err = tiny.cli(["infer-seg", "--run-dir", str(mine)], capsys)
    assert code == 2 and "needs the outputs of 'train_seg'" in error_line(err)
    code, out, err = tiny.cli(["infer-cam", "--run-dir", str(mine)], capsys)
    assert code == 0 and "[infer_cam] re-running: the run directory's dataset was replaced" in out, err


def test_a_class_list_change_is_another_dataset(tmp_path):
    from affinitynet.errors import StageError
    from affinitynet.files import write_json
    from affinitynet.pipeline import check_run_dir, dataset_identity, training_split

    config = tiny.config(tmp_path / "run", tmp_path / "data")
    data = training_split(config)
    identity = dataset_identity(config, data)
    assert identity["name"] == "demo" and identity["root"] == str((tmp_path / "data").resolve())
    write_json(tmp_path / "run" / "_dataset.json", {**identity, "class_names": identity["class_names"][:-1]})
    with pytest.raises(StageError, match="4 object classes -> 5"):
        check_run_dir(config, data)
    check_run_dir(config)                     # without the dataset: name and root only
    write_json(tmp_path / "run" / "_dataset.json", identity)
    check_run_dir(config, data)


def test_segmentation_seed_retrains_the_network_alone(mine, reference, capsys):
    """``segmentation.seed`` unset keeps every stage's hash (runs made before the key existed stay
    current); set, it retrains the network on the same pseudo labels and leaves the labels alone."""
    from affinitynet.config import section_hash
    from affinitynet.engine.checkpoints import load_checkpoint
    from affinitynet.files import read_json
    from affinitynet.pipeline import dataset_inputs, stage, stage_hash

    _, data_root = reference
    config = load_config(mine / "config.yaml")
    assert config["segmentation"]["seed"] is None
    spec = stage("train_seg")
    assert stage_hash(config, "train_seg") == section_hash(config, spec.keys + dataset_inputs(),
                                                           stage_hash(config, "random_walk"))
    assert read_json(mine / "train_seg" / "_stage.json")["hash"] == stage_hash(config, "train_seg")
    before = snapshot(mine)
    code, out, err = tiny.cli(["train-seg", "--run-dir", str(mine), "segmentation.seed=1"], capsys)
    assert code == 0, err
    assert "segmentation.seed (unset) -> 1" in out + err
    after = snapshot(mine)
    changed = {path.split("/")[0] for path in before if before[path] != after.get(path)}
    assert changed <= {"train_seg", "config.yaml"} and "train_seg" in changed
    assert read_json(mine / "train_seg" / "_stage.json")["seed"] == 1
    ref_run, _ = reference
    old = load_checkpoint(ref_run / "train_seg" / "model.pt")["model"]
    new = load_checkpoint(mine / "train_seg" / "model.pt")["model"]
    assert any(not old[k].equal(new[k]) for k in old)


def test_the_same_dataset_spelled_another_way_is_not_a_new_input(mine, reference, monkeypatch, capsys):
    """dataset.root given relative to the working directory, then absolute (or the reverse), names
    the same images: no stage runs again. A stage recorded by an older version, which hashed the
    path as written, is refused in one line until re-run with --force."""
    import os

    from affinitynet.pipeline import hash_matches, is_complete, stage_hash, stages

    _, data_root = reference
    monkeypatch.chdir(data_root.parent)
    relative = os.path.relpath(data_root)
    assert not os.path.isabs(relative)
    before = snapshot(mine)
    for root in (relative, str(data_root), f"./{relative}/"):
        code, out, err = tiny.cli(["run", "--run-dir", str(mine), f"dataset.root={root}"], capsys)
        assert code == 0, err
        assert "re-running" not in out + err
    after = snapshot(mine)
    changed = {path for path in before if before[path] != after.get(path)}
    assert changed <= {"config.yaml"}
    config = load_config(mine / "config.yaml", [f"dataset.root={relative}"])
    assert all(stage_hash(config, s.name) == stage_hash(load_config(mine / "config.yaml"), s.name) for s in stages(config))
    # A record of an older version (no schema version, no inputs) is not current, and the stage
    # says in one line to re-run it with --force, changing nothing.
    marker = mine / "train_seg" / "_stage.json"
    saved = marker.read_text()
    state = json.loads(saved)
    del state["schema"], state["inputs"]
    marker.write_text(json.dumps(state))
    assert hash_matches(state["hash"], config, "train_seg") and not is_complete(config, "train_seg")
    code, out, err = tiny.cli(["train-seg", "--run-dir", str(mine), f"dataset.root={relative}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "another version" in err and "re-run with --force" in err, err
    assert json.loads(marker.read_text()) == state
    marker.write_text(saved)
    # Another directory is another input.
    other = load_config(mine / "config.yaml")
    other["dataset"]["root"] = str(data_root.parent)
    assert not hash_matches(stage_hash(config, "train_cam"), other, "train_cam")


def test_each_training_stage_records_its_last_epoch(reference):
    """Every training stage's marker (``stages.train_stage``) holds its epochs and the last epoch's
    logged means, the ones its ``log.csv`` ends with; the segmentation network also its seed."""
    import csv

    from affinitynet.files import read_json

    ref_run, _ = reference
    config = load_config(ref_run / "config.yaml")
    for name, section, parts in (("train_cam", "cam", ["loss"]), ("train_affinity", "affinity", ["loss"]),
                                 ("train_seg", "segmentation", ["loss", "pixel_accuracy"])):
        marker = read_json(ref_run / name / "_stage.json")
        with open(ref_run / name / "log.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert marker["epochs"] == len(rows) == int(rows[-1]["epoch"]) == config[section]["epochs"]
        for part in parts:
            assert marker[f"final_{part}"] == pytest.approx(float(rows[-1][part]), rel=1e-5), (name, part)
        assert set(rows[-1]) - {"epoch"} == {key[len("final_"):] for key in marker if key.startswith("final_")}
        assert marker["images"] > 0
    assert read_json(ref_run / "train_seg" / "_stage.json")["seed"] == config["seed"]
    assert "seed" not in read_json(ref_run / "train_cam" / "_stage.json")
