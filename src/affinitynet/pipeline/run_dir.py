"""The run directory: its resolved config, the dataset record, each stage's ``_stage.json``
(hash, inputs, completion), and the decisions of resuming: what is current, what re-runs and why,
which images a resumed stage still owes."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm import tqdm

from ..config import dump, load_config
from ..data.datasets import build_dataset
from ..engine import distributed
from ..engine.precision import dtype_name
from ..engine.training import resolve_device
from ..errors import ConfigError, InputError, StageError
from ..files import CONFIG_FILE, DATASET_FILE, read_json, write_json, write_text
from ..files import STAGE_MARKER as MARKER
from .graph import stage, upstream_stages
from .hashing import hash_matches, stage_hash, stage_inputs

REPLACED = "replaced-dataset"      # the hash of a stage whose dataset a forced command replaced
# The version of ``_stage.json``'s layout and of the hash it records. A record of another version
# is not read as current or stale: the stage says, in one line, to re-run it with --force. Records
# without the field are version 1 when they hold their inputs (every record since the hash of
# absolute paths); older ones are not.
SCHEMA = 1


def schema_of(record: dict[str, Any]) -> int | None:
    """The schema version of a stage record; None for a record older than any version."""
    if "schema" in record:
        return record["schema"]
    return 1 if isinstance(record.get("inputs"), dict) or record.get("hash") == REPLACED else None


def dataset_identity(config: dict[str, Any], data=None) -> dict[str, Any]:
    """What makes two runs' outputs comparable: the dataset's name, its root (absolute) and its
    class list (a changed class file keeps the config's keys but not the meaning of the labels).
    Without ``data`` the class list is left out."""
    root = config["dataset"]["root"]
    identity = {"name": config["dataset"]["name"], "root": str(Path(root).resolve()) if root else None}
    if data is not None:
        identity["class_names"] = list(data.class_names)
    return identity


def training_split(config: dict[str, Any]):
    """The dataset of the configured training split."""
    return build_dataset(config["dataset"], config["dataset"]["train_split"])


def recorded_identity(run_dir: Path) -> dict[str, Any] | None:
    """The dataset whose outputs ``run_dir`` holds: its ``_dataset.json``, or for a run made before
    that file existed, the name and root of its ``config.yaml`` when some stage has finished."""
    state = json_or_none(run_dir / DATASET_FILE)
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
            write_json(marker, {"stage": marker.parent.name, "schema": SCHEMA, "hash": REPLACED, "complete": False})
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
        write_json(run_dir / DATASET_FILE, dataset_identity(config, training_split(config)))


def json_or_none(path: Path) -> Any:
    """A JSON file's content, or None when it is absent or unreadable (a killed write, say)."""
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def is_complete(config: dict[str, Any], name: str) -> bool:
    state = json_or_none(stage(name).marker(config))
    return (isinstance(state, dict) and state.get("complete") is True and schema_of(state) == SCHEMA
            and hash_matches(state.get("hash"), config, name))


def skip_reason(config: dict[str, Any], name: str, force: bool, readers: Sequence[str] = ()) -> str | None:
    """Why stage ``name`` does not run now, or None when it runs: its outputs are complete and
    current, or every stage that reads them (``readers``) is, so nothing would read what it
    wrote (after ``import-weights psa-aff``, ``confident_regions`` feeds only the imported
    AffinityNet). ``force`` runs it anyway."""
    if force:
        return None
    if is_complete(config, name):
        return "up to date, skipped"
    if readers and all(is_complete(config, reader) for reader in readers):
        return f"not needed ({', '.join(readers)} up to date), skipped"
    return None


def imported_kind(config: dict[str, Any], name: str) -> str | None:
    """The kind of released weights ``import-weights`` wrote in stage ``name``, if it did."""
    state = json_or_none(stage(name).marker(config))
    imported = state.get("imported") if isinstance(state, dict) else None
    return imported.get("kind") if isinstance(imported, dict) else None


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
        previous = json_or_none(marker)
        if isinstance(previous, dict) and schema_of(previous) != SCHEMA and not force:
            raise StageError(f"{marker}: made by another version of affinitynet (record schema "
                             f"{schema_of(previous)}, this version reads {SCHEMA}); nothing was changed: "
                             f"re-run with --force to redo stage '{name}'")
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
            write_json(marker, {"stage": name, "schema": SCHEMA, "hash": self.hash, "complete": False,
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
        summary = {"stage": self.name, "schema": SCHEMA, "hash": self.hash, "complete": True,
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


