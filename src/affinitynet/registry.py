"""Registries of named parts (timm's ``register_model`` / ``create_model``): backbones, datasets,
CAM and segmentation heads, CAM methods. A part registers itself with a decorator in the module
that defines it; the config's rules, the CLI's choices and the builders ask the registry, so adding
a part touches its own file (and its test).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


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
        if self._loaded or self._package is None:
            return
        self._loaded = True
        package = importlib.import_module(self._package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self._package}.{module.name}")

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
