"""Each setting declared once (config.SETTINGS): its default keeps its own rule, it has a meaning,
and docs/configuration.md is the page generated from the declarations (stale: this fails)."""
from __future__ import annotations

from pathlib import Path

import pytest

from affinitynet import config
from affinitynet.cli import main
from affinitynet.pipeline import settings

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_the_configuration_page_is_generated_from_the_declarations(capsys):
    assert main(["config", "docs"]) == 0
    printed = capsys.readouterr().out
    assert printed == settings.reference_page()
    assert PAGE.read_text(encoding="utf-8") == printed, (
        "docs/configuration.md is stale: run `.venv/bin/affinitynet config docs > docs/configuration.md`")


def test_a_changed_declaration_makes_the_page_stale(monkeypatch):
    setting = config.DECLARED["random_walk.beta"]
    monkeypatch.setitem(config.DECLARED, "random_walk.beta",
                        config.Setting(setting.default, "the walk's beta, said otherwise", setting.rule))
    page = settings.reference_page()
    assert page != PAGE.read_text(encoding="utf-8")
    assert "| `random_walk.beta` | `8.0` | a number > 0 and <= 1000 | the walk's beta, said otherwise |" in page


@pytest.mark.parametrize("key", sorted(config.DECLARED))
def test_every_default_keeps_its_own_rule_and_means_something(key):
    setting = config.DECLARED[key]
    assert setting.rule.check(setting.default), f"{key}: default {setting.default!r} breaks '{setting.rule.describe}'"
    assert setting.help and "\n" not in setting.help
    assert config.get(config.DEFAULTS, key) == setting.default and config.KEY_HELP[key] == setting.help


def test_registry_names_in_the_page_are_the_packages_own():
    """A test's or a plug-in's registered part is not written into the page (it would make the
    page depend on what ran before)."""
    from affinitynet.models.backbones import BACKBONES, register_backbone

    if "_page_test_net" not in BACKBONES:
        register_backbone("_page_test_net")(lambda output_stride=8, pretrained=True: None)
    assert "_page_test_net" in settings.choices("backbone.name")
    assert "_page_test_net" not in settings.reference_page()
    assert "'mobilenetv2'" in settings.reference_page()
