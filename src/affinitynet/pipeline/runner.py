"""The runner: one stage, or the config's graph in order, skipping what is current; the checks
before a command runs (none writes); and the processes of ``run --procs``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

from ..data.datasets import check_skipped_share, describe_classes
from ..data.label_coverage import summary_line
from ..engine import distributed
from ..engine.training import batch_per_process
from ..errors import InputError
from ..files import CONFIG_FILE
from ..models.networks import networks, training_section
from .graph import readers, stage, stages
from .run_dir import check_run_dir, is_complete, json_or_none, record_run, skip_reason, training_split
from .size_rules import resolve_auto


def run_stage(config: dict[str, Any], name: str, force: bool = False) -> dict[str, Any] | None:
    """Run one stage, or skip it (None) when its outputs are complete and current and it is not
    forced: re-entering a finished stage would only overwrite its recorded time."""
    resolve_auto(config)
    reason = skip_reason(config, name, force)
    if reason:
        if distributed.is_main():
            print(f"[{name}] {reason}")
        return None
    return stage(name).run(config, force=force)


def run_all(config: dict[str, Any], force: Iterable[str] = (),
            runner: Callable[[dict[str, Any], str, bool], Any] | None = None) -> None:
    """Every stage of the config's graph (:func:`stages`) in order, skipping those whose outputs
    are complete and current, and those whose every reader is complete and current: nothing would
    read their outputs (after ``import-weights psa-aff``, ``confident_regions`` feeds only the
    imported AffinityNet). ``runner(config, name, force)`` runs a stage (default :func:`run_stage`)."""
    forced = set(force)
    for spec in stages(config):
        reason = skip_reason(config, spec.name, spec.name in forced, readers(config, spec.name))
        if reason and not is_complete(config, spec.name):
            if distributed.is_main():
                print(f"[{spec.name}] {reason}")
            continue
        (runner or run_stage)(config, spec.name, spec.name in forced)


class ProcessesFailed(Exception):
    """A stage run by :func:`processes_runner`'s processes failed; they have said why.
    ``args[0]``: the exit code."""


def processes_runner(procs: int) -> Callable[[dict[str, Any], str, bool], None]:
    """A runner for :func:`run_all` (``run --procs N`` on a CPU): each training stage in this
    process, with the config's threads, and every other stage (per image: inference, the CRF, the
    walk, scoring) as N single-threaded processes. On a 2-core CPU the trainings ran slower as
    processes and the per-image stages faster (docs/performance.md, "Threads and processes"); a training in one process also
    keeps one process's float roundings, so the figures are those of a run without ``--procs``."""
    trainings = {network.stage for network in networks()}

    def runner(config: dict[str, Any], name: str, force: bool) -> None:
        if name in trainings or (not force and is_complete(config, name)):
            run_stage(config, name, force=force)
            return
        record_run(config)   # the processes read this run's resolved config
        code = distributed.launch(procs, [stage(name).command, "--config", str(Path(config["run_dir"]) / CONFIG_FILE),
                                          *(["--force"] if force else [])])
        if code:
            raise ProcessesFailed(code)

    return runner


def preflight(config: dict[str, Any], replace: bool = False, announce: bool = False,
              names: Iterable[str] | None = None):
    """The checks before a command runs stages ``names`` (default: the config's graph), none of
    which writes: under torchrun each training's batch splits evenly over the processes; the
    training split is read (a skipped share above ``dataset.max_skipped`` stops here), and the run
    directory must hold this dataset's outputs or none (:func:`check_run_dir`). With ``announce``
    the class list, its image counts and the dataset's warnings are printed. Returns the training
    split."""
    names = {spec.name for spec in stages(config)} if names is None else set(names)
    for network in networks():
        if network.stage in names:
            batch_per_process(training_section(network.kind, config), network.kind,
                              int(os.environ.get("WORLD_SIZE", "1")))
    check_run_dir(config, replace=replace)      # before the dataset is read (a demo is generated)
    data = training_split(config)
    if announce and distributed.is_main():
        for line in describe_classes(data):
            print(line)
    if config["strict"] and data.skipped:
        raise InputError(data.root, f"{data.skipped[0]} (--strict stops at the first bad input)")
    check_skipped_share(data, config["dataset"]["max_skipped"])
    check_run_dir(config, data, replace)
    return data


def run_summary(config: dict[str, Any]) -> str | None:
    """One line on what the run's labels hold, from ``results.json`` (evaluate-run): the mIoU
    where there is ground truth, and, ground truth or not, the images whose tagged class vanished
    and the classes that (almost) never appear."""
    results = json_or_none(Path(config["run_dir"]) / "results.json")
    return summary_line(results) if isinstance(results, dict) else None
