"""The orchestrator (irn's structure): stages in order, each a ``run(config)`` in
``affinitynet.stages``, each writing to its own directory of the run.

A stage directory holds ``_stage.json``: the hash of the config keys the stage depends on (and
of its upstream stages' hashes) and whether it completed. ``affinitynet run`` skips a stage whose
outputs are complete and current; a changed key (say ``random_walk.beta``) re-runs that stage and
everything downstream. Per-image outputs are written atomically, so a killed stage, started again
with the same hash, keeps the images it finished and does the rest.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm import tqdm

from . import distributed
from .config import TRAINING_KEYS, dump, flatten, get, load_config, section_hash
from .datasets import dataset_keys
from .errors import ConfigError, InputError, StageError
from .files import read_json, write_json, write_text
from .precision import dtype_name
from .training import batch_per_process, resolve_device

log = logging.getLogger(__name__)

# Keys no stage's outputs depend on, so no stage hashes them (tests/test_stage_contract.py holds
# every other key to be hashed by each stage that reads it): how and where the work runs, the
# threshold of a check before it, the graph's choice (the chosen stage's hash is hashed in its
# place), and the settings of the commands that are not stages.
RUNTIME_KEYS: dict[str, str] = {
    "run_dir": "where the outputs go",
    "device": "where the work runs",
    "threads": "how the work runs",
    "num_workers": "how the images are loaded",
    "amp": "how the work runs (numerics within mixed precision's tolerance)",
    "channels_last": "how the work runs (the memory layout of the same convolutions)",
    "plugins": "which modules register parts (the names of the parts a stage uses are hashed)",
    "strict": "whether a bad input stops the command or is skipped",
    "dataset.max_skipped": "a check before the stages run",
    "labels.method": "chooses the label stage, whose hash the network's stages hash",
    "report.gallery_size": "affinitynet report, not a stage",
    "sweep.betas": "affinitynet sweep, not a stage",
    "sweep.ts": "affinitynet sweep, not a stage",
    "sweep.alphas": "affinitynet sweep, not a stage",
    "sweep.max_images": "affinitynet sweep, not a stage",
}
# Each stage directory's record of its hash, inputs and completion (:class:`StageRun`).
MARKER = "_stage.json"
# The stage whose outputs are the run's result: ``affinitynet run`` executes it and what it reads.
FINAL_STAGE = "evaluate_run"


def dataset_inputs() -> tuple[str, ...]:
    """The keys that say which images every stage sees, hashed by every stage: those the
    registered datasets read (read when asked, so that a dataset registered late counts), and
    the training split."""
    return dataset_keys() + ("dataset.train_split",)


def training_keys(section: str) -> tuple[str, ...]:
    """The keys of a training section (``cam``, ``affinity``, ``segmentation``) that shape what
    its network learns."""
    return tuple(f"{section}.{key}" for key in TRAINING_KEYS)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, declared by its own module in ``affinitynet.stages`` as ``STAGE``.

    ``upstream`` is a tuple of stage names, or a function of the config giving them (the
    segmentation network reads the labels of the configured label method, or none for the
    ground-truth bound). ``outputs`` names what the stage writes, as paths relative to its
    directory; other code asks for them with :meth:`output` instead of spelling the path.
    """
    name: str                      # directory name and module name in affinitynet.stages
    command: str                   # CLI subcommand
    help: str
    keys: tuple[str, ...]          # config keys the outputs depend on (besides dataset_inputs())
    upstream: tuple[str, ...] | Callable[[dict[str, Any]], tuple[str, ...]]
    outputs: dict[str, str]
    run: Callable[..., dict[str, Any]]
    # Keys added after runs were made: hashed only when not at their default, so that a run made
    # before they existed stays current.
    optional_keys: tuple[str, ...] = ()
    # The pseudo-label method (config key ``labels.method``) whose labels this stage writes as its
    # output ``pseudo_labels``, with ``label_rows(config)``: (Table 1 title, output name) of each
    # kind of label it writes, the training labels last.
    label_method: str | None = None
    label_rows: Callable[[dict[str, Any]], list[tuple[str, str]]] | None = None
    # A further product of a label method that ``affinitynet run`` makes with it (IRN's
    # instance labels): the method's name.
    companion_of: str | None = None

    def upstream_of(self, config: dict[str, Any]) -> tuple[str, ...]:
        return tuple(self.upstream(config)) if callable(self.upstream) else self.upstream

    def directory(self, run: dict[str, Any] | str | Path) -> Path:
        """The stage's directory in a run (given as its config or its directory)."""
        return Path(run["run_dir"] if isinstance(run, dict) else run) / self.name

    def marker(self, run: dict[str, Any] | str | Path) -> Path:
        """The stage's bookkeeping file (:class:`StageRun`) in a run."""
        return self.directory(run) / MARKER

    def output(self, name: str, run: dict[str, Any] | str | Path) -> Path:
        """The path of output ``name`` in a run (given as its config or its directory)."""
        if name not in self.outputs:
            raise KeyError(f"stage '{self.name}' has no output '{name}' (it has: {', '.join(self.outputs)})")
        return Path(os.path.normpath(self.directory(run) / self.outputs[name]))


def _discover() -> dict[str, Stage]:
    """Every ``STAGE`` declared by a module of ``affinitynet.stages``, by name."""
    import pkgutil

    from . import stages as stage_modules

    found: dict[str, Stage] = {}
    for module in pkgutil.iter_modules(stage_modules.__path__):
        declared = getattr(importlib.import_module(f"{stage_modules.__name__}.{module.name}"), "STAGE", None)
        if isinstance(declared, Stage):
            found[declared.name] = declared
    return found


_STAGES: dict[str, Stage] = {}


def all_stages() -> dict[str, Stage]:
    """Every declared stage, by name."""
    if not _STAGES:
        _STAGES.update(_discover())
    return _STAGES


def stage(name: str) -> Stage:
    """The stage declared under ``name`` (``stage("random_walk").output("pseudo_labels", config)``)."""
    try:
        return all_stages()[name]
    except KeyError:
        raise StageError(f"unknown stage '{name}' (stages: {', '.join(all_stages())})") from None


def label_methods() -> dict[str, Stage]:
    """The pseudo-label methods (``labels.method``), each with the stage writing its labels."""
    return {spec.label_method: spec for spec in all_stages().values() if spec.label_method}


def label_stage(config: dict[str, Any]) -> Stage:
    """The stage whose ``pseudo_labels`` train the segmentation network under this config."""
    return label_methods()[config["labels"]["method"]]


def companion_stages(config: dict[str, Any]) -> tuple[Stage, ...]:
    """The stages that the configured label method makes beside its pseudo labels."""
    method = config["labels"]["method"]
    return tuple(spec for spec in all_stages().values() if spec.companion_of == method)


def stages(config: dict[str, Any] | None = None) -> list[Stage]:
    """The stages ``affinitynet run`` executes under ``config``, in order: the final stage and
    everything it reads, each after its upstream stages (depth first, upstream in the order
    declared). Without a config: every declared stage, those of the default graph first."""
    from .config import DEFAULTS

    ordered: list[str] = []

    def visit(name: str, graph_config: dict[str, Any]) -> None:
        if name in ordered:
            return
        for parent in stage(name).upstream_of(graph_config):
            visit(parent, graph_config)
        ordered.append(name)

    visit(FINAL_STAGE, config if config is not None else DEFAULTS)
    if config is None:
        for name in all_stages():
            visit(name, DEFAULTS)
    return [stage(name) for name in ordered]


def upstream_stages(config: dict[str, Any], name: str) -> tuple[str, ...]:
    """The stages whose outputs ``name`` reads under this config."""
    return stage(name).upstream_of(config)


def _hashed_keys(name: str, config: dict[str, Any]) -> tuple[str, ...]:
    from .config import DEFAULTS

    spec = stage(name)
    changed = tuple(key for key in spec.optional_keys if get(config, key) != get(DEFAULTS, key))
    return spec.keys + dataset_inputs() + changed


# Keys that name files: hashed as absolute paths, so that the same dataset named relative to
# another working directory (or once relative, once absolute) is the same input, not a reason to
# train every network again.
PATH_KEYS = ("dataset.root", "dataset.labels_file", "dataset.classes_file", "dataset.masks_dir",
             "backbone.weights")


def _absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    resolved = {section: dict(value) if isinstance(value, dict) else value for section, value in config.items()}
    for key in PATH_KEYS:
        section, _, leaf = key.partition(".")
        value = resolved.get(section, {}).get(leaf)
        if isinstance(value, str) and value:
            resolved[section][leaf] = os.path.realpath(os.path.expanduser(value))
    return resolved


def _hash(config: dict[str, Any], name: str) -> str:
    upstream = tuple(_hash(config, parent) for parent in upstream_stages(config, name))
    return section_hash(config, _hashed_keys(name, config), *upstream)


def stage_hash(config: dict[str, Any], name: str) -> str:
    """The hash of the config keys stage ``name`` depends on and of its upstream stages' hashes."""
    return _hash(_absolute_paths(config), name)


def hash_matches(recorded: Any, config: dict[str, Any], name: str) -> bool:
    """Whether a recorded stage hash is this config's. Runs made before paths were hashed
    absolute recorded the paths as written; they stay current when given the same spelling."""
    return recorded is not None and recorded in (stage_hash(config, name), _hash(config, name))


def stage_inputs(config: dict[str, Any], name: str) -> dict[str, Any]:
    """What a stage's hash is made of, readable: the value of every hashed key (sections
    flattened to dotted keys) and the hash of every upstream stage. Kept in ``_stage.json`` so that
    a re-run can say what changed."""
    values: dict[str, Any] = {}
    for key in sorted(set(_hashed_keys(name, config))):
        value = get(config, key)
        if isinstance(value, dict):
            values.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            values[key] = value
    return {"inputs": {"keys": values,
                       "upstream": {parent: stage_hash(config, parent) for parent in upstream_stages(config, name)}}}


def rerun_reason(config: dict[str, Any], name: str, previous: dict[str, Any] | None, force: bool) -> str | None:
    """Why a stage that has outputs runs again (None for a first run): ``random_walk.beta 8.0 ->
    10.0``, an upstream stage that changed, ``--force``, or an unfinished stage being resumed."""
    if previous is None:
        return None
    if force:
        return "re-running: forced (--force)"
    if hash_matches(previous.get("hash"), config, name):
        return None if previous.get("complete") else "resuming: the outputs it finished are kept"
    if previous.get("hash") == REPLACED:
        return "re-running: the run directory's dataset was replaced"
    if previous.get("out_of_date"):
        return f"re-running: {previous['out_of_date']}"
    before = previous.get("inputs") if isinstance(previous.get("inputs"), dict) else {}
    now = stage_inputs(config, name)["inputs"]
    old_keys, new_keys = before.get("keys") or {}, now["keys"]
    changes = [f"{key} {_short(old_keys.get(key, '(unset)'))} -> {_short(new_keys.get(key, '(unset)'))}"
               for key in sorted(set(old_keys) | set(new_keys)) if old_keys.get(key) != new_keys.get(key)]
    if before.get("keys") is not None:
        old_up = before.get("upstream") or {}
        changes += [f"upstream {parent} changed" for parent, value in now["upstream"].items()
                    if old_up.get(parent) != value]
    if not changes:
        changes = ["its settings changed (made by an older version that did not record them)"]
    shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
    return f"re-running: {shown}"


def _short(value: Any) -> str:
    """A config value for a one-line message: strings (paths) whole, lists and the like cut."""
    if isinstance(value, str):
        return value
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _difference(key: str, before: Any, after: Any) -> str:
    if key == "class_names" and isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            return f"{len(before) - 1} object classes -> {len(after) - 1}"
        index = next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
        return f"class {index} '{before[index]}' -> '{after[index]}'"
    return f"{key} {_short(before)} -> {_short(after)}"


# --- the run directory --------------------------------------------------------------------------

CONFIG_FILE = "config.yaml"
DATASET_FILE = "_dataset.json"
REPLACED = "replaced-dataset"      # the hash of a stage whose dataset a forced command replaced


def dataset_identity(config: dict[str, Any], data=None) -> dict[str, Any]:
    """What makes two runs' outputs comparable: the dataset's name, its root (absolute) and its
    class list (a changed class file keeps the config's keys but not the meaning of the labels).
    Without ``data`` the class list is left out."""
    root = config["dataset"]["root"]
    identity = {"name": config["dataset"]["name"], "root": str(Path(root).resolve()) if root else None}
    if data is not None:
        identity["class_names"] = list(data.class_names)
    return identity


def _training_split(config: dict[str, Any]):
    from .stages import dataset

    return dataset(config, "train_split")


def recorded_identity(run_dir: Path) -> dict[str, Any] | None:
    """The dataset whose outputs ``run_dir`` holds: its ``_dataset.json``, or for a run made before
    that file existed, the name and root of its ``config.yaml`` when some stage has finished."""
    state = _json_or_none(run_dir / DATASET_FILE)
    if isinstance(state, dict):
        return state
    if not any(run_dir.glob(f"*/{MARKER}")) or not (run_dir / CONFIG_FILE).is_file():
        return None
    try:
        saved = load_config(run_dir / CONFIG_FILE, check=False)
    except ConfigError:
        return None
    root = saved["dataset"]["root"]
    return {"name": saved["dataset"]["name"], "root": str(Path(root).resolve()) if root else None}


def check_run_dir(config: dict[str, Any], data=None, replace: bool = False) -> None:
    """Refuse (StageError, nothing changed) a run directory that holds another dataset's outputs;
    with ``replace`` (``--force``) every stage of it is marked stale, so each is redone from scratch
    before anything reads it. The class lists are compared when ``data`` (the training split) is
    given; without it the check reads no dataset."""
    run_dir = Path(config["run_dir"])
    recorded = recorded_identity(run_dir)
    if recorded is None:
        return
    current = dataset_identity(config, data)
    difference = next((_difference(key, recorded[key], current[key]) for key in current
                       if key in recorded and recorded[key] != current[key]), None)
    if difference is None:
        return
    if not replace:
        raise StageError(f"{run_dir}: holds the outputs of another dataset ({difference}); nothing was changed: "
                         f"pass --force to replace them, or choose a new --run-dir")
    if distributed.is_main():
        print(f"{run_dir}: replacing the outputs of another dataset ({difference})")
        for marker in run_dir.glob(f"*/{MARKER}"):
            write_json(marker, {"stage": marker.parent.name, "hash": REPLACED, "complete": False})
        (run_dir / DATASET_FILE).unlink(missing_ok=True)
    distributed.barrier()


def record_run(config: dict[str, Any]) -> None:
    """Write the resolved ``config.yaml`` and the dataset record: only when a stage is about to run
    with this config, so that a command that fails its checks changes nothing."""
    run_dir = Path(config["run_dir"])
    text = dump(config)
    path = run_dir / CONFIG_FILE
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text(path, text)
    if not (run_dir / DATASET_FILE).is_file():
        write_json(run_dir / DATASET_FILE, dataset_identity(config, _training_split(config)))


def readers(config: dict[str, Any], name: str) -> list[str]:
    """The stages that read the outputs of ``name`` directly."""
    return [spec.name for spec in stages(config) if name in upstream_stages(config, spec.name)]


def ancestors(config: dict[str, Any], name: str) -> list[str]:
    """Every stage whose outputs those of ``name`` derive from, in pipeline order."""
    found: set[str] = set()
    waiting = list(upstream_stages(config, name))
    while waiting:
        parent = waiting.pop()
        if parent not in found:
            found.add(parent)
            waiting += upstream_stages(config, parent)
    return [spec.name for spec in stages(config) if spec.name in found]


def descendants(config: dict[str, Any], name: str) -> list[str]:
    """Every stage whose outputs derive from those of ``name``, in pipeline order."""
    found: set[str] = set()
    ordered = stages(config)
    for spec in ordered:
        if any(parent == name or parent in found for parent in upstream_stages(config, spec.name)):
            found.add(spec.name)
    return [spec.name for spec in ordered if spec.name in found]


def _json_or_none(path: Path) -> Any:
    """A JSON file's content, or None when it is absent or unreadable (a killed write, say)."""
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def is_complete(config: dict[str, Any], name: str) -> bool:
    state = _json_or_none(stage(name).marker(config))
    return isinstance(state, dict) and state.get("complete") is True and hash_matches(state.get("hash"), config, name)


def imported_kind(config: dict[str, Any], name: str) -> str | None:
    """The kind of released weights ``import-weights`` wrote in stage ``name``, if it did."""
    state = _json_or_none(stage(name).marker(config))
    imported = state.get("imported") if isinstance(state, dict) else None
    return imported.get("kind") if isinstance(imported, dict) else None


class StageRun:
    """Bookkeeping of one stage: fresh or resumed directory, completion marker, summary line.

    Nothing in the run directory changes until the stage's upstream outputs are known to be there:
    a stage that cannot run leaves the run as it was (no stub directory, no new ``config.yaml``).
    ``check_upstream=False`` is for a stage whose outputs come from elsewhere (``import-weights``
    writes a training stage from a released checkpoint): its upstream stages need not exist.
    """

    def __init__(self, config: dict[str, Any], name: str, force: bool = False, check_upstream: bool = True):
        self.config = config
        self.name = name
        self.dir = stage(name).directory(config)
        self.hash = stage_hash(config, name)
        self.started = time.time()
        self.images = 0
        self.reused = 0
        self.skipped: list[str] = []
        self.extra: dict[str, Any] = {}
        for parent in upstream_stages(config, name) if check_upstream else ():
            if is_complete(config, parent):
                continue
            imported = imported_kind(config, parent)
            if imported:
                raise StageError(f"stage '{name}' needs the outputs of '{parent}', which holds weights imported "
                                 f"by `affinitynet import-weights {imported}` with other settings: run with "
                                 f"--run-dir {config['run_dir']} alone (its config.yaml is the one the import "
                                 f"saved) or import them again")
            raise StageError(f"stage '{name}' needs the outputs of '{parent}', which are missing or "
                             f"were made with other settings: run `affinitynet {stage(parent).command}` "
                             f"(or `affinitynet run`) first")
        marker = self.dir / MARKER
        previous = _json_or_none(marker)
        if distributed.is_main():
            record_run(config)
            reason = rerun_reason(config, name, previous, force)
            if reason:
                print(f"[{name}] {reason}")
            if force or previous is None or not hash_matches(previous.get("hash"), config, name):
                # Outputs made from other settings must not be mixed with new ones.
                if self.dir.exists():
                    shutil.rmtree(self.dir)
            else:
                # A killed write leaves its temporary file (io.atomic_write); a resumed stage drops them.
                for stale in self.dir.rglob(".*.tmp"):
                    stale.unlink(missing_ok=True)
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json(marker, {"stage": name, "hash": self.hash, "complete": False,
                                **stage_inputs(config, name)})
        distributed.barrier()

    def finish(self, **extra: Any) -> dict[str, Any]:
        self.extra.update(extra)
        gathered = distributed.all_gather_objects((self.images, self.reused, self.skipped))
        images = sum(item[0] for item in gathered)
        reused = sum(item[1] for item in gathered)
        skipped = [line for item in gathered for line in item[2]]
        # How the seconds were spent: timings mean nothing without the processes, the threads and
        # the precision the networks ran in.
        summary = {"stage": self.name, "hash": self.hash, "complete": True,
                   "seconds": round(time.time() - self.started, 2), "processes": distributed.world_size(),
                   "threads": torch.get_num_threads(),
                   "precision": dtype_name(resolve_device(self.config["device"]), self.config["amp"]),
                   "images": images, "reused": reused, "skipped": skipped,
                   **self.extra, **stage_inputs(self.config, self.name)}
        if distributed.is_main():
            write_json(self.dir / MARKER, summary)
            note = f", {reused} reused" if reused else ""
            print(f"[{self.name}] {summary['seconds']:.1f}s, {images} images{note}, {len(skipped)} skipped")
            for line in skipped[:20]:
                print(f"  skipped: {line}")
            if len(skipped) > 20:
                print(f"  ... and {len(skipped) - 20} more (see {self.dir / MARKER})")
        distributed.barrier()
        return summary


def map_images(run: StageRun, items: Sequence[Any], outputs: Callable[[Any], Iterable[Path]],
               work: Callable[[Any], None], desc: str, strict: bool = False,
               item_name: Callable[[Any], str] = lambda item: getattr(item, "id", str(item))) -> None:
    """Run ``work`` on this rank's share of ``items``, skipping items whose outputs all exist
    (a resumed stage) and items whose input is bad (logged, counted, reported at the end)."""
    mine = distributed.shard(items)
    for item in tqdm(mine, desc=desc, disable=not distributed.is_main(), dynamic_ncols=True):
        if all(path.exists() for path in outputs(item)):
            run.reused += 1
            continue
        try:
            work(item)
            run.images += 1
        except InputError as error:
            if strict:
                raise
            run.skipped.append(str(error))
            tqdm.write(f"skipped: {error}")
    if not distributed.is_distributed() and items and run.images + run.reused == 0:
        raise StageError(f"{desc}: every one of {len(items)} inputs failed; first: {run.skipped[0]}")


def run_stage(config: dict[str, Any], name: str, force: bool = False) -> dict[str, Any] | None:
    """Run one stage, or skip it (None) when its outputs are complete and current and it is not
    forced: re-entering a finished stage would only overwrite its recorded time."""
    from .size_rules import resolve_auto

    resolve_auto(config)
    if not force and is_complete(config, name):
        if distributed.is_main():
            print(f"[{name}] up to date, skipped")
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
        waiting = readers(config, spec.name)
        if (spec.name not in forced and waiting and not is_complete(config, spec.name)
                and all(is_complete(config, reader) for reader in waiting)):
            if distributed.is_main():
                print(f"[{spec.name}] not needed ({', '.join(waiting)} up to date), skipped")
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
    from .networks import NETWORKS

    trainings = {network.stage for network in NETWORKS.values()}

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
    from .datasets import check_skipped_share, describe_classes
    from .networks import NETWORKS

    names = {spec.name for spec in stages(config)} if names is None else set(names)
    for network in NETWORKS.values():
        if network.stage in names:
            batch_per_process(config[network.kind], network.kind, int(os.environ.get("WORLD_SIZE", "1")))
    check_run_dir(config, replace=replace)      # before the dataset is read (a demo is generated)
    data = _training_split(config)
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
    from .label_coverage import summary_line

    results = _json_or_none(Path(config["run_dir"]) / "results.json")
    return summary_line(results) if isinstance(results, dict) else None
