"""The stage graph: the stages (each declared by its own module in ``affinitynet.stages``, which
registers it), what each reads, and the order ``affinitynet run`` executes them in."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import DEFAULTS, TRAINING_KEYS
from ..data.datasets import dataset_keys
from ..errors import StageError
from ..files import STAGE_MARKER as MARKER
from ..registry import Registry

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
    "labels.refine": "chooses the stage of the network's training labels, whose hash train_seg hashes",
    "affinity.refine_cams": "chooses the stage of the CAMs the confident regions are cut from, whose hash "
                            "confident_regions hashes",
    "report.gallery_size": "affinitynet report, not a stage",
    "sweep.betas": "affinitynet sweep, not a stage",
    "sweep.ts": "affinitynet sweep, not a stage",
    "sweep.alphas": "affinitynet sweep, not a stage",
    "sweep.max_images": "affinitynet sweep, not a stage",
}
# The stage whose outputs are the run's result: ``affinitynet run`` executes it and what it reads.
FINAL_STAGE = "evaluate_run"



def dataset_inputs() -> tuple[str, ...]:
    """The keys that say which images every stage sees, hashed by every stage: those the
    registered datasets read (read when asked, so that a dataset registered late counts) but
    their optional keys (hashed once set, ``hashing._hashed_keys``), and the training split."""
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
    # The refinement round (``labels.refine``): this stage's ``pseudo_labels``, made from the label
    # method's with a first network, train the segmentation network in their place.
    refines_labels: bool = False

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


# Every stage, registered by the module that declares it (:func:`register_stage`); the modules of
# ``affinitynet.stages`` are imported on the first lookup, as for every registry with a package.
STAGES = Registry("stage", package="affinitynet.stages")


def register_stage(spec: Stage) -> Stage:
    """Declare a stage: a module's ``STAGE = register_stage(Stage(...))`` (a plug-in's the same)."""
    STAGES.register(spec.name, spec=spec)(spec.run)
    return spec


def all_stages() -> dict[str, Stage]:
    """Every declared stage, by name."""
    return {entry.name: entry.info["spec"] for entry in STAGES}


def stage(name: str) -> Stage:
    """The stage declared under ``name`` (``stage("random_walk").output("pseudo_labels", config)``)."""
    # One entry looked up, not the whole table rebuilt: hashing asks for stages many times a run.
    if name not in STAGES:
        raise StageError(f"unknown stage '{name}' (stages: {', '.join(STAGES.names())})")
    return STAGES.get(name).info["spec"]


def label_methods() -> dict[str, Stage]:
    """The pseudo-label methods (``labels.method``), each with the stage writing its labels."""
    return {spec.label_method: spec for spec in all_stages().values() if spec.label_method}


def label_stage(config: dict[str, Any]) -> Stage:
    """The stage whose ``pseudo_labels`` train the segmentation network under this config."""
    return label_methods()[config["labels"]["method"]]


def training_label_stage(config: dict[str, Any]) -> Stage:
    """The stage whose ``pseudo_labels`` train the segmentation network (``train_seg``): the label
    method's, or with ``labels.refine`` the refinement round's (whose first network would be the
    bound's own: the bound, ``segmentation.supervision: gt``, has no round)."""
    if config["labels"]["refine"] and config["segmentation"]["supervision"] != "gt":
        return next(spec for spec in all_stages().values() if spec.refines_labels)
    return label_stage(config)


def companion_stages(config: dict[str, Any]) -> tuple[Stage, ...]:
    """The stages that the configured label method makes beside its pseudo labels."""
    method = config["labels"]["method"]
    return tuple(spec for spec in all_stages().values() if spec.companion_of == method)


def stages(config: dict[str, Any] | None = None) -> list[Stage]:
    """The stages ``affinitynet run`` executes under ``config``, in order: the final stage and
    everything it reads, each after its upstream stages (depth first, upstream in the order
    declared). Without a config: every declared stage, those of the default graph first."""
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


