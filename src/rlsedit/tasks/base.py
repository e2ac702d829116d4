"""The task type and the registry (:mod:`rlsedit.tasks` looks tasks up).

A task says how to load a dataset's cases, score a model on them and summarise the scores, which splits
it has and whether the generation metrics (fluency, consistency) apply. Runs, ``rlsedit eval`` and the CLI
look a dataset up here by name; nothing else compares dataset names. A new dataset is one module in this
package that calls :func:`register_task` (and is imported below).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["Task", "register_task", "task_names"]


@dataclass(frozen=True)
class Task:
    """One evaluation dataset.

    Attributes:
        name: the name runs and the CLI use (``--dataset NAME``).
        splits: the splits ``load`` accepts; the first is the default.
        load: ``load(split, limit)`` -> the split's cases in order (the first ``limit``; None: all).
        every_case: ``every_case()`` -> every case of every split (to find a run's cases by ``case_id``).
        score: ``score(model, tokenizer, cases)`` -> one record (dict) per case.
        summarize: ``summarize(records, exclude)`` -> means, intervals and ``n``, the case ids in
            ``exclude`` left out.
        generation_metrics: whether fluency and consistency are measured on its cases.
        label: the name in messages.
    """

    name: str
    splits: tuple[str, ...]
    load: Callable[[str, int | None], Sequence[Any]]
    every_case: Callable[[], Sequence[Any]]
    score: Callable[[nn.Module, Any, Sequence[Any]], list[dict[str, Any]]]
    summarize: Callable[[Iterable[dict[str, Any]], Iterable[Any]], dict[str, Any]]
    generation_metrics: bool = False
    label: str = ""

    def cases(self, split: str, offset: int, n: int) -> list[Any]:
        """Cases ``offset .. offset + n - 1`` of ``split`` (fewer where the split ends)."""
        self.check_split(split)
        return list(self.load(split, offset + n)[offset:])

    def check_split(self, split: str) -> None:
        """ValueError for a split this dataset does not have."""
        if split not in self.splits:
            raise ValueError(
                f"{self.label or self.name} has no {split!r} split (valid: {', '.join(self.splits)})"
            )


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to the registry (ValueError for a name taken)."""
    if task.name in _TASKS:
        raise ValueError(f"a task named {task.name!r} is registered already")
    _TASKS[task.name] = task
    return task


def task_names() -> tuple[str, ...]:
    """Registered task names, in registration order."""
    return tuple(_TASKS)
