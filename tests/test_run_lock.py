"""One writer per run directory (``affinitynet.pipeline.lock``): a second writer is refused at once
with one line naming the holder, or queues with ``--wait``; readers run beside a writer; a
holder killed by SIGKILL blocks no one; the processes of one job share its lock."""
from __future__ import annotations

import json
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_pipeline as tiny

from affinitynet.errors import RunDirBusy
from affinitynet.pipeline import lock as run_lock
from affinitynet.pipeline.lock import LOCK_NAME, TOKEN_ENV, RunLock, hold

HOLDER_COMMAND = "affinitynet run --run-dir R (the holder)"
# Holders and probes are forks of this process: separate processes with their own locks, started
# without importing torch again.
_FORK = multiprocessing.get_context("fork")


def _env(**extra: str) -> dict[str, str]:
    import affinitynet

    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    package_parent = str(Path(affinitynet.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _hold(run_dir: str, seconds: float, ready) -> None:
    os.environ.pop(TOKEN_ENV, None)
    with hold(run_dir, HOLDER_COMMAND):
        ready.send("held")
        time.sleep(seconds)


def start_holder(run_dir: Path, seconds: float = 600.0):
    """Another process holding ``run_dir``'s lock (returned once it holds it)."""
    ready, told = _FORK.Pipe()
    holder = _FORK.Process(target=_hold, args=(str(run_dir), seconds, told), daemon=True)
    holder.start()
    assert ready.poll(60) and ready.recv() == "held"
    return holder


def _probe(run_dir: str, token: str | None, answer) -> None:
    """A process that tries the lock with ``token`` as its inherited AFFINITYNET_RUN_LOCK."""
    os.environ.pop(TOKEN_ENV, None)
    if token is not None:
        os.environ[TOKEN_ENV] = token
    lock = RunLock(run_dir, "affinitynet infer-cam (a child)")
    try:
        lock.acquire()
    except RunDirBusy as error:
        answer.send(f"refused: {error}")
        return
    answer.send("inherited" if lock.inherited else "locked")
    lock.release()


def probe(run_dir: Path, token: str | None) -> str:
    answer, told = _FORK.Pipe()
    process = _FORK.Process(target=_probe, args=(str(run_dir), token, told))
    process.start()
    process.join(60)
    assert answer.poll(1)
    return answer.recv()


def stop(process) -> None:
    """End a holder (a fork) or a command (a subprocess) if it still runs."""
    if isinstance(process, subprocess.Popen):
        if process.poll() is None:
            process.kill()
        process.wait()
    else:
        if process.is_alive():
            process.kill()
        process.join()


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (and every directory), to compare before and after."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "affinitynet: error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("affinitynet: error: "), err
    return errors[0][len("affinitynet: error: "):]


@pytest.fixture
def data_root(tmp_path) -> Path:
    return tmp_path / "data"


# --- the lock itself ---------------------------------------------------------------------------------

def test_the_lock_is_exclusive_names_its_holder_and_leaves_no_trace(tmp_path):
    run_dir = tmp_path / "fresh" / "run"
    holder = start_holder(run_dir)
    try:
        info = run_lock.holder(run_dir)
        assert info["pid"] == holder.pid and info["command"] == HOLDER_COMMAND
        assert abs(info["started"] - time.time()) < 60
        before = snapshot(tmp_path)
        with pytest.raises(RunDirBusy) as refused:
            RunLock(run_dir, "affinitynet train-cam").acquire()
        message = str(refused.value)
        assert message.startswith(f"{run_dir}: in use by another affinitynet command (pid {holder.pid}, started ")
        assert f": {HOLDER_COMMAND}); nothing was changed" in message and "\n" not in message
        assert "--wait" in message
        assert snapshot(tmp_path) == before
    finally:
        stop(holder)
    # The holder was killed: its lock file is left behind, and blocks no one.
    assert (run_dir / LOCK_NAME).exists() and run_lock.holder(run_dir)["pid"] == holder.pid
    with hold(run_dir, "affinitynet run (after the kill)") as lock:
        assert run_lock.holder(run_dir)["pid"] == os.getpid()
        assert os.environ[TOKEN_ENV] == run_lock.holder(run_dir)["token"]
        assert lock.created_dir is False
    assert not (run_dir / LOCK_NAME).exists() and run_dir.is_dir()
    assert TOKEN_ENV not in os.environ


def test_a_command_that_created_the_directory_and_wrote_nothing_removes_it(tmp_path):
    run_dir = tmp_path / "a" / "run"
    with hold(run_dir, "affinitynet run"):
        assert run_dir.is_dir()
    assert not run_dir.exists()
    with hold(run_dir, "affinitynet run"):
        (run_dir / "train_cam").mkdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["train_cam"]   # what it wrote stays


def test_wait_queues_behind_the_holder_and_then_holds_the_new_file(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir, seconds=1.5)
    try:
        started = time.monotonic()
        with hold(run_dir, "affinitynet run --wait", wait=True):
            waited = time.monotonic() - started
            assert run_lock.holder(run_dir)["pid"] == os.getpid()
        holder.join(60)
        assert holder.exitcode == 0
        assert waited > 1.0                                 # the holder's 1.5 s, less its start
    finally:
        stop(holder)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{run_dir}: waiting for another affinitynet command to end (pid {holder.pid}, started ")
    assert err[0].endswith(f": {HOLDER_COMMAND})")


def test_the_holders_children_share_its_lock_and_no_one_else_does(tmp_path):
    run_dir = tmp_path / "run"
    with hold(run_dir, "affinitynet run --procs 2"):
        token = os.environ[TOKEN_ENV]
        assert probe(run_dir, token) == "inherited"
        for stranger in (None, "0" * 32):        # no token, or a forged one
            assert probe(run_dir, stranger).startswith(f"refused: {run_dir}: in use by another affinitynet command")


# --- commands -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["run", "train-cam", "infer-cam", "sweep"])
def test_a_second_writer_is_refused_at_once_and_changes_nothing(tmp_path, data_root, capsys, command):
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    try:
        (run_dir / "config.yaml").write_text("seed: 0\n")          # what a first command would have left
        before = snapshot(tmp_path / "run")
        started = time.monotonic()
        code, out, err = tiny.cli(tiny.argv(command, run_dir, data_root), capsys)
        assert code == 2 and time.monotonic() - started < 30
        message = one_line_error(err)
        assert message.startswith(f"{run_dir}: in use by another affinitynet command (pid {holder.pid}, started ")
        assert HOLDER_COMMAND in message
        assert snapshot(tmp_path / "run") == before
    finally:
        stop(holder)


def test_import_weights_is_a_writer_too(tmp_path, data_root, capsys):
    run_dir = tmp_path / "run"
    weights = tmp_path / "res38_cls.pth"
    weights.write_bytes(b"not read: the lock comes first")
    holder = start_holder(run_dir)
    try:
        before = snapshot(run_dir)
        code, out, err = tiny.cli(["import-weights", "psa-cam", str(weights), "--config", "demo",
                                   *tiny.overrides(run_dir, data_root)], capsys)
        assert code == 2 and f"in use by another affinitynet command (pid {holder.pid}" in one_line_error(err)
        assert snapshot(run_dir) == before
    finally:
        stop(holder)


def test_the_config_is_checked_before_the_lock(tmp_path, data_root, capsys):
    """A bad setting is the line a user sees, busy directory or not."""
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    try:
        code, out, err = tiny.cli(tiny.argv("train-cam", run_dir, data_root, "backbone.name=mobilenetv3"), capsys)
        assert code == 2 and "did you mean 'mobilenetv2'?" in one_line_error(err)
    finally:
        stop(holder)


def test_readers_run_beside_a_writer(reference, tmp_path, capsys):
    ref_run, data_root = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_run, run_dir)
    holder = start_holder(run_dir)
    try:
        code, out, err = tiny.cli(["evaluate", "--config", "demo", *tiny.overrides(run_dir, data_root),
                                   "--split", "val", "--pred", str(run_dir / "infer_seg" / "predictions")], capsys)
        assert code == 0, err
        assert "mIoU" in out
        code, out, err = tiny.cli(["config", "show", "--config", str(run_dir / "config.yaml")], capsys)
        assert code == 0 and "random_walk.beta" in out
        code, out, err = tiny.cli(["report", str(run_dir), "--gallery", "2"], capsys)
        assert code == 0 and (run_dir / "report" / "index.html").is_file()
    finally:
        stop(holder)


def _affinitynet(args: list[str], workdir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "affinitynet", *args], cwd=workdir, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lock(run_dir: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    started = time.monotonic()
    while (run_lock.holder(run_dir) or {}).get("pid") != process.pid:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() - started < timeout, "the command did not take the lock"
        time.sleep(0.05)


def test_two_real_runs_on_one_directory(reference, tmp_path):
    """Two `affinitynet run` processes: the second is refused at once, naming the first, which
    finishes with a lone run's outputs. After a SIGKILL of the holder, the next command proceeds."""
    ref_run, data_root = reference
    run_dir = tmp_path / "run"
    args = tiny.argv("run", run_dir, data_root)
    first = _affinitynet(args, tmp_path)
    try:
        _wait_for_lock(run_dir, first)
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "affinitynet", *args], cwd=tmp_path, env=_env(),
                                capture_output=True, text=True, timeout=120)
        refused_after = time.monotonic() - started
        assert first.poll() is None, "the first run ended before the second was refused: nothing was tested"
        assert second.returncode == 2, second.stderr
        message = one_line_error(second.stderr)
        assert message.startswith(f"{run_dir}: in use by another affinitynet command (pid {first.pid}, started ")
        assert f": {shlex.join(['affinitynet', *args])}); nothing was changed" in message   # its command line
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        stop(first)
    assert refused_after < 30
    assert tiny.compare_runs(ref_run, run_dir)["differences"] == []
    assert not (run_dir / LOCK_NAME).exists()

    # A holder killed by SIGKILL in the middle of its run: its lock file stays, and stops no one.
    killed_dir = tmp_path / "killed"
    killed_args = tiny.argv("run", killed_dir, data_root)
    victim = _affinitynet(killed_args, tmp_path)
    try:
        _wait_for_lock(killed_dir, victim)
        while not (killed_dir / "train_cam" / "_stage.json").exists():
            assert victim.poll() is None, victim.communicate()
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        stop(victim)
    assert json.loads((killed_dir / LOCK_NAME).read_text())["pid"] == victim.pid
    after = subprocess.run([sys.executable, "-m", "affinitynet", *tiny.argv("train-cam", killed_dir, data_root)],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert after.returncode == 0, after.stderr[-3000:]
    assert tiny.compare_runs(ref_run, killed_dir, ["train_cam"])["differences"] == []
    assert not (killed_dir / LOCK_NAME).exists()


def test_a_second_torchrun_job_is_refused_once(reference, tmp_path):
    """`--procs 2` (torchrun): rank 0 takes the lock for the job and both ranks follow its
    answer; refused, the job prints one line and exits 2."""
    ref_run, data_root = reference
    run_dir = tiny.copy_stages(ref_run, tmp_path / "run", ["train_cam"])
    holder = start_holder(run_dir)
    try:
        before = snapshot(run_dir)
        done = subprocess.run([sys.executable, "-m", "affinitynet", *tiny.argv("infer-cam", run_dir, data_root),
                               "--procs", "2"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 2, done.stderr[-3000:]
        assert f"in use by another affinitynet command (pid {holder.pid}" in one_line_error(done.stderr)
        assert snapshot(run_dir) == before
    finally:
        stop(holder)
    # With the lock free, the ranks of one job do not lock each other out: test_distributed.py's
    # runs under torchrun, and `run --procs 2` whose processes share its command's lock.
