"""The Python API the docs show stays importable where they show it: every
``from affinitynet... import ...`` in the README and the docs pages."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
IMPORT = re.compile(r"from (affinitynet[\w.]*) import ([\w, ]+)")


def shown_imports() -> list[tuple[str, str]]:
    found = set()
    for page in PAGES:
        for module, names in IMPORT.findall(page.read_text(encoding="utf-8")):
            found.update((module, name.strip()) for name in names.split(",") if name.strip())
    return sorted(found)


def test_the_docs_show_some_imports():
    assert ("affinitynet", "random_walk") in shown_imports()
    assert ("affinitynet.models.backbones", "register_backbone") in shown_imports()


@pytest.mark.parametrize("module, name", shown_imports())
def test_every_import_the_docs_show_works(module, name):
    assert getattr(importlib.import_module(module), name) is not None
