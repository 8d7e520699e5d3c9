import os

import pytest
import tiny_pipeline

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


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """(run_dir, data_root) of the uninterrupted tiny run (tests/tiny_pipeline.py), made once."""
    return tiny_pipeline.reference_run(tmp_path_factory)
