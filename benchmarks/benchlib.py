"""Shared helpers of the benchmark suite: timing, machine information, memory sampling and the report.

A benchmark returns a :class:`Section`: a title, the command that reproduces it, notes, tables and the raw
numbers (``data``, written to the JSON file next to the Markdown report). Timings are medians over
repeats (:func:`median_time`); every call is synchronised with the device before the clock is read.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlsedit.memory import max_rss_bytes, rss_bytes

__all__ = [
    "RssSampler",
    "Section",
    "Table",
    "fmt_bytes",
    "fmt_ratio",
    "fmt_seconds",
    "machine_info",
    "matmul_gflops",
    "max_rss_bytes",
    "median",
    "median_time",
    "rss_bytes",
    "sync",
    "timed",
]

log = logging.getLogger("benchmarks")

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------
# report structure
# --------------------------------------------------------------------------------------------------------


@dataclass
class Table:
    """A Markdown table: ``headers`` and ``rows`` of already formatted cells, with an optional caption."""

    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""

    def to_markdown(self) -> str:
        """The table as GitHub-flavoured Markdown (caption first, in italics, when given)."""
        for row in self.rows:
            if len(row) != len(self.headers):
                raise ValueError(f"row {row} has {len(row)} cells for {len(self.headers)} headers")
        lines = []
        if self.caption:
            lines += [f"*{self.caption}*", ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Section:
    """One benchmark's results.

    Attributes:
        name: the benchmark's name (``--only`` selects it).
        title: heading in the report.
        command: the command line that reproduces this section.
        summary: the headline figures (one bullet each), e.g. a ratio and whether it meets its target.
        tables: the measurements.
        notes: how it was measured (formulas, what is included in each timing, caveats).
        data: raw numbers (JSON-serialisable) for the JSON report.
        seconds: wall time of the whole benchmark.
        measured: when and where it ran (date, git revision, load average at its start), shown with the
            section: a report updated with ``--update`` holds sections of different runs.
    """

    name: str
    title: str
    command: str = ""
    summary: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    measured: dict[str, str] = field(default_factory=dict)

    def to_markdown(self) -> str:
        """The section as Markdown: heading, command, summary, tables, notes."""
        parts = [f"## {self.title}", "", f"Reproduce: `{self.command}`", ""]
        if self.summary:
            parts += [*(f"- {s}" for s in self.summary), ""]
        for table in self.tables:
            parts += [table.to_markdown(), ""]
        if self.notes:
            parts += ["Notes:", "", *(f"- {n}" for n in self.notes), ""]
        when = ", ".join(f"{k} {v}" for k, v in self.measured.items())
        parts += [f"(benchmark wall time {self.seconds:.1f} s" + (f"; {when})" if when else ")"), ""]
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Everything, the tables as ``{"headers", "rows", "caption"}`` (their raw numbers are in
        ``data``)."""
        return {
            "name": self.name,
            "title": self.title,
            "command": self.command,
            "summary": self.summary,
            "notes": self.notes,
            "seconds": self.seconds,
            "measured": self.measured,
            "tables": [{"headers": t.headers, "rows": t.rows, "caption": t.caption} for t in self.tables],
            "data": self.data,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Section:
        """The inverse of :meth:`to_dict` (a section kept by ``--update``)."""
        return cls(
            name=d["name"],
            title=d["title"],
            command=d.get("command", ""),
            summary=list(d.get("summary", [])),
            tables=[Table(t["headers"], t["rows"], t.get("caption", "")) for t in d.get("tables", [])],
            notes=list(d.get("notes", [])),
            data=d.get("data", {}),
            seconds=float(d.get("seconds", 0.0)),
            measured=dict(d.get("measured", {})),
        )


# --------------------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------------------


def fmt_seconds(s: float) -> str:
    """``s`` seconds with a unit that keeps three significant figures (us, ms or s)."""
    if s != s:  # NaN
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.3g} us"
    if s < 1.0:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def fmt_ratio(r: float) -> str:
    """A ratio as ``1.23x`` (three significant figures)."""
    if r != r:
        return "n/a"
    return f"{r:.3g}x"


def fmt_bytes(n: float) -> str:
    """A byte count in MiB or GiB."""
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    return f"{n / 1024**2:.0f} MiB"


# --------------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------------


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[float, Any]:
    """Run ``fn()`` once; return ``(seconds, result)``, synchronised with ``device`` on both sides."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def median(xs: Sequence[float]) -> float:
    """The median of ``xs`` (NaN when empty)."""
    return float(statistics.median(xs)) if xs else float("nan")


def median_time(
    fn: Callable[[], Any], repeats: int, device: torch.device | str | None = None, warmup: int = 1
) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    Returns:
        ``(median seconds, every timed sample)``.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    samples = [timed(fn, device)[0] for _ in range(repeats)]
    return median(samples), samples


def matmul_gflops(
    n: int, repeats: int = 3, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> float:
    """This machine's dense matmul rate in GFLOP/s: median over ``repeats`` of an ``n x n @ n x n`` product
    (``2 n^3`` FLOPs) in ``dtype`` with torch's current thread setting."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=dtype).to(device)
    b = torch.randn(n, n, generator=g, dtype=dtype).to(device)
    t, _ = median_time(lambda: torch.matmul(a, b), repeats, device)
    return 2.0 * n**3 / t / 1e9


# --------------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------------


class RssSampler:
    """Sample the process's RSS every ``interval`` seconds in a background thread; ``peak`` is the largest
    sample (the lifetime peak from ``getrusage`` would include whatever ran before the window)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = rss_bytes()
        self.start = self.peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.start = rss_bytes()
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# --------------------------------------------------------------------------------------------------------
# machine information
# --------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_ram() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not rev:
        return "unknown"
    return rev + (" (with uncommitted changes)" if dirty else "")


def machine_info(device: str | torch.device = "cpu") -> dict[str, str]:
    """What the timings depend on: CPU model and cores, torch and its threads, the device, the load."""
    info: dict[str, str] = {
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "CPU": _cpu_model(),
        "logical CPUs": str(os.cpu_count()),
    }
    if hasattr(os, "sched_getaffinity"):
        info["CPUs usable by this process"] = str(len(os.sched_getaffinity(0)))
    ram = _total_ram()
    if ram:
        info["RAM"] = fmt_bytes(ram)
    if hasattr(os, "getloadavg"):
        info["load average at start (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    info["torch"] = torch.__version__
    info["torch intra-op threads"] = str(torch.get_num_threads())
    info["torch inter-op threads"] = str(torch.get_num_interop_threads())
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        info[var] = os.environ.get(var, "(unset)")
    info["MKL"] = str(torch.backends.mkl.is_available())
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    dev = torch.device(device)
    info["device"] = str(dev)
    if dev.type == "cuda" and torch.cuda.is_available():
        info["GPU"] = torch.cuda.get_device_name(dev)
        info["CUDA"] = str(torch.version.cuda)
    info["git revision"] = _git_revision()
    return info
