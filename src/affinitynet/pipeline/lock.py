"""One writer per run directory: the OS's lock on ``RUN_DIR/.lock``, held for a command's life.

A command that writes into a run directory (``run``, a stage, ``import-weights``, ``sweep``)
takes an exclusive ``flock`` on the lock file before it writes anything. A second writer is
refused at once, with one line naming the holder (its pid, command line and start time), or
with ``--wait`` queues behind it. Readers (``report``, ``evaluate``, ``config show``) take no
lock and run beside a writer.

The kernel releases a ``flock`` when its holder's last descriptor closes, and so when the
holder dies in any way, SIGKILL included; after a power loss no lock survives a reboot. The
file's content only describes the holder, so a lock file left behind never blocks anyone.
A holder removes the file when it is done (and the run directory itself, when the command
created it and wrote nothing else), so a command leaves no trace when it changed nothing. A
waiter that finds the file it locked removed, or replaced, tries again on the new one.

Processes a holder starts (``run --procs`` on a CPU starts each per-image stage as torchrun
processes) inherit its lock through ``AFFINITYNET_RUN_LOCK``, which names the holder's random
token: a command whose token is that of the lock's current holder is one of its children.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from ..errors import RunDirBusy

LOCK_NAME = ".lock"
TOKEN_ENV = "AFFINITYNET_RUN_LOCK"


def lock_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / LOCK_NAME


def holder(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """What the lock file says of its holder (a holder that died leaves this behind: it says
    nothing of whether the lock is held)."""
    try:
        text = lock_path(run_dir).read_text(encoding="utf-8")
        info = json.loads(text)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def describe(info: dict[str, Any] | None) -> str:
    """``pid 4242 on host, started 2026-12-06 22:10:03: affinitynet run --run-dir R``."""
    if not info:
        return "its holder has not said who it is yet"
    where = "" if info.get("host") in (None, socket.gethostname()) else f" on {info['host']}"
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid', '?')}{where}, started {when}: {info.get('command', '?')}"


class RunLock:
    """The exclusive lock of one run directory (:func:`hold`)."""

    def __init__(self, run_dir: str | os.PathLike, command: str, wait: bool = False):
        self.run_dir = Path(run_dir)
        self.path = lock_path(run_dir)
        self.command = command
        self.wait = wait
        self.fd: int | None = None
        self.inherited = False
        self.created_dir = False
        self._env_before: str | None = None

    def acquire(self) -> None:
        token = os.environ.get(TOKEN_ENV)
        if token and (holder(self.run_dir) or {}).get("token") == token:
            self.inherited = True    # started by the holder, which keeps the lock while it waits
            return
        said = False
        while self.fd is None:
            fd = self._open()
            if fd is None:           # the holder we waited for removed the directory it had made
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not self.wait:
                    os.close(fd)
                    self._undo_mkdir()
                    raise RunDirBusy(f"{self.run_dir}: in use by another affinitynet command "
                                     f"({describe(holder(self.run_dir))}); nothing was changed: wait for it to "
                                     f"end, add --wait to start when it does, or choose another --run-dir") from None
                if not said:
                    print(f"{self.run_dir}: waiting for another affinitynet command to end "
                          f"({describe(holder(self.run_dir))})", file=sys.stderr, flush=True)
                    said = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if self._still_the_file(fd):
                self.fd = fd
            else:                    # its holder removed it as we waited: lock the new one
                os.close(fd)
        token = secrets.token_hex(16)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": self.command, "token": token}
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError as error:     # a full disk: said as the run directory's
            self.release()
            error.filename = str(self.run_dir)
            raise
        self._env_before = os.environ.get(TOKEN_ENV)
        os.environ[TOKEN_ENV] = token

    def _open(self) -> int | None:
        """The lock file, opened (made with its directory where missing); None when the directory
        vanished in between."""
        try:
            if not self.run_dir.is_dir():
                self.run_dir.mkdir(parents=True)
                self.created_dir = True
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except (FileNotFoundError, FileExistsError):
            return None
        except OSError as error:
            self._undo_mkdir()
            # The directory is what cannot be written; the lock file is an inner detail.
            error.filename = str(self.run_dir)
            raise

    def _still_the_file(self, fd: int) -> bool:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)

    def _undo_mkdir(self) -> None:
        if self.created_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()

    def release(self) -> None:
        if self.fd is None:
            return
        # Removed while still locked, so that no other command can lock this file in between.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self.created_dir:
            with contextlib.suppress(OSError):   # not empty: the command wrote outputs, which stay
                self.run_dir.rmdir()
        os.close(self.fd)
        self.fd = None
        if self._env_before is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = self._env_before


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike, command: str, wait: bool = False) -> Iterator[RunLock]:
    """Hold the run directory's lock for the ``with`` block; :class:`RunDirBusy` when another
    command holds it (after waiting for it to end, with ``wait``)."""
    lock = RunLock(run_dir, command, wait)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
