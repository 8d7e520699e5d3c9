"""torch.distributed plumbing: every command works unchanged under ``torchrun``.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain ``affinitynet`` call is a world of one.
Backend: nccl on CUDA, gloo on CPU. The process group is joined by the first stage's ``setup``
and left at exit.

The collective timeout (default 60 minutes, ``AFFINITYNET_DIST_TIMEOUT_MIN``) is longer than
torch's NCCL default of 10 minutes: ranks wait at a barrier while rank 0 removes a stale stage
directory (gigabytes of CAMs on VOC) or while the slowest rank finishes its share of a
per-image stage.
"""
from __future__ import annotations

import atexit
import datetime
import os
import signal
import sys
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

TIMEOUT_ENV = "AFFINITYNET_DIST_TIMEOUT_MIN"


def launched() -> bool:
    """True when started by torchrun (or any launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device | None = None) -> None:
    """Join the process group torchrun describes (no-op for a single process or when joined)."""
    if not (dist.is_available() and launched()) or dist.is_initialized():
        return
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device if device.index is not None else torch.device("cuda", local_rank()))
    timeout = datetime.timedelta(minutes=float(os.environ.get(TIMEOUT_ENV, "60")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    atexit.register(_leave)


def _leave() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # at interpreter exit a peer may already be gone; nothing to do then
            pass


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0; before the group is joined, the launcher's RANK says (so that work done before
    the first stage, such as saving the resolved config, happens once)."""
    if is_distributed():
        return dist.get_rank() == 0
    return not launched() or int(os.environ.get("RANK", "0")) == 0


def backend() -> str | None:
    return dist.get_backend() if is_distributed() else None


def barrier() -> None:
    if is_distributed():
        if backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of a per-image job: every world_size-th item, starting at the rank."""
    return list(items[rank()::world_size()])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it. A CPU tensor under nccl (which
    reduces CUDA tensors only) makes a round trip through the current GPU."""
    if is_distributed():
        if backend() == "nccl" and tensor.device.type != "cuda":
            on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            tensor.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for a single process."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def launch(procs: int, argv: Sequence[str]) -> int:
    """``affinitynet <argv>`` as ``procs`` processes on this machine (``--procs``): what
    ``torch.distributed.run --standalone --nproc_per_node=procs -m affinitynet <argv>`` starts,
    each process with one thread unless ``OMP_NUM_THREADS`` or the config's ``threads`` says
    otherwise. On a 2-core CPU, against one process with two threads, the per-image stages ran
    faster this way and the trainings slower (docs/performance.md, "Threads and processes"). Per-image stages
    write the files one process writes; a training gives one process's weights up to float
    rounding (tests/test_distributed.py), which grows over a whole training.

    Returns the exit code of the first process that failed, which has printed its own error
    line; torchrun's report of the failure is not repeated. A process killed by a signal (out
    of memory) prints nothing, so that is said here."""
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    arguments = torchrun.parse_args(["--standalone", f"--nproc_per_node={procs}", "-m", "affinitynet", *argv])
    # The launcher's log lines about a failed process repeat that process's own error line.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = threads or "1"   # for the processes; this one may go on training
    # The launcher turns these signals into its own exception and leaves its handlers installed;
    # this process may go on (``run --procs``), where Ctrl-C must stay a KeyboardInterrupt.
    handled = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name)]
    handlers = {number: signal.getsignal(number) for number in handled}
    try:
        torchrun.run(arguments)
    except ChildFailedError as error:
        process, failure = error.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode
        print(f"affinitynet: error: process {process} of {procs} was stopped by {failure.signal_name()} "
              "(out of memory? try fewer --procs); finished outputs are kept and a re-run resumes", file=sys.stderr)
        return 1
    except SignalException as stop:   # Ctrl-C: the processes have said so, and the launcher stopped them
        return 128 + int(stop.sigval)
    finally:
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return 0
