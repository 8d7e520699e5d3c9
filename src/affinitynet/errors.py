"""The errors a user sees as one line (``affinitynet`` prints ``error: <message>`` and exits 2).

Each error names what is wrong and what to do; none carries a traceback to the user. They share
:class:`AffinityNetError`, so that a caller (the CLI, a notebook) can catch them all at once.
"""
from __future__ import annotations

import os


class AffinityNetError(Exception):
    """The base of every error reported to the user as one line."""


class ConfigError(AffinityNetError, ValueError):
    """A bad configuration; ``str()`` is one line naming the key and what is allowed."""


class InputError(AffinityNetError):
    """A problem with one input file; ``str()`` is one line: ``<path>: <problem>``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class StageError(AffinityNetError, RuntimeError):
    """A stage cannot run here (its inputs are missing, or the run directory holds another
    dataset's outputs); one line saying what to do."""


class PluginError(AffinityNetError):
    """A plug-in module (entry point or config key ``plugins``) that cannot be imported."""


class RunDirBusy(AffinityNetError):
    """Another command writes into the run directory; one line naming it (``run_lock``)."""


class TrainingError(AffinityNetError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what was kept."""


class WeightsError(AffinityNetError, RuntimeError):
    """A weight file that cannot be loaded into a backbone; the message names file and keys."""


class DependencyError(AffinityNetError, ImportError):
    """An optional package that a command needs is not installed; one line saying what to install
    (``affinitynet export`` and ``predict`` of a ``.onnx`` file need the ``onnx`` extra)."""


class ExportError(AffinityNetError, RuntimeError):
    """A network that cannot be exported faithfully (its ONNX graph computes another function);
    one line saying where they differ. Nothing is written."""
