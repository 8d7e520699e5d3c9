"""Every key that ``affinitynet config show`` lists, given a bad value on the command line of a
writing command: exit 2, one line naming the key, and nothing written, the run directory given
or fresh (property-based, hypothesis; a fixed example budget per key keeps it fast).

The bad values are drawn from what is wrong for any key (NaN, infinities, a mapping, empty and
huge lists, huge and negative numbers, an empty string) and from what is wrong for the key's
kind, read off its default (a word for a number or a switch, a name with path separators for a
name, a string for a number that may be null).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from affinitynet.cli import main
from affinitynet.config import defaults, flatten
from affinitynet.pipeline import lock as run_lock

# Keys whose values are paths: path separators are what they are made of.
PATH_KEYS = {"run_dir", "dataset.root", "dataset.labels_file", "dataset.classes_file", "dataset.masks_dir",
             "dataset.annotations_file", "dataset.images_dir", "backbone.weights"}
WRONG_FOR_ANY_KEY = [".nan", ".inf", "-.inf", "{a: 1}", "[]", "[" + ",".join(["1"] * 1000) + "]",
                     "1000000000000", "-1000000000000", "[-1, -2]", "''"]
WRONG_NAMES = ["no/such/name", "..", "mobilenet\\v2", "x" * 5000]


def listed_keys() -> dict[str, object]:
    """The keys `affinitynet config show` lists, with their default values."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["config", "show"]) == 0
    keys = [line.split(" = ")[0].strip() for line in out.getvalue().splitlines() if not line.startswith("#")]
    values = flatten(defaults())
    assert keys and set(keys) == set(values)
    return {key: values[key] for key in keys}


KEYS = listed_keys()


def wrong_values(key: str, default: object) -> list[str]:
    """Override texts (parsed as YAML) that no value of ``key`` may be."""
    values = list(WRONG_FOR_ANY_KEY)
    if isinstance(default, bool):
        values += ["maybe", "2"]
    elif isinstance(default, (int, float)):
        values += ["abc", "'8'", "true"]
    elif default == []:                                # a list of names (plugins): empty is its default
        values = [v for v in values if v != "[]"] + ["abc", "[no/such/module]", "['']", "[1, 2]"]
    elif isinstance(default, list):
        values += ["abc", "[abc, def]", "[1, .nan]", "[.inf]"]
    elif isinstance(default, str) and key not in PATH_KEYS:
        values += WRONG_NAMES
    elif default is None and key not in PATH_KEYS:      # a number, or null
        values += ["abc", "true"]
    return values


def command_line(command: str, run_dir: Path, override: str, weights: Path) -> list[str]:
    head = ["import-weights", "psa-cam", str(weights)] if command == "import-weights" else [command]
    return [*head, "--config", "demo", f"run_dir={run_dir}", override]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working directory holding a run directory with a finished look, and weights to import.
    Commands run in it, and no command may reach the lock: every check comes before it."""
    given_run = tmp_path / "given"
    (given_run / "train_cam").mkdir(parents=True)
    (given_run / "config.yaml").write_text("seed: 0\n")
    (given_run / "train_cam" / "_stage.json").write_text('{"stage": "train_cam", "complete": true}\n')
    weights = tmp_path / "res38_cls.pth"
    weights.write_bytes(b"never read")
    monkeypatch.chdir(tmp_path)

    def reached_the_lock(self):
        raise AssertionError(f"passed every check and reached the lock of {self.run_dir}")

    monkeypatch.setattr(run_lock.RunLock, "acquire", reached_the_lock)
    return tmp_path, given_run, weights


@pytest.mark.parametrize("key", sorted(KEYS))
@settings(max_examples=5, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_bad_value_of_any_key_is_one_line_naming_it_and_writes_nothing(place, capsys, key, data):
    root, given_run, weights = place
    value = data.draw(st.sampled_from(wrong_values(key, KEYS[key])), label="value")
    command = data.draw(st.sampled_from(["run", "train-cam", "infer-seg", "import-weights"]), label="command")
    run_dir = data.draw(st.sampled_from([given_run, root / "fresh" / "run"]), label="run_dir")
    before = snapshot(root)
    capsys.readouterr()
    code = main(command_line(command, run_dir, f"{key}={value}", weights))
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("affinitynet: error: ") and err.endswith("\n"), err
    assert key in err, err
    assert snapshot(root) == before
