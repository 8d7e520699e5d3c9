"""A tiny, fast configuration of the whole pipeline for the failure tests, and the tools they
share: an uninterrupted reference run (made once per test session), copies of its stages, a
comparison of two runs' outputs, and a launcher for ``affinitynet`` in a child process that stops
at a chosen point inside a stage so that the test can kill it there with SIGKILL.

Run as a script (``python tests/tiny_pipeline.py <affinitynet arguments>``) it is the child:
``affinitynet.cli.main`` with, when ``AFFINITYNET_TEST_PAUSE`` is set, a hook that writes the
file named by ``AFFINITYNET_TEST_READY`` at the chosen point and then waits there to be killed.
Points (JSON): ``{"kind": "before_replace" | "after_replace", "pattern": GLOB, "count": N}`` (the
N-th atomic rename onto a path matching GLOB: before it the temporary file is complete and the
target absent, after it the target is in place) or ``{"kind": "optimizer_step", "count": N}``
(after the N-th optimizer step of the process).
"""
from __future__ import annotations

import contextlib
import csv
import fnmatch
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

PAUSE_ENV = "AFFINITYNET_TEST_PAUSE"
READY_ENV = "AFFINITYNET_TEST_READY"

# 12 training and 4 validation images of 64 px, one thread, a CPU: a whole run takes about 15 s.
# Two epochs per network, so that a kill in epoch 2 resumes from the epoch-1 checkpoint.
TINY = (
    "device=cpu", "threads=1", "num_workers=0",
    "dataset.demo_size=64", "dataset.demo_train=12", "dataset.demo_val=4",
    "cam.crop_size=64", "cam.resize_long=[56,72]", "cam.batch_size=4", "cam.epochs=2", "cam.scales=[1.0]",
    "affinity.crop_size=64", "affinity.batch_size=4", "affinity.epochs=2",
    "irn.crop_size=64", "irn.batch_size=4", "irn.epochs=2",
    "segmentation.crop_size=64", "segmentation.batch_size=4", "segmentation.epochs=2",
    "segmentation.scales=[1.0]",
)
STEPS_PER_EPOCH = 3          # 12 images, batches of 4
STAGE_NAMES = ("train_cam", "infer_cam", "confident_regions", "train_affinity", "random_walk",
               "train_seg", "infer_seg", "evaluate_run")
# Files that differ between two correct runs: timings and counts of reused images.
VOLATILE = {"_stage.json", "config.yaml"}


def overrides(run_dir: Path, data_root: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"dataset.root={data_root}", *TINY, *extra]


def argv(command: str, run_dir: Path, data_root: Path, *extra: str, flags: Sequence[str] = ()) -> list[str]:
    """``affinitynet`` arguments: ``command --config demo <tiny overrides> <extra>``."""
    return [command, *flags, "--config", "demo", *overrides(run_dir, data_root, *extra)]


def config(run_dir: Path, data_root: Path, *extra: str) -> dict[str, Any]:
    from affinitynet.config import load_config

    return load_config("demo", overrides(run_dir, data_root, *extra))


def cli(args: Sequence[str], capsys=None) -> tuple[int, str, str]:
    """``affinitynet <args>`` in this process: (exit code, stdout, stderr); with ``capsys`` the
    output is the command's alone."""
    from affinitynet.cli import main

    if capsys is not None:
        capsys.readouterr()
    code = main(list(args))
    if capsys is None:
        return code, "", ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the reference run ----------------------------------------------------------------------

_REFERENCE: dict[str, tuple[Path, Path]] = {}


def reference_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run_dir, data_root) of one uninterrupted tiny run, made once per test session (the
    cache is this module's, which every test module shares)."""
    if "run" not in _REFERENCE:
        base = tmp_path_factory.mktemp("tiny-reference")
        run_dir, data_root = base / "run", base / "data"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            code, _, _ = cli(argv("run", run_dir, data_root))
        assert code == 0, f"reference run failed: {err.getvalue()[-2000:]}"
        _REFERENCE["run"] = (run_dir, data_root)
    return _REFERENCE["run"]


def copy_stages(reference: Path, run_dir: Path, stages: Iterable[str], checkpoints: bool = False) -> Path:
    """A new run directory holding copies of ``stages`` of the reference run (without the
    training-resume ``checkpoint.pt`` unless asked), so that a later stage can run in it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ignore = None if checkpoints else shutil.ignore_patterns("checkpoint.pt")
    for stage in stages:
        shutil.copytree(reference / stage, run_dir / stage, ignore=ignore)
    return run_dir


def stage_state(run_dir: Path, stage: str) -> dict[str, Any] | None:
    marker = run_dir / stage / "_stage.json"
    return json.loads(marker.read_text()) if marker.exists() else None


def temporary_files(root: Path) -> list[Path]:
    """Leftovers of interrupted atomic writes (``.<name>.<random>.tmp``)."""
    return sorted(root.rglob(".*.tmp"))


# --- comparing two runs -----------------------------------------------------------------------

def _same_tensors(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b))
    return a == b


def _log_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def compare_file(reference: Path, other: Path) -> str | None:
    """None when ``other`` holds the same result as ``reference``, else what differs. PNGs and
    other files byte for byte, .npz array by array, .pt state dicts (model, optimizer) tensor by
    tensor, log.csv without its timings, results.json by its scores."""
    import numpy as np
    import torch

    name = reference.name
    if name.endswith(".npz"):
        with np.load(reference) as a, np.load(other) as b:
            if sorted(a.files) != sorted(b.files):
                return f"arrays {sorted(a.files)} != {sorted(b.files)}"
            for key in a.files:
                if a[key].dtype != b[key].dtype or not np.array_equal(a[key], b[key]):
                    return f"array '{key}' differs"
        return None
    if name.endswith(".pt"):
        a = torch.load(reference, map_location="cpu", weights_only=True)
        b = torch.load(other, map_location="cpu", weights_only=True)
        for key in ("model", "optimizer", "epoch", "meta"):
            if (key in a or key in b) and not _same_tensors(a.get(key), b.get(key)):
                return f"'{key}' differs"
        return None
    if name == "log.csv":
        return None if _log_rows(reference) == _log_rows(other) else "logged losses differ"
    if name == "results.json":
        a, b = json.loads(reference.read_text()), json.loads(other.read_text())
        return None if a["rows"] == b["rows"] else "scores differ"
    return None if reference.read_bytes() == other.read_bytes() else "bytes differ"


def compare_runs(reference: Path, other: Path, stages: Iterable[str] = STAGE_NAMES) -> dict[str, Any]:
    """{"compared": files found equal, "differences": ["<file>: <what>"]} over the outputs of
    ``stages`` (and results.json with evaluate_run); a file missing on either side is a difference."""
    compared, differences = 0, []
    stages = list(stages)
    roots = [Path(stage) for stage in stages] + ([Path("results.json")] if "evaluate_run" in stages else [])
    for root in roots:
        names: set[Path] = set()
        for base in (reference, other):
            target = base / root
            if target.is_file():
                names.add(root)
            elif target.is_dir():
                names.update(p.relative_to(base) for p in target.rglob("*") if p.is_file())
        for relative in sorted(names):
            if relative.name in VOLATILE:
                continue
            a, b = reference / relative, other / relative
            if not a.exists() or not b.exists():
                differences.append(f"{relative}: only in {'the reference' if a.exists() else 'the resumed run'}")
                continue
            problem = compare_file(a, b)
            if problem:
                differences.append(f"{relative}: {problem}")
            else:
                compared += 1
    return {"compared": compared, "differences": differences}


# --- a child process killed at a chosen point ---------------------------------------------------

class Killed(dict):
    """What :func:`kill_at` did: the point, the seconds it took, the child's log."""


def kill_at(args: Sequence[str], point: dict[str, Any], workdir: Path, timeout: float = 240.0) -> Killed:
    """Run ``affinitynet <args>`` in a child process, wait until it reaches ``point`` (see the
    module docstring) and kill it there with SIGKILL: no handler, no cleanup, as a power cut or
    the OOM killer would."""
    workdir.mkdir(parents=True, exist_ok=True)
    number = len(list(workdir.glob("child-*.log")))
    ready = workdir / f"paused-{number}"
    log_path = workdir / f"child-{number}.log"
    import affinitynet

    # The child imports the affinitynet this process imported, installed or not.
    package_parent = str(Path(affinitynet.__file__).resolve().parents[1])
    python_path = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, PAUSE_ENV: json.dumps(point), READY_ENV: str(ready), "PYTHONPATH": python_path}
    started = time.monotonic()
    with open(log_path, "wb") as log:
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], stdout=log,
                                 stderr=subprocess.STDOUT, env=env, cwd=workdir)
        try:
            while not ready.exists():
                if child.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise AssertionError(f"the child exited ({child.returncode}) before reaching {point}:\n{tail}")
                if time.monotonic() - started > timeout:
                    raise AssertionError(f"the child did not reach {point} in {timeout:.0f} s")
                time.sleep(0.02)
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert child.returncode == -signal.SIGKILL, child.returncode
    return Killed(point=point, where=ready.read_text(), seconds=time.monotonic() - started,
                  log=log_path.read_text(errors="replace"))


def _install_pause(point: dict[str, Any], ready: Path) -> None:
    seen = [0]

    def pause(where: str) -> None:
        ready.write_text(where)
        while True:          # the test kills this process now
            time.sleep(60)

    def reached(where: str) -> None:
        seen[0] += 1
        if seen[0] == point["count"]:
            pause(where)

    kind = point["kind"]
    if kind in ("before_replace", "after_replace"):
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            matches = fnmatch.fnmatch(os.fspath(dst), point["pattern"])
            if matches and kind == "before_replace":
                reached(f"before renaming {src} to {dst}")
            result = real_replace(src, dst, *args, **kwargs)
            if matches and kind == "after_replace":
                reached(f"after renaming {src} to {dst}")
            return result

        os.replace = replace
    elif kind == "optimizer_step":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda optimizer, args, kwargs: reached(f"after optimizer step {seen[0] + 1}"))
    else:
        raise ValueError(f"unknown pause point {point}")


# --- which config keys each stage reads ------------------------------------------------------

class Recording(dict):
    """A config (section) that notes the dotted name of every leaf key read from it, unless
    ``paused[0]``: the pipeline's own bookkeeping (hashes, the saved config.yaml, the size rules)
    reads every key and is not a stage's reading."""

    def __init__(self, tree: dict[str, Any], log: set[str], paused: list[bool], prefix: str = ""):
        super().__init__({k: Recording(v, log, paused, f"{prefix}{k}.") if isinstance(v, dict) else v
                          for k, v in tree.items()})
        self._log, self._paused, self._prefix = log, paused, prefix

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if not isinstance(value, Recording) and not self._paused[0]:
            self._log.add(self._prefix + key)
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default

    # Overriding iteration makes dict(), ** and json read through __getitem__.
    def __iter__(self):
        return iter(list(super().keys()))

    def items(self):
        return [(k, self[k]) for k in super().keys()]

    def values(self):
        return [self[k] for k in super().keys()]


def plain(tree: Any) -> Any:
    return {k: plain(dict.__getitem__(tree, k)) for k in dict.keys(tree)} if isinstance(tree, dict) else tree


def recording_run(config: dict[str, Any], monkeypatch) -> dict[str, set[str]]:
    """Run every stage of ``config``'s graph that is not complete yet, in this process, with a
    config that notes each key read; the keys each stage read. The pipeline's bookkeeping
    (hashes, the saved config.yaml, the size rules) reads every key and is left out."""
    from affinitynet import pipeline
    from affinitynet.pipeline import hashing, run_dir, runner, size_rules

    log: set[str] = set()
    paused = [False]

    def quietly(function, convert=False):
        def wrapped(config, *args, **kwargs):
            paused[0] = True
            try:
                return function(plain(config) if convert else config, *args, **kwargs)
            finally:
                paused[0] = False
        return wrapped

    # Each function is replaced where the pipeline's modules call it.
    for module in (run_dir, runner):
        monkeypatch.setattr(module, "record_run", quietly(run_dir.record_run, convert=True))
    for module in (hashing, run_dir):
        for name in ("stage_hash", "stage_inputs", "hash_matches"):
            monkeypatch.setattr(module, name, quietly(getattr(hashing, name)))
    monkeypatch.setattr(hashing, "_hash", quietly(hashing._hash))
    monkeypatch.setattr(runner, "resolve_auto", quietly(size_rules.resolve_auto))
    recording = Recording(config, log, paused)
    reads = {}
    for spec in pipeline.stages(config):
        if pipeline.is_complete(config, spec.name):
            continue
        log.clear()
        pipeline.run_stage(recording, spec.name)
        assert pipeline.is_complete(config, spec.name), spec.name
        reads[spec.name] = set(log)
    return reads


if __name__ == "__main__":
    if os.environ.get(PAUSE_ENV):
        _install_pause(json.loads(os.environ[PAUSE_ENV]), Path(os.environ[READY_ENV]))
    from affinitynet.cli import main

    sys.exit(main(sys.argv[1:]))
