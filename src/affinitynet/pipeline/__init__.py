"""The orchestrator (irn's structure): stages in order, each a ``run(config)`` in
``affinitynet.stages``, each writing to its own directory of the run.

A stage directory holds ``_stage.json``: the hash of the config keys the stage depends on (and
of its upstream stages' hashes) and whether it completed. ``affinitynet run`` skips a stage whose
outputs are complete and current; a changed key (say ``random_walk.beta``) re-runs that stage and
everything downstream. Per-image outputs are written atomically, so a killed stage, started again
with the same hash, keeps the images it finished and does the rest.

Its parts: :mod:`.graph` (the stages and their order), :mod:`.hashing`, :mod:`.run_dir` (the run
directory's records and the resume decisions), :mod:`.lock` (one writer per run directory),
:mod:`.runner`, :mod:`.settings` (a run's config checked against the registered parts) and
:mod:`.size_rules`.
"""
from .graph import (
    FINAL_STAGE,
    MARKER,
    RUNTIME_KEYS,
    STAGES,
    Stage,
    all_stages,
    ancestors,
    companion_stages,
    dataset_inputs,
    descendants,
    label_methods,
    label_stage,
    readers,
    register_stage,
    stage,
    stages,
    training_keys,
    training_label_stage,
    upstream_stages,
)
from .hashing import hash_matches, stage_hash, stage_inputs
from .run_dir import (
    CONFIG_FILE,
    DATASET_FILE,
    SCHEMA,
    StageRun,
    check_run_dir,
    dataset_identity,
    imported_kind,
    is_complete,
    map_images,
    record_run,
    recorded_identity,
    rerun_reason,
    training_split,
)
from .runner import ProcessesFailed, preflight, processes_runner, run_all, run_stage, run_summary

__all__ = [
    "CONFIG_FILE", "DATASET_FILE", "FINAL_STAGE", "MARKER", "RUNTIME_KEYS", "SCHEMA", "STAGES", "ProcessesFailed",
    "Stage", "StageRun", "all_stages", "ancestors", "check_run_dir", "companion_stages", "dataset_identity",
    "dataset_inputs", "descendants", "hash_matches", "imported_kind", "is_complete", "label_methods", "label_stage",
    "map_images", "preflight", "processes_runner", "readers", "record_run", "recorded_identity", "register_stage",
    "rerun_reason", "run_all", "run_stage", "run_summary", "stage", "stage_hash", "stage_inputs", "stages",
    "training_keys", "training_label_stage", "training_split", "upstream_stages",
]
