"""What every benchmark shares: the options ``--threads``, ``--device`` and ``--json``, the
environment record and the results file.

Run a benchmark from the repository root as a module of the ``benchmarks`` package:

    python -m benchmarks.NAME [--threads N] [--device cpu] [--json PATH] [its own options]

Each one prints what it measured and writes it, with the environment record, to
``benchmarks/results/NAME.json`` (or ``--json PATH``)::

    {"benchmark": NAME, "command": "python -m benchmarks.NAME ...", "options": {...},
     "environment": {"commit", "dirty", "cpu_model", "cpu_flags", "cpus", "torch", "threads",
                     "device", "load_average", "python", "platform", "date", "wall_seconds"},
     "results": {..., "summary": {a few headline figures}}}

``python -m benchmarks.render`` turns those files into the tables of ``docs/results.md`` and of
the README (docs/results.md says which file feeds which table).

The options mean the same in every script:

- ``--threads N``: torch threads of the benchmark's process (default 0: torch's default, one per
  core). A script whose method pins the thread count of one measurement (one thread for steadier
  ratios, or a list of thread counts it compares) says so in its ``--help``.
- ``--device``: where the networks run. Every script accepts it and rejects a device it does not
  support (most of them measure the CPU and take only ``cpu``) or one this machine lacks.
- ``--json PATH``: where the results go.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CPU_ONLY = ("cpu",)
ANY_DEVICE = ("cpu", "cuda")


class Benchmark:
    """One benchmark script's shared options, clock and results file.

    ``Benchmark(__file__, __doc__)`` builds the parser (``.parser``: add the script's own options
    to it), ``.parse()`` parses and applies ``--threads`` and checks ``--device``, and
    ``.write(results)`` writes the JSON file with the environment record."""

    def __init__(self, file: str, doc: str | None, devices: Sequence[str] = CPU_ONLY,
                 default_device: str | None = None, name: str | None = None, results_name: str | None = None):
        self.module = Path(file).stem
        self.name = name or self.module
        self.devices = tuple(devices)
        self.parser = argparse.ArgumentParser(
            prog=f"python -m benchmarks.{self.module}",
            description=(doc or "").strip().split("\n\n")[0],
            epilog="Shared options: see benchmarks/common.py. Run from the repository root.")
        shared = self.parser.add_argument_group("shared benchmark options")
        shared.add_argument("--threads", type=int, default=0, metavar="N",
                            help="torch threads of this process (default 0: torch's default, one per core)")
        default_device = default_device or self.devices[0]
        shared.add_argument("--device", default=default_device,
                            help=f"where the networks run: {', '.join(self.devices)} (default {default_device})")
        shared.add_argument("--json", type=Path, default=None, metavar="PATH",
                            help=f"results file (default benchmarks/results/{results_name or self.name}.json)")
        self.args: argparse.Namespace | None = None
        self.argv: list[str] = []
        self.started = time.time()

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        self.argv = list(sys.argv[1:] if argv is None else argv)
        args = self.parser.parse_args(self.argv)
        if args.threads < 0:
            self.parser.error(f"--threads must be 0 (torch's default) or more, not {args.threads}")
        error = check_device(args.device, self.devices)
        if error:
            self.parser.error(error)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        self.args = args
        self.started = time.time()
        return args

    def path(self, name: str | None = None) -> Path:
        if self.args is not None and self.args.json is not None:
            return self.args.json
        return RESULTS / f"{name or self.name}.json"

    def write(self, results: dict[str, Any], name: str | None = None) -> Path:
        """Write ``results`` with the environment record; ``name`` replaces the script's name in
        the default file name (``seed_spread`` writes ``seed_spread_demo.json``)."""
        args = self.args
        options = {k: _jsonable(v) for k, v in vars(args).items()} if args is not None else {}
        record = {
            "benchmark": name or self.name,
            "command": shlex.join(["python", "-m", f"benchmarks.{self.module}", *self.argv]),
            "options": options,
            "environment": environment(args.device if args is not None else "cpu", time.time() - self.started),
            "results": _jsonable(results),
        }
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(temporary, path)
        print(f"results: {_shown(path)}")
        return path


def check_device(device: str, supported: Sequence[str]) -> str | None:
    """None if ``device`` is one of ``supported`` (``cuda:N`` counts as ``cuda``) and present on
    this machine, else the reason it is not."""
    kind = device.split(":", 1)[0]
    if kind not in supported:
        return (f"--device {device}: this benchmark runs on {', '.join(supported)} only"
                if len(supported) > 1 else f"--device {device}: this benchmark measures the CPU (--device cpu)")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return f"--device {device}: no CUDA device on this machine"
        if ":" in device:
            index = device.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


# --- the environment record ---------------------------------------------------------------------

class Patches:
    """Attributes replaced for a while (shims for another project's code) and put back by
    ``undo()``, last first; an attribute that was absent is removed again."""

    _absent = object()

    def __init__(self):
        self.saved: list[tuple[Any, str, Any]] = []

    def patch(self, owner: Any, name: str, value: Any) -> None:
        self.saved.append((owner, name, getattr(owner, name, self._absent)))
        setattr(owner, name, value)

    def undo(self) -> None:
        for owner, name, value in reversed(self.saved):
            if value is self._absent:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        self.saved.clear()


def work_folder(path: Path | None, prefix: str) -> Path:
    """An empty working folder outside the repository for a benchmark that runs another project's
    code beside this one: ``path`` emptied first, or a new temporary folder named ``prefix...``."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def commit() -> tuple[str | None, bool | None]:
    """The checkout's commit, and whether its code differs from it (changes to tracked files other
    than the results, the docs and the README: what a benchmark runs)."""
    head = git("rev-parse", "HEAD")
    if head is None:
        return None, None
    changes = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  ":(exclude)benchmarks/results", ":(exclude)docs", ":(exclude)README.md")
    return head, None if changes is None else bool(changes)


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and flags, from /proc/cpuinfo (Linux); the machine's name elsewhere."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "cpu model") and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and flags is None:
                    flags = " ".join(sorted(value.split()))
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    return {"cpu_model": model or platform.processor() or platform.machine(), "cpu_flags": flags,
            "cpus": os.cpu_count()}


def environment(device: str = "cpu", wall_seconds: float | None = None) -> dict[str, Any]:
    import torch

    head, dirty = commit()
    record: dict[str, Any] = {"commit": head, "dirty": dirty, **cpu_info(), "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:  # how busy the machine was (other jobs move every timing on a shared machine)
        record["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        record["load_average"] = None
    record.update(python=platform.python_version(), platform=platform.platform(),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  wall_seconds=None if wall_seconds is None else round(wall_seconds, 1))
    return record


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:
        return None  # NaN: JSON has none
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --- helpers several benchmarks use -------------------------------------------------------------

def module_command(file: str, *args: str) -> list[str]:
    """The command that runs benchmark ``file`` again in a fresh process (its workers), as a
    module of this package."""
    return [sys.executable, "-m", f"benchmarks.{Path(file).stem}", *args]


def module_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of such a process: this repository first on its path, so that
    ``benchmarks`` imports from any working directory."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def status_mb(field: str) -> float:
    """A size from /proc/self/status in MB. VmHWM (peak RSS) belongs to this process's own
    address space; ru_maxrss would not do, as Linux carries the parent's peak over the exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS ("5" to clear_refs, Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def matmul_peak(seconds: float = 2.0, size: int = 2048) -> float:
    """The best float32 FLOP/s of a square matmul over ``seconds``."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best, end = 0.0, time.time() + seconds
    while time.time() < end:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size ** 3 / (time.perf_counter() - start))
    return best
