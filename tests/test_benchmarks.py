"""Every benchmark takes the shared options (benchmarks/common.py): --threads, --device (checked)
and --json, and the results file carries the environment record."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from benchmarks import common
from benchmarks.seed_spread import seed_run_dirs, seed_weak_dir

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")
                 if p.stem not in {"__init__", "common", "render", "figure"})
REQUIRED = {"affinity_label_precision": ["runs/x"], "background_errors": ["runs/x"], "crf_changes": ["runs/x"],
            "psa_equivalence": ["psa"], "irn_equivalence": ["irn"], "seed_spread": ["--config", "demo"], "onnx_predict": ["model.pt"],
            "label_levers": ["refine"]}


def test_there_are_the_benchmarks():
    assert len(SCRIPTS) == 20 and "seed_spread" in SCRIPTS and "label_levers" in SCRIPTS and "msrc21" in SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_takes_the_shared_options(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit:
        module.main(["--help"])
    assert exit.value.code == 0
    shown = capsys.readouterr().out
    assert f"python -m benchmarks.{name}" in shown
    for option in ("--threads", "--device", "--json"):
        assert option in shown, f"{name}: no {option}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_refuses_a_device_it_cannot_use(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit:
        module.main([*REQUIRED.get(name, []), "--device", "tpu"])
    assert exit.value.code == 2
    assert "--device tpu" in capsys.readouterr().err


def test_the_results_file_carries_the_environment_record(tmp_path):
    bench = common.Benchmark(__file__, "A test.", name="example")
    bench.parse(["--json", str(tmp_path / "out.json"), "--threads", "1"])
    path = bench.write({"figure": 1.5, "summary": {"figure": 1.5}})
    record = json.loads(path.read_text())
    assert record["benchmark"] == "example" and record["results"]["figure"] == 1.5
    assert record["command"].startswith("python -m benchmarks.test_benchmarks --json ")
    environment = record["environment"]
    for key in ("commit", "dirty", "cpu_model", "cpu_flags", "cpus", "torch", "threads", "device", "date",
                "wall_seconds"):
        assert key in environment, key
    assert environment["threads"] == 1 and environment["device"] == "cpu"


def test_the_default_results_file_is_named_after_the_benchmark():
    bench = common.Benchmark(str(ROOT / "benchmarks" / "random_walk.py"), "A test.")
    bench.parse([])
    assert bench.path() == ROOT / "benchmarks" / "results" / "random_walk.json"


@pytest.mark.parametrize("whole", [True, False])
def test_a_seeds_run_and_bound_directories_follow_seed_0s(whole):
    """Seed k of a lever lands where benchmarks/msrc21.py puts seed k of the baseline, and a whole
    pipeline's bound beside its own run, so label_levers and the benchmark find each other's runs."""
    weak, bound = Path("runs/msrc21"), Path("runs/msrc21_gt")
    assert seed_run_dirs(weak, bound, 0, whole) == (weak, bound)
    assert seed_weak_dir(weak, 0, whole) == weak
    kind = "pipeline" if whole else "seed"
    run_2, bound_2 = seed_run_dirs(weak, bound, 2, whole)
    assert run_2 == seed_weak_dir(weak, 2, whole) == Path(f"runs/msrc21_{kind}2")
    assert bound_2 == (Path("runs/msrc21_pipeline2_gt") if whole else Path("runs/msrc21_gt_seed2"))
