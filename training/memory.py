"""Peak memory of a stage: Linux lets a process reset its own high-water mark (VmHWM).

`reset_peak()` before a stage and `peak_mb()` after it give that stage's peak resident memory.
Where the reset is not possible (not Linux), `peak_mb()` is the process's peak so far.
`process_peak_mb()` is the whole process's peak, resets or not.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


_discarded_mb = 0.0  # the largest peak a reset has erased (the kernel forgets it)


def reset_peak() -> bool:
    """Start a new high-water mark; False where the system cannot (the peak stays cumulative)."""
    global _discarded_mb
    _discarded_mb = max(_discarded_mb, peak_mb())
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """Peak resident memory in MB since the last `reset_peak()` (or since the start)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def process_peak_mb() -> float:
    """Peak resident memory of the whole process, across resets (`ru_maxrss` loses them)."""
    return max(_discarded_mb, peak_mb())
