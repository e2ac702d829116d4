"""Replaying a recorded stream: a run folder seeded with a recorded run's files but no editor state (what
is committed of a run) applies the recorded batches again, each with the targets its record names, and
checks each batch's report against its record (:class:`Replay`), refusing to go on past one that differs
by more than a relative tolerance; every replay is on record in the folder (:data:`REPLAY_FILE`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rlsedit.compare import diff_values, relative_difference
from rlsedit.store import load_json, save_json

__all__ = [
    "REPLAY_FILE",
    "REPLAY_MISMATCH_FILE",
    "REPLAY_RTOL",
    "Replay",
    "ReplayMismatch",
    "check_replay",
    "machine",
    "recorded_targets_keys",
]

log = logging.getLogger(__name__)

#: Default relative tolerance of a replayed batch's report against its record (a replay on the same
#: machine and software reproduces every value exactly; another CPU rounds differently in the last bits).
REPLAY_RTOL = 1e-6

#: Written into a run folder by every replay: per invocation, the tolerance and each replayed batch's
#: largest relative difference from its record.
REPLAY_FILE = "replays.json"


class ReplayMismatch(RuntimeError):
    """A replayed batch does not reproduce its record: the folder's later files describe another stream.

    ``checked``: the comparison of the refused batch (as :func:`check_replay` returns it), if any."""

    def __init__(self, message: str, checked: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.checked = checked


#: Written into a run folder whose replay did not reproduce its record; the folder is refused from then on.
REPLAY_MISMATCH_FILE = "replay-mismatch.json"


def machine() -> dict[str, Any]:
    """What decides a run's rounding on this machine: the CPU's model name, the instruction set torch's
    kernels use (``"AVX2"``, ``"AVX512"``, ...), torch's version and its thread count."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def check_replay(
    out: Path, recorded: dict[str, Any], entry: dict[str, Any], n_cases: int, rtol: float
) -> dict[str, Any]:
    """Refuse to go on when a replayed batch's report differs from the recorded one (timings aside) by
    more than relative tolerance ``rtol``; return the comparison (values compared, values differing at
    all, the largest relative difference and where, and the replayed value of each differing leaf by its
    path, so the record and ``replays.json`` together hold the replayed report).

    The batch is already in the editor's state by then, so the refusal is written into the folder
    (:data:`REPLAY_MISMATCH_FILE`): the same command must not resume past the mismatched batch."""
    n, every = diff_values(recorded, entry, 0.0)
    rel = [(relative_difference(a, b), p) for p, a, b in every]
    worst = max(rel, default=(0.0, None))
    # compare.equal_values(a, b, rtol) is relative_difference(a, b) <= rtol: reuse the differences
    diffs = [(p, a, b) for (r, _), (p, a, b) in zip(rel, every, strict=True) if r > rtol]
    checked = {
        "batch_id": entry.get("batch_id"),
        "values": n,
        "differing": len(every),
        "max_relative_difference": worst[0],
        "where": worst[1],
        "replayed": {p: b for p, _, b in every},
    }
    if diffs:
        shown = "; ".join(f"{p}: recorded {a!r}, replayed {b!r}" for p, a, b in diffs[:3])
        message = (
            f"batch {entry.get('batch_id')} (edits {entry['edits_after']} of {n_cases}) replayed differently "
            f"from its record in batches.json ({len(diffs)} of {n} values differ by more than the relative "
            f"tolerance {rtol:g}; {shown}). This machine or software does not reproduce the recorded stream "
            "(or --targets-cache lacks its targets and they were optimised again): the folder's checkpoints "
            "describe another model state. Start a new folder to run the stream from scratch; or, where the "
            "differences are another CPU's rounding, remove the folder's editor/ and "
            f"{REPLAY_MISMATCH_FILE} and replay with a larger --replay-rtol (each batch's largest difference "
            f"and the values it replayed differently are kept in {REPLAY_FILE})."
        )
        save_json(out / REPLAY_MISMATCH_FILE, {"message": message})
        raise ReplayMismatch(message, {**checked, "refused": True})
    if every:
        log.info(
            "batch %d replayed: of %d values, %d as recorded and %d different but within the relative "
            "tolerance %g (largest difference %.3g, %s)",
            entry.get("batch_id"),
            n,
            n - len(every),
            len(every),
            rtol,
            worst[0],
            worst[1],
        )
    else:
        log.info("batch %d replayed: %d values the same as recorded", entry.get("batch_id"), n)
    return checked


def recorded_targets_keys(record: dict[str, Any]) -> list[str]:
    """The targets cache keys a recorded batch used (its ``targets_keys``; none in a record written before
    batches kept them and not upgraded by ``scripts/migrate_runs.py --targets-cache``)."""
    return list(record.get("targets_keys", []))


class Replay:
    """The recorded batches of a run folder that its editor's state does not hold, replayed in order.

    Args:
        out: the run folder.
        reports: the folder's ``batches.json`` (one record per applied batch, with its ``chunk``).
        applied: batches the editor's state holds (those are not replayed).
        command: the invocation, kept with the replay's record.
        rtol: relative tolerance of a replayed report against its record.
        n_cases: the stream's length (for messages).
    """

    def __init__(
        self,
        out: Path,
        reports: list[dict[str, Any]],
        applied: int,
        command: str | None,
        rtol: float,
        n_cases: int,
    ) -> None:
        self.out, self.reports, self.rtol, self.n_cases = out, reports, rtol, n_cases
        self.recorded = {int(r["chunk"]): i for i, r in enumerate(reports) if int(r["chunk"]) >= applied}
        self.log: list[dict[str, Any]] = []
        self.replayed = 0
        self._replays: list[dict[str, Any]] = []
        if self.recorded:
            log.info(
                "replaying %d recorded batches (targets from --targets-cache where it has them); each is "
                "checked against its record in batches.json",
                len(self.recorded),
            )
            path = out / REPLAY_FILE
            self._replays = load_json(path) if path.exists() else []
            self._replays.append(
                {"command": command, "machine": machine(), "rtol": rtol, "batches": self.log}
            )
            self._save()  # a refused replay is on record too

    def _save(self) -> None:
        save_json(self.out / REPLAY_FILE, self._replays)

    def __contains__(self, chunk: int) -> bool:
        return chunk in self.recorded

    def target_keys(self, chunk: int, cache: str | Path | None) -> list[str] | None:
        """The targets cache keys the recorded batch of ``chunk`` used (None: not a replayed chunk, or no
        cache to read them from)."""
        if chunk not in self.recorded or cache is None:
            return None
        return recorded_targets_keys(self.reports[self.recorded[chunk]])

    def check(self, chunk: int, entry: dict[str, Any]) -> None:
        """Compare the replayed batch's report ``entry`` with its record (:func:`check_replay`) and keep
        the comparison; ReplayMismatch (the comparison kept too) when it differs beyond the tolerance."""
        try:
            checked = check_replay(
                self.out, self.reports[self.recorded[chunk]], entry, self.n_cases, self.rtol
            )
        except ReplayMismatch as exc:
            self.log.append(exc.checked)
            self._save()
            raise
        self.log.append(checked)
        self._save()
        self.replayed += 1

    def close(self) -> None:
        """Log what was replayed."""
        if self.replayed:
            worst = max((b["max_relative_difference"] for b in self.log), default=0.0)
            log.info(
                "replayed %d recorded batches: each as recorded (largest relative difference %.3g)",
                self.replayed,
                worst,
            )
