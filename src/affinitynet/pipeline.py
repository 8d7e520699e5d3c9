"""The orchestrator (irn's structure): stages in order, each a ``run(config)`` in
``affinitynet.steps``, each writing to its own directory of the run.

A stage directory holds ``_stage.json``: the hash of the config keys the stage depends on (and
of its upstream stages' hashes) and whether it completed. ``affinitynet run`` skips a stage whose
outputs are complete and current; a changed key (say ``random_walk.beta``) re-runs that stage and
everything downstream. Per-image outputs are written atomically, so a killed stage, started again
with the same hash, keeps the images it finished and does the rest.
"""
from __future__ import annotations

import importlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tqdm import tqdm

from . import distributed
from .config import section_hash
from .io import InputError, read_json, write_json

log = logging.getLogger(__name__)

DATASET_KEYS = ("dataset.name", "dataset.root", "dataset.protocol", "dataset.labels_file",
                "dataset.classes_file", "dataset.demo_size", "dataset.demo_train", "dataset.demo_val", "dataset.demo_seed", "dataset.masks_dir",
                "dataset.train_split")
_TRAIN = ("crop_size", "color_jitter", "batch_size", "epochs", "optimizer", "lr", "momentum",
          "weight_decay", "poly_power", "new_layer_lr_mult")


@dataclass(frozen=True)
class StageSpec:
    name: str                      # directory name and module name in affinitynet.steps
    command: str                   # CLI subcommand
    help: str
    keys: tuple[str, ...]          # config keys the outputs depend on
    upstream: tuple[str, ...]      # stages whose outputs it reads


STAGES: tuple[StageSpec, ...] = (
    StageSpec("train_cam", "train-cam", "train the CAM network (paper 3.1, 4.2)",
              DATASET_KEYS + ("seed", "backbone", "cam.head", "cam.head_channels", "cam.resize_long")
              + tuple(f"cam.{k}" for k in _TRAIN), ()),
    StageSpec("infer_cam", "infer-cam", "multi-scale CAMs and the CAM-only labels (Eq. 1-2, Table 1 'CAM')",
              ("dataset.label_split", "cam.scales", "cam.flip", "cam.eval_alpha", "cam.eval_bg_threshold"),
              ("train_cam",)),
    StageSpec("confident_regions", "confident-regions",
              "confident object/background regions from low/high alpha + dCRF (3.2.1)",
              ("affinity.alpha_low", "affinity.alpha_high", "crf"), ("infer_cam",)),
    StageSpec("train_affinity", "train-affinity", "train AffinityNet on the affinity labels (3.2.2, Eq. 7-10)",
              ("seed", "backbone", "affinity.radius", "affinity.distance", "affinity.channels")
              + tuple(f"affinity.{k}" for k in _TRAIN), ("confident_regions",)),
    StageSpec("random_walk", "random-walk", "random walk with AffinityNet and the pseudo labels (3.3-3.4, Table 1)",
              ("random_walk", "affinity.distance", "crf"), ("infer_cam", "train_affinity")),
    StageSpec("train_seg", "train-seg", "train the segmentation network on the pseudo labels (3.4, 4.2)",
              ("seed", "backbone", "segmentation.head", "segmentation.supervision", "segmentation.scale_range")
              + tuple(f"segmentation.{k}" for k in _TRAIN), ("random_walk",)),
    StageSpec("infer_seg", "infer-seg", "segment the evaluation split, multi-scale + flip (A.2)",
              ("dataset.eval_split", "segmentation.scales", "segmentation.flip", "segmentation.crf", "crf"),
              ("train_seg",)),
    StageSpec("evaluate_run", "evaluate-run", "score every stage: Table 1, Table 2 and Table 5",
              ("dataset.label_split", "dataset.eval_split"), ("infer_cam", "random_walk", "infer_seg")),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}


def upstream(config: dict[str, Any], name: str) -> tuple[str, ...]:
    """The stages whose outputs ``name`` reads under this config: the segmentation network
    trained on ground truth (the upper bound) reads none."""
    if name == "train_seg" and config["segmentation"]["supervision"] == "gt":
        return ()
    return STAGE_BY_NAME[name].upstream


def readers(config: dict[str, Any], name: str) -> list[str]:
    """The stages that read the outputs of ``name`` directly."""
    return [spec.name for spec in STAGES if name in upstream(config, spec.name)]


def descendants(config: dict[str, Any], name: str) -> list[str]:
    """Every stage whose outputs derive from those of ``name``, in pipeline order."""
    found: set[str] = set()
    for spec in STAGES:
        if any(parent == name or parent in found for parent in upstream(config, spec.name)):
            found.add(spec.name)
    return [spec.name for spec in STAGES if spec.name in found]


def stage_hash(config: dict[str, Any], name: str) -> str:
    keys = STAGE_BY_NAME[name].keys
    if name == "train_seg" and config["segmentation"]["supervision"] == "gt":
        keys = keys + DATASET_KEYS
    parents = tuple(stage_hash(config, parent) for parent in upstream(config, name))
    return section_hash(config, keys + DATASET_KEYS, *parents)


def stage_dir(config: dict[str, Any], name: str) -> Path:
    return Path(config["run_dir"]) / name


def is_complete(config: dict[str, Any], name: str) -> bool:
    marker = stage_dir(config, name) / "_stage.json"
    if not marker.exists():
        return False
    try:
        state = read_json(marker)
    except (OSError, ValueError):
        return False
    return state.get("complete") is True and state.get("hash") == stage_hash(config, name)


def imported_kind(config: dict[str, Any], name: str) -> str | None:
    """The kind of released weights ``import-weights`` wrote in stage ``name``, if it did."""
    marker = stage_dir(config, name) / "_stage.json"
    try:
        imported = read_json(marker).get("imported") if marker.exists() else None
    except (OSError, ValueError, AttributeError):
        return None
    return imported.get("kind") if isinstance(imported, dict) else None


class StageRun:
    """Bookkeeping of one stage: fresh or resumed directory, completion marker, summary line.

    ``check_upstream=False`` is for a stage whose outputs come from elsewhere (``import-weights``
    writes a training stage from a released checkpoint): its upstream stages need not exist."""

    def __init__(self, config: dict[str, Any], name: str, force: bool = False, check_upstream: bool = True):
        self.config = config
        self.name = name
        self.dir = stage_dir(config, name)
        self.hash = stage_hash(config, name)
        self.started = time.time()
        self.images = 0
        self.reused = 0
        self.skipped: list[str] = []
        self.extra: dict[str, Any] = {}
        marker = self.dir / "_stage.json"
        previous = None
        if marker.exists():
            try:
                previous = read_json(marker)
            except (OSError, ValueError):
                previous = None
        if distributed.is_main():
            if force or previous is None or previous.get("hash") != self.hash:
                # Outputs made from other settings must not be mixed with new ones.
                if self.dir.exists():
                    shutil.rmtree(self.dir)
            else:
                # A killed write leaves its temporary file (io.atomic_write); a resumed stage drops them.
                for stale in self.dir.rglob(".*.tmp"):
                    stale.unlink(missing_ok=True)
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json(marker, {"stage": name, "hash": self.hash, "complete": False})
        distributed.barrier()
        for parent in upstream(config, name) if check_upstream else ():
            if not is_complete(config, parent):
                imported = imported_kind(config, parent)
                if imported:
                    raise RuntimeError(f"stage '{name}' needs the outputs of '{parent}', which holds weights imported "
                                       f"by `affinitynet import-weights {imported}` with other settings: run with "
                                       f"--config {Path(config['run_dir']) / 'config.yaml'} (the config the import "
                                       f"saved) or import them again")
                raise RuntimeError(f"stage '{name}' needs the outputs of '{parent}', which are missing or "
                                   f"were made with other settings: run `affinitynet {STAGE_BY_NAME[parent].command}` "
                                   f"(or `affinitynet run`) first")

    def finish(self, **extra: Any) -> dict[str, Any]:
        self.extra.update(extra)
        gathered = distributed.all_gather_objects((self.images, self.reused, self.skipped))
        images = sum(item[0] for item in gathered)
        reused = sum(item[1] for item in gathered)
        skipped = [line for item in gathered for line in item[2]]
        summary = {"stage": self.name, "hash": self.hash, "complete": True,
                   "seconds": round(time.time() - self.started, 2), "images": images,
                   "reused": reused, "skipped": skipped, **self.extra}
        if distributed.is_main():
            write_json(self.dir / "_stage.json", summary)
            note = f", {reused} reused" if reused else ""
            print(f"[{self.name}] {summary['seconds']:.1f}s, {images} images{note}, {len(skipped)} skipped")
            for line in skipped[:20]:
                print(f"  skipped: {line}")
            if len(skipped) > 20:
                print(f"  ... and {len(skipped) - 20} more (see {self.dir / '_stage.json'})")
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
        raise RuntimeError(f"{desc}: every one of {len(items)} inputs failed; first: {run.skipped[0]}")


def run_stage(config: dict[str, Any], name: str, force: bool = False) -> dict[str, Any] | None:
    """Run one stage, or skip it (None) when its outputs are complete and current and it is not
    forced: re-entering a finished stage would only overwrite its recorded time."""
    if not force and is_complete(config, name):
        if distributed.is_main():
            print(f"[{name}] up to date, skipped")
        return None
    module = importlib.import_module(f"affinitynet.steps.{name}")
    return module.run(config, force=force)


def run_all(config: dict[str, Any], only_available: bool = True, force: Sequence[str] = ()) -> None:
    """Every stage in order, skipping those whose outputs are complete and current, and those
    whose every reader is complete and current: nothing would read their outputs (after
    ``import-weights psa-aff``, ``confident_regions`` feeds only the imported AffinityNet)."""
    for spec in STAGES:
        try:
            importlib.import_module(f"affinitynet.steps.{spec.name}")
        except ModuleNotFoundError as error:
            if only_available and error.name == f"affinitynet.steps.{spec.name}":
                continue
            raise
        waiting = readers(config, spec.name)
        if (spec.name not in force and waiting and not is_complete(config, spec.name)
                and all(is_complete(config, reader) for reader in waiting)):
            if distributed.is_main():
                print(f"[{spec.name}] not needed ({', '.join(waiting)} up to date), skipped")
            continue
        run_stage(config, spec.name, force=spec.name in force)
