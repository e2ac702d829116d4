"""Do two run folders hold the same measurements? A reproducibility check for ``rlsedit run``.

Compares every JSON and JSONL file two run folders share (checkpoint scores, retention, generations and
fluency, general capability, batch reports with their residuals and objective terms, per-case records,
the final results and the run's spec), value by value, and lists the values that differ. Wall-clock and
memory figures (``seconds``, ``timings``, ``memory``), whether targets came from a cache and the cache
files' names (``targets_cached``, ``targets_keys``), the command line that made the run (``command``,
``invocations.json``), the machine that ran it (``machine``) and the record of replays (``replays.json``)
are left out: they differ between two runs of the same experiment. The editor's state (``editor/``) is
not read.

With ``--prefix`` the runs may be at different points of the same stream (a rerun still going, say):
files only one of them has are skipped, and of the per-batch and per-case lists only the part both have
is compared.

    python experiments/compare_runs.py /work/runs/rlsedit-cf10k docs/results/runs/rlsedit-cf10k --prefix

Exit status: 0 when every compared value is equal (within ``--rtol``), 1 when some differ, 2 on bad
input (a folder that is not a run).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlsedit.compare import diff_values
from rlsedit.store import CorruptStateError, load_json

#: Files not compared at all (the command lines that made or resumed the run).
IGNORED_FILES = frozenset({"invocations.json", "replays.json"})
#: Files that hold one entry per batch or per case, in stream order (``--prefix`` compares the common part).
STREAM_FILES = frozenset({"batches.json", "cases.jsonl"})


@dataclass
class Comparison:
    """What :func:`compare_runs` found. ``differences`` holds ``(file, path, value_a, value_b)``; ``path``
    names the value inside the file (``summary.efficacy``, ``3.layers.7.fit``)."""

    files: list[str] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    truncated: dict[str, tuple[int, int]] = field(default_factory=dict)
    differences: list[tuple[str, str, Any, Any]] = field(default_factory=list)
    values: int = 0

    @property
    def same(self) -> bool:
        return not self.differences


def _files(run: Path) -> dict[str, Path]:
    if not (run / "spec.json").is_file():
        raise ValueError(f"{run} is not a run folder (it has no spec.json)")
    out = {}
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run)
        if rel.parts[0] == "editor" or path.name in IGNORED_FILES or not path.is_file():
            continue
        if path.suffix in (".json", ".jsonl") and not path.name.startswith("."):
            out[rel.as_posix()] = path
    return out


def _load(path: Path) -> Any:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return load_json(path)


def compare_runs(a: str | Path, b: str | Path, *, rtol: float = 0.0, prefix: bool = False) -> Comparison:
    """Compare the measurements of run folders ``a`` and ``b`` (see the module's docstring).

    ``rtol`` is the relative tolerance of numbers (0: exact). With ``prefix`` files present in one run
    only are skipped and stream files (``batches.json``, ``cases.jsonl``) compared on their common part.
    Raises ``ValueError`` when a folder is not a run, ``CorruptStateError`` for an unreadable JSON file."""
    if rtol < 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    fa, fb = _files(Path(a)), _files(Path(b))
    cmp = Comparison(only_a=sorted(set(fa) - set(fb)), only_b=sorted(set(fb) - set(fa)))
    for name in sorted(set(fa) & set(fb)):
        va, vb = _load(fa[name]), _load(fb[name])
        if prefix and name in STREAM_FILES and isinstance(va, list) and isinstance(vb, list):
            if len(va) != len(vb):
                cmp.truncated[name] = (len(va), len(vb))
            k = min(len(va), len(vb))
            va, vb = va[:k], vb[:k]
        n, found = diff_values(va, vb, rtol)
        cmp.values += n
        cmp.files.append(name)
        cmp.differences += [(name, p, x, y) for p, x, y in found]
    if not prefix:
        cmp.differences += [(name, "<file>", "present", "absent") for name in cmp.only_a]
        cmp.differences += [(name, "<file>", "absent", "present") for name in cmp.only_b]
    return cmp


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="a run folder")
    p.add_argument("b", help="another run folder")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance of numbers (default 0: exact)")
    p.add_argument("--prefix", action="store_true", help="compare only what both runs have reached")
    p.add_argument("--show", type=int, default=20, help="differences listed (default 20)")
    args = p.parse_args(argv)
    try:
        cmp = compare_runs(args.a, args.b, rtol=args.rtol, prefix=args.prefix)
    except (ValueError, CorruptStateError) as e:
        p.error(str(e))
    lines = [f"compared {cmp.values} values in {len(cmp.files)} files"]
    for name, (na, nb) in sorted(cmp.truncated.items()):
        lines.append(f"{name}: first {min(na, nb)} entries compared ({na} in a, {nb} in b)")
    if args.prefix and (cmp.only_a or cmp.only_b):
        lines.append(f"skipped (in one run only): {len(cmp.only_a)} in a, {len(cmp.only_b)} in b")
    if cmp.same:
        within = f" within rtol {args.rtol:g}" if args.rtol else ""
        lines.append(f"same: every compared value is equal{within}")
    else:
        lines.append(f"DIFFERENT: {len(cmp.differences)} values")
        for name, path, x, y in cmp.differences[: max(args.show, 0)]:
            lines.append(f"  {name} {path}: {_short(x)} | {_short(y)}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0 if cmp.same else 1


if __name__ == "__main__":
    sys.exit(main())
