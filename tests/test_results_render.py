"""The results tables of the README and the docs are rendered from benchmarks/results/*.json
(python -m benchmarks.render): the committed tables are their files', and a table whose file
changed, appeared or went is reported stale."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import render

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted((ROOT / render.RESULTS).glob("*.json"))


def copy_of_the_pages(tmp_path: Path) -> Path:
    """The pages with tables and the results files, as they are committed, under ``tmp_path``."""
    for page in render.PAGES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / page, tmp_path / page)
    results = tmp_path / render.RESULTS
    if (ROOT / render.RESULTS).is_dir():
        shutil.copytree(ROOT / render.RESULTS, results)
    results.mkdir(parents=True, exist_ok=True)
    return tmp_path


def msrc21_record() -> dict:
    """A results file of benchmarks/msrc21.py's layout (made-up figures: only the rendering is
    tested here)."""
    classes = ["background", "aeroplane", "bicycle"]
    row = lambda miou, split: {"split": split, "miou": miou, "iou": dict(zip(classes, (miou - 1, miou, miou + 1)))}  # noqa: E731
    return {
        "benchmark": "msrc21", "command": "python -m benchmarks.msrc21", "options": {},
        "environment": {"commit": "0123456789abcdef", "dirty": False, "cpu_model": "Some CPU", "cpus": 2,
                        "cpu_flags": "avx avx2 fma", "torch": "2.13.0+cpu", "threads": 2, "device": "auto",
                        "date": "2027-01-02T03:04:05Z", "wall_seconds": 5400.0},
        "results": {"class_names": classes, "label_split": "train", "eval_split": "val",
                    "training_labels": "CAM+RW+dCRF in band",
                    "rows": {"CAM": row(64.8, "train"), "CAM+RW": row(77.2, "train"),
                             "CAM+RW+dCRF": row(71.3, "train"), "CAM+RW+dCRF in band": row(77.3, "train"),
                             "Network": row(68.4, "val")},
                    "upper_bound_seed0": {"miou": 76.4, "iou": dict(zip(classes, (75.0, 76.0, 78.2)))},
                    "network_val_miou": [68.4, 69.7, 68.2], "upper_bound_val_miou": [76.4, 76.6, 76.3],
                    "ratio": [0.895, 0.91, 0.894], "ratio_of_means": 0.9,
                    "stage_seconds": {"msrc21/train_cam": 320.0}, "recorded_seconds_seed0": 1656.0},
    }


def write(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def test_the_committed_tables_are_those_of_the_committed_files():
    assert render.stale(ROOT) == [], "a table differs from its JSON file: run `python -m benchmarks.render`"


def test_every_page_has_its_tables():
    names = {page: set(render.BLOCK.findall((ROOT / page).read_text(encoding="utf-8"))) for page in render.PAGES}
    shown = {page: {match[1] for match in found} for page, found in names.items()}
    assert "headline" in shown["README.md"] and "headline" in shown["docs/index.md"]
    assert set(render.TABLES) <= set().union(*shown.values())


def test_a_missing_file_renders_the_command_that_writes_it(tmp_path):
    root = copy_of_the_pages(tmp_path)
    (root / render.RESULTS / "msrc21.json").unlink(missing_ok=True)
    render.render(root)
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "not yet measured at this commit: run `python -m benchmarks.msrc21`" in readme


def test_a_new_file_and_then_an_edited_value_make_the_tables_stale(tmp_path):
    root = copy_of_the_pages(tmp_path)
    path = root / render.RESULTS / "msrc21.json"
    record = msrc21_record()
    write(path, record)
    stale = render.stale(root)
    assert {"README.md: results:headline", "docs/index.md: results:headline", "docs/results.md: results:msrc21-labels",
            "docs/results.md: results:msrc21-network"} <= set(stale)

    render.render(root)
    assert render.stale(root) == []
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "| 64.8 | 77.2 | 77.3 (CAM+RW+dCRF in band) | 68.8 ± 0.8 (3 seeds) | 76.4 ± 0.2 |" in readme
    assert "commit `0123456`, Some CPU (2 CPUs, AVX2), torch 2.13.0+cpu, 2 threads, 2027-01-02; seed 0 with its bound 27.6 min (stages' records)" in readme

    record["results"]["network_val_miou"][1] = 71.7
    write(path, record)
    assert set(render.stale(root)) == {"README.md: results:headline", "docs/index.md: results:headline",
                                       "docs/results.md: results:msrc21-network"}
    record["results"]["rows"]["CAM"]["iou"]["bicycle"] = 12.3
    write(path, record)
    assert "docs/results.md: results:msrc21-labels" in render.stale(root)


def test_whole_pipeline_seeds_give_the_labels_over_the_seeds(tmp_path):
    root = copy_of_the_pages(tmp_path)
    record = msrc21_record()
    table1 = {t: r["miou"] for t, r in record["results"]["rows"].items() if t != "Network"}
    record["results"]["whole_pipeline"] = True
    record["results"]["table1_seeds"] = [table1, {**table1, "CAM+RW": 79.2}, {**table1, "CAM+RW": 78.2}]
    write(root / render.RESULTS / "msrc21.json", record)
    render.render(root)
    readme = (root / "README.md").read_text(encoding="utf-8")
    # CAM+RW over the seeds: 77.2, 79.2, 78.2; the other rows did not move.
    assert "| 64.8 ± 0.0 | 78.2 ± 1.0 | 77.3 ± 0.0 (CAM+RW+dCRF in band) | 68.8 ± 0.8 (3 seeds) |" in readme
    results = (root / "docs/results.md").read_text(encoding="utf-8")
    assert "| pseudo labels, CAM+RW (train) | 77.2 | 79.2 | 78.2 | 78.2 ± 1.0 |" in results
    assert "network on its own CAM+RW+dCRF in band labels (val)" in results


def perturbed(value):
    """Every number of a results file changed (booleans flipped), its strings kept."""
    if isinstance(value, dict):
        return {k: perturbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [perturbed(v) for v in value]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 1.37 + 11
    return value


@pytest.mark.parametrize("path", COMMITTED, ids=[p.name for p in COMMITTED])
def test_an_edited_committed_file_makes_its_table_stale(tmp_path, path):
    root = copy_of_the_pages(tmp_path)
    record = json.loads(path.read_text(encoding="utf-8"))
    record["results"] = perturbed(record["results"])
    write(root / render.RESULTS / path.name, record)
    assert render.stale(root), f"no table changed with the figures of {path.name}"


def test_the_command_checks_and_renders(tmp_path):
    root = copy_of_the_pages(tmp_path)
    write(root / render.RESULTS / "msrc21.json", msrc21_record())
    command = [sys.executable, "-m", "benchmarks.render", "--root", str(root)]
    check = subprocess.run([*command, "--check"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 1 and "stale: README.md: results:headline" in check.stdout
    assert subprocess.run(command, cwd=ROOT, capture_output=True, text=True).returncode == 0
    assert subprocess.run([*command, "--check"], cwd=ROOT, capture_output=True, text=True).returncode == 0


def test_every_benchmark_has_a_table():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__", "common", "render", "figure"}
    rendered = set(render.BENCHMARKS) | {"seed_spread", "msrc21", "label_levers"}   # the last: label-levers
    assert scripts == rendered


def lever_record(seeds: list[int], whole_pipeline: bool = True, first_seed: int = 0) -> dict:
    """A results file of benchmarks/label_levers.py's layout for the lever walk_flip (made-up
    figures): seed k's labels 76 + 2k (baseline 77 + k), its network 70 + 2k (baseline 69 + 2k)."""
    def seed(k, i):
        return {"seed": k, "table1": {"CAM": 64.0, "CAM+RW": 76.0 + 2 * i}, "training_labels": "CAM+RW",
                "walk_row": "CAM+RW", "network_val_miou": 70.0 + 2 * i,
                "baseline_table1": {"CAM": 64.0, "CAM+RW": 77.0 + i}, "baseline_training_labels": "CAM+RW",
                "baseline_network_val_miou": 69.0 + 2 * i, "lever_seconds": 600.0, "diagnostic": None}
    results = {"lever": "walk_flip", "whole_pipeline": whole_pipeline, "first_seed": first_seed,
               "seeds": [seed(k, i) for i, k in enumerate(seeds)],
               "network_val_miou": [70.0 + 2 * i for i in range(len(seeds))],
               "baseline_network_val_miou": [69.0 + 2 * i for i in range(len(seeds))],
               "decision": "not kept: the network's change of +1.0 is within the seed spread 2.0"}
    if not whole_pipeline:   # as the records written before whole-pipeline seeds: no such keys
        del results["whole_pipeline"], results["first_seed"]
    return {**msrc21_record(), "benchmark": "label_levers_walk_flip",
            "command": "python -m benchmarks.label_levers walk_flip --seeds 3", "results": results}


def lever_rows(root: Path) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in render.label_levers(root).splitlines() if line.startswith("| `walk_flip`")]


@pytest.mark.parametrize("whole_pipeline", [True, False])
def test_a_levers_labels_are_given_per_seed_where_its_seeds_are_whole_pipelines(tmp_path, whole_pipeline):
    record = lever_record([0, 1, 2], whole_pipeline)
    (tmp_path / render.RESULTS).mkdir(parents=True)
    write(tmp_path / render.RESULTS / "label_levers_walk_flip.json", record)
    [cells] = lever_rows(tmp_path)
    if whole_pipeline:
        assert "seeds: whole pipelines" in cells[0]
        assert cells[1] == "78.0 ± 2.0 (76.0, 78.0, 80.0; CAM+RW; baseline 78.0 ± 1.0: 77.0, 78.0, 79.0)"
    else:
        assert "seeds: the network's on seed 0's labels" in cells[0]
        assert cells[1] == "76.0 (CAM+RW; baseline 77.0)"
    assert cells[3] == "**72.0 ± 2.0** (70.0, 72.0, 74.0)" and cells[-1] == record["results"]["decision"]


def test_a_confirmation_follows_its_levers_row(tmp_path):
    (tmp_path / render.RESULTS).mkdir(parents=True)
    write(tmp_path / render.RESULTS / "label_levers_walk_flip.json", lever_record([0, 1, 2]))
    confirmation = lever_record([3, 4, 5], first_seed=3)
    confirmation["results"]["decision"] = "not confirmed: the mean difference +1.0 is under 2.92 standard errors (0.0)"
    write(tmp_path / render.RESULTS / "label_levers_walk_flip_seeds3-5.json", confirmation)
    first, second = lever_rows(tmp_path)
    assert "confirmation" not in first[0] and "confirmation on seeds 3-5" in second[0]
    assert second[-1] == confirmation["results"]["decision"]
    assert "`walk_flip` (confirmation): `python -m benchmarks.label_levers" in render.label_levers(tmp_path)
