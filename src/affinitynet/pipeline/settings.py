"""A run's config against the registered parts: the names a registry holds, and the settings that
depend on a part (a backbone's strides, a dataset's required keys). The config below knows only
types and ranges (:mod:`affinitynet.config`); these checks also run before anything is written.
The configuration page and the help texts name the registries' parts from here, never by hand."""
from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Iterable

from ..config import (
    DECLARED,
    KEY_HELP,
    RULES,
    Named,
    did_you_mean,
    get,
    load_config,
    show_value,
    shown,
)
from ..data.datasets import DATASETS
from ..errors import ConfigError
from ..models import cam, segmentation
from ..models.backbones import BACKBONES, output_strides, supports_undilated
from .graph import label_methods


class _LabelMethods:
    """The label methods as a registry: the stages that declare one."""
    kind = "label method"

    @staticmethod
    def names() -> list[str]:
        return sorted(label_methods())

    @staticmethod
    def get(name: str) -> Any:
        return types.SimpleNamespace(builder=label_methods()[name].run)


def registry(kind: str):
    """The registry of a :class:`~affinitynet.config.Named` rule's kind."""
    registries = (BACKBONES, DATASETS, cam.HEADS, cam.METHODS, segmentation.HEADS, _LabelMethods)
    return next(found for found in registries if found.kind == kind)


def choices(key: str) -> list[str] | None:
    """The names a key may take where a registry holds them (a plug-in's included)."""
    rule = RULES.get(key)
    return registry(rule.kind).names() if isinstance(rule, Named) else None


def builtin_choices(key: str) -> list[str]:
    """The names this package defines for ``key`` (not a plug-in's, nor a test's)."""
    found = registry(RULES[key].kind)
    return [name for name in found.names() if found.get(name).builder.__module__.startswith("affinitynet.")]


def check_names(config: dict[str, Any]) -> None:
    """Every key that names a part names a registered one (one line, with the nearest name)."""
    for key, rule in RULES.items():
        if isinstance(rule, Named):
            value, names = get(config, key), choices(key)
            if value not in names:
                raise ConfigError(f"config key '{key}' must be one of {', '.join(repr(n) for n in names)}, "
                                  f"got {shown(value)}{did_you_mean(value, names)}")


def check_parts(config: dict[str, Any]) -> None:
    """The settings a registered part allows or requires: the backbone's strides and dilation, the
    dataset's root and its required keys."""
    backbone = config["backbone"]
    supported = output_strides(backbone["name"])
    for key in ("backbone.output_stride", "cam.train_output_stride", "segmentation.train_output_stride",
                "affinity.backbone_stride"):
        stride = get(config, key)
        if stride is not None and stride not in supported:
            raise ConfigError(f"config key '{key}' must be a stride backbone '{backbone['name']}' supports "
                              f"({' or '.join(map(str, supported))}), got {stride}")
    if not backbone["atrous"] and not supports_undilated(backbone["name"]):
        raise ConfigError(f"config key 'backbone.atrous' can be false only for backbone 'resnet50' "
                          f"(irn's undilated ResNet-50), not '{backbone['name']}'")
    dataset = DATASETS.get(config["dataset"]["name"])
    name, root = dataset.name, config["dataset"]["root"]
    needs_root = dataset.info.get("needs_root", True)
    if needs_root and not root:
        raise ConfigError(f"config key 'dataset.root' must name the {name} dataset directory (it is null)")
    for key, what in dataset.info.get("required", {}).items():
        if not config["dataset"][key]:
            raise ConfigError(f"config key 'dataset.{key}' must name {what} for the {name} dataset")
    if needs_root and root and not Path(root).is_dir():
        raise ConfigError(f"config key 'dataset.root': directory '{root}' does not exist")


def check(config: dict[str, Any]) -> None:
    """The checks of the parts, after the config's own (``config.validate``)."""
    check_names(config)
    check_parts(config)


def load_run_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                    check_all: bool = True) -> dict[str, Any]:
    """:func:`affinitynet.config.load_config`, then the parts' checks: the config a command runs."""
    config = load_config(path, overrides, check=check_all)
    if check_all:
        check(config)
    return config


def key_help(key: str) -> str:
    """What ``key`` means, with its choices where a registry holds them (never listed by hand)."""
    text = KEY_HELP.get(key, "declared by the dataset that reads it")
    names = choices(key)
    return text + (f" (one of {', '.join(repr(name) for name in names)})" if names else "")


def reference_page() -> str:
    """``docs/configuration.md``: every key by section, with its default, what it may be and what
    it means, from the declarations in :data:`affinitynet.config.SETTINGS` (``affinitynet config
    docs`` prints it)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["# Configuration", "",
             "<!-- Generated from the settings' declarations (src/affinitynet/config.py, SETTINGS) by",
             "     `affinitynet config docs > docs/configuration.md`; tests/test_configuration_page.py fails",
             "     when this page is stale. Edit the declarations, not this page. -->", "",
             "Every key of a run's config: its default (the paper's VOC settings), the values it may take, and",
             "what it means. Set keys in a YAML file (`--config FILE`) or on the command line",
             "(`random_walk.beta=10`); `affinitynet config show --config FILE` prints the values a config",
             "resolves to. A dataset registered by a plug-in adds its own `dataset.*` keys. Names that a",
             "registry holds are listed as this package defines them; a plug-in's parts add to them.", ""]
    sections: dict[str, list[str]] = {}
    for key in DECLARED:
        sections.setdefault(key.split(".")[0] if "." in key else "", []).append(key)
    for section, keys in sections.items():
        lines += [f"## `{section}`" if section else "## Top level", "",
                  "| key | default | allowed | meaning |", "|---|---|---|---|"]
        for key in keys:
            setting = DECLARED[key]
            allowed = ("one of " + ", ".join(f"'{name}'" for name in builtin_choices(key))
                       if isinstance(setting.rule, Named) else setting.rule.describe)
            default = "null" if setting.default is None else show_value(setting.default)
            lines.append(f"| `{key}` | `{default}` | {cell(allowed)} | {cell(setting.help)} |")
        lines.append("")
    return "\n".join(lines)


__all__ = ["builtin_choices", "check", "check_names", "check_parts", "choices", "key_help",
           "load_run_config", "reference_page", "registry"]
