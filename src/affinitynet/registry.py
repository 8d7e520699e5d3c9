"""Registries of named parts (timm's ``register_model`` / ``create_model``): backbones, datasets,
CAM and segmentation heads, CAM methods. A part registers itself with a decorator in the module
that defines it; the config's rules, the CLI's choices and the builders ask the registry, so adding
a part touches its own file (and its test).

Parts from outside the package plug in the same way, from a module that imports the decorator
(``from affinitynet.models.backbones import register_backbone``) and is imported before the registry is
asked: every module an installed distribution names in the entry-point group
``affinitynet.plugins`` (``[project.entry-points."affinitynet.plugins"] my_lab = "my_lab.parts"``),
and the modules of the config key ``plugins`` (mmsegmentation's ``custom_imports``).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .errors import PluginError

ENTRY_POINT_GROUP = "affinitynet.plugins"
_IMPORTED_PLUGINS: set[str] = set()
# The installed distributions' metadata is read once per process, not once per registry.
_ENTRY_POINTS_READ: list[bool] = []


def _import_plugin(module: str, source: str) -> None:
    if module in _IMPORTED_PLUGINS:
        return
    try:
        importlib.import_module(module)
    except Exception as error:   # a plug-in's own bug or a missing module: one line naming it
        first = str(error).splitlines()[0] if str(error) else ""
        raise PluginError(f"{source}: plug-in module '{module}' could not be imported "
                          f"({error.__class__.__name__}{': ' + first if first else ''})") from error
    _IMPORTED_PLUGINS.add(module)


def load_plugins(modules: Iterable[str] = (), source: str = "config key 'plugins'") -> None:
    """Import the plug-ins of the installed distributions (once), then ``modules``."""
    if not _ENTRY_POINTS_READ:
        _ENTRY_POINTS_READ.append(True)
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            _import_plugin(entry.value.split(":")[0], f"entry point '{entry.name}' ({ENTRY_POINT_GROUP})")
    for module in modules:
        _import_plugin(module, source)


@dataclass(frozen=True)
class Entry:
    name: str
    builder: Callable[..., Any]
    info: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Named builders of one kind. Every module of ``package`` is imported before the first
    lookup, so that their decorators have run whichever module asks first, and a new file in the
    package is found without being listed anywhere."""

    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self._package = package
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, **info: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@DATASETS.register("msrc21", description=...)`` on the builder."""
        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name].builder is not builder:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = Entry(name, builder, dict(info))
            return builder
        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self._package is not None:
            package = importlib.import_module(self._package)
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self._package}.{module.name}")
        load_plugins()

    def names(self) -> list[str]:
        """The registered names, sorted (registration order follows imports, which say nothing)."""
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter([self._entries[name] for name in self.names()])

    def get(self, name: str) -> Entry:
        """The entry of ``name``; an unknown name raises ``KeyError`` listing the known ones."""
        self._load()
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} '{name}' (known: {', '.join(self.names())})")
        return self._entries[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name).builder(*args, **kwargs)
