"""Stage hashes: a stage's outputs are current when the hash of the config keys it reads, and of its
upstream stages' hashes, is the one its ``_stage.json`` recorded (``docs/architecture.md``)."""
from __future__ import annotations

import os
from typing import Any

from ..config import DEFAULTS, flatten, get, section_hash
from ..data.datasets import optional_dataset_keys
from .graph import dataset_inputs, stage, upstream_stages


def _hashed_keys(name: str, config: dict[str, Any]) -> tuple[str, ...]:
    spec = stage(name)
    changed = tuple(key for key in spec.optional_keys if get(config, key) != get(DEFAULTS, key))
    changed += tuple(key for key, default in optional_dataset_keys().items() if get(config, key) != default)
    return spec.keys + dataset_inputs() + changed


def _unset_optionals_dropped(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the stage's optional keys that are at their default, where a section the
    stage hashes whole holds them (``random_walk.flip`` in ``random_walk``): a key added to such a
    section later leaves the hash of a run made before it as it was, as any optional key does."""
    spec = stage(name)
    dropped = {section: dict(config[section]) for section in spec.keys if isinstance(config.get(section), dict)}
    for key in spec.optional_keys:
        section, _, leaf = key.partition(".")
        if section in dropped and get(config, key) == get(DEFAULTS, key):
            dropped[section].pop(leaf, None)
    return {**config, **dropped}


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
    return section_hash(_unset_optionals_dropped(name, config), _hashed_keys(name, config), *upstream)


def stage_hash(config: dict[str, Any], name: str) -> str:
    """The hash of the config keys stage ``name`` depends on and of its upstream stages' hashes."""
    return _hash(_absolute_paths(config), name)


def hash_matches(recorded: Any, config: dict[str, Any], name: str) -> bool:
    """Whether a recorded stage hash is this config's."""
    return recorded is not None and recorded == stage_hash(config, name)


def stage_inputs(config: dict[str, Any], name: str) -> dict[str, Any]:
    """What a stage's hash is made of, readable: the value of every hashed key (sections
    flattened to dotted keys) and the hash of every upstream stage. Kept in ``_stage.json`` so that
    a re-run can say what changed."""
    values: dict[str, Any] = {}
    hashed = _unset_optionals_dropped(name, config)
    for key in sorted(set(_hashed_keys(name, config))):
        value = get(hashed, key)
        if isinstance(value, dict):
            values.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            values[key] = value
    return {"inputs": {"keys": values,
                       "upstream": {parent: stage_hash(config, parent) for parent in upstream_stages(config, name)}}}


