import fcntl
import os

import pytest
import tiny_pipeline

from affinitynet.data.datasets.msrc21 import ensure_msrc21, find_msrc21_tarball

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


@pytest.fixture(scope="session")
def msrc21_root(tmp_path_factory):
    """The real MSRC-21 (../shared/datasets), unpacked once for the whole session into a folder
    xdist's workers share."""
    if find_msrc21_tarball() is None:
        pytest.skip("MSRC-21 tarball not available (../shared/datasets or AFFINITYNET_MSRC21_TAR)")
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "msrc21-data"
    folder.mkdir(exist_ok=True)
    # One worker unpacks while the other waits for it, instead of both unpacking at once.
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return ensure_msrc21(folder)
