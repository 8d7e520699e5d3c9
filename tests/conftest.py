import os

# Two torch threads on this 2-vCPU machine can run small-op loops many times slower than one
# when the vCPUs share a core; passive waiting avoids the spin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# Fixtures that run a whole (tiny) pipeline or start processes: a test that uses one is `slow`.
_SLOW_FIXTURES = {"reference", "workspace"}
_SLOW_MODULES = {"test_faults.py", "test_distributed.py"}


def pytest_collection_modifyitems(config, items):
    """The `slow` marker on the system tests: `pytest -m "not slow"` is the quick selection for
    development; CI (the README's test command) runs everything."""
    import pytest

    for item in items:
        if (_SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in _SLOW_MODULES
                or item.get_closest_marker("system")):
            item.add_marker(pytest.mark.slow)
