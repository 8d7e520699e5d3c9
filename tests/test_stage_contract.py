"""The contract between the stages and the run directory: a stage's outputs are reused only while
every config key it reads is unchanged.

- Every default key is hashed by some stage or is on ``pipeline.RUNTIME_KEYS``.
- Each stage of the tiny pipeline, run with a config that notes every key read, reads only keys
  its hash covers (its own, or an upstream stage's, whose hash it hashes) or runtime keys.
- Changing any one key leaves exactly the stages that hash it, and those downstream of them, out
  of date in a finished run.
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import tiny_pipeline as tiny

from affinitynet import pipeline
from affinitynet.config import DEFAULTS, flatten, get, load_config
from affinitynet.data.datasets import optional_dataset_keys


def covered(key: str, hashed: tuple[str, ...] | set[str]) -> bool:
    """Whether a hashed key or section (``crf``, ``random_walk``) holds ``key``."""
    return any(key == h or key.startswith(h + ".") for h in hashed)


def own_keys(config: dict[str, Any], name: str) -> tuple[str, ...]:
    return pipeline.hashing._hashed_keys(name, config)


def covering_keys(config: dict[str, Any], name: str) -> set[str]:
    """What the stage's hash covers: its keys, and its optional keys and the datasets' (hashed
    once set; unset, they mean a hashed key's value)."""
    return (set(own_keys(config, name)) | set(pipeline.stage(name).optional_keys)
            | set(optional_dataset_keys()))


def transitive_keys(config: dict[str, Any], name: str) -> set[str]:
    keys = covering_keys(config, name)
    for parent in pipeline.ancestors(config, name):
        keys |= covering_keys(config, parent)
    return keys


def test_every_default_key_is_hashed_or_declared_runtime():
    config = copy.deepcopy(DEFAULTS)
    every = pipeline.all_stages().values()      # the stages of every label method's graph
    hashed = {key for spec in every for key in own_keys(config, spec.name)}
    hashed |= {key for spec in every for key in spec.optional_keys} | set(optional_dataset_keys())
    loose = [key for key in flatten(DEFAULTS) if not covered(key, hashed) and key not in pipeline.RUNTIME_KEYS]
    assert loose == [], f"neither hashed by a stage nor in pipeline.RUNTIME_KEYS: {loose}"
    both = [key for key in pipeline.RUNTIME_KEYS if covered(key, hashed)]
    assert both == [], f"hashed, yet declared runtime-only: {both}"
    assert set(pipeline.RUNTIME_KEYS) <= set(flatten(DEFAULTS))


@pytest.mark.slow
def test_every_key_a_stage_reads_is_hashed(tmp_path, monkeypatch):
    base = tiny.config(tmp_path / "run", tmp_path / "data")
    reads = tiny.recording_run(base, monkeypatch)
    assert loose_reads(base, reads) == {}, "keys read but not hashed (a change would reuse stale outputs)"


def loose_reads(config: dict[str, Any], reads: dict[str, set[str]]) -> dict[str, list[str]]:
    """Per stage, the keys it read that neither its hash (transitively) nor RUNTIME_KEYS covers."""
    misses = {}
    for name, keys in reads.items():
        allowed = transitive_keys(config, name)
        loose = sorted(key for key in keys if not covered(key, allowed) and key not in pipeline.RUNTIME_KEYS)
        if loose:
            misses[name] = loose
    return misses


def changed(value: Any) -> Any:
    """Another value of the same kind (the hash compares values, not their validity)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return value + value[-1:]
    return f"{value}-changed"


def test_one_changed_key_outdates_exactly_its_stages_and_those_downstream(reference):
    run_dir, data_root = reference
    config = load_config(run_dir / "config.yaml")
    names = [spec.name for spec in pipeline.stages(config)]
    assert all(pipeline.is_complete(config, name) for name in names)
    for key, value in flatten(config).items():
        if key in pipeline.RUNTIME_KEYS:
            continue
        other = copy.deepcopy(config)
        section, _, leaf = key.rpartition(".")
        (get(other, section) if section else other)[leaf] = changed(value)
        reading = [name for name in names if covered(key, own_keys(other, name))]
        expected = set(reading) | {d for name in reading for d in pipeline.descendants(other, name)}
        stale = {name for name in names if not pipeline.is_complete(other, name)}
        assert stale == expected, f"{key}: out of date {sorted(stale)}, expected {sorted(expected)}"
        elsewhere = any(covered(key, own_keys(other, spec.name)) for spec in pipeline.all_stages().values())
        assert elsewhere, f"{key}: no stage depends on it (declare it in pipeline.RUNTIME_KEYS)"
