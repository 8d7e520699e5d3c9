"""Peak memory of a benchmark's worker process, shared by the benchmarks that measure it."""


def _status_mb(field):
    """A size from /proc/self/status in MB. VmHWM (peak RSS) belongs to this process's own
    address space; ru_maxrss would not do, as Linux carries the parent's peak over the exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
