"""Process memory figures (resident set size) for run records and benchmarks."""

from __future__ import annotations

import os
import platform
import resource

__all__ = ["max_rss_bytes", "rss_bytes"]


def rss_bytes() -> int:
    """The process's current resident set size (psutil if installed, else ``/proc/self/statm``; 0 if
    neither is available)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def max_rss_bytes() -> int:
    """The process's lifetime peak RSS (``resource.getrusage``; kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)
