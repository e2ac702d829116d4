"""Evaluation datasets as registered tasks.

A task says how to load a dataset's cases, score a model on them and summarise the scores, which splits
it has and whether the generation metrics (fluency, consistency) apply. Runs, ``rlsedit eval`` and the CLI
look a dataset up here by name; nothing else compares dataset names. A new dataset is one module in this
package that calls :func:`register_task` (and is imported below).
"""

from __future__ import annotations

from pathlib import Path

from rlsedit.tasks import counterfact, zsre  # noqa: F401  (each registers its task)
from rlsedit.tasks.base import _TASKS, Task, register_task, task_names
from rlsedit.tasks.knowedit import file_task

__all__ = ["Task", "get_task", "register_task", "task_names"]


def get_task(name: str) -> Task:
    """The task registered as ``name``, or, where ``name`` is a file, the task of its KnowEdit-style
    records (:mod:`rlsedit.tasks.knowedit`); ValueError naming the valid ones otherwise."""
    if name in _TASKS:
        return _TASKS[name]
    if Path(name).is_file():
        return file_task(name)
    if name.endswith((".json", ".jsonl")) or "/" in name:
        raise ValueError(f"dataset file {name!r} not found")
    raise ValueError(f"dataset {name!r} is not supported (valid: {', '.join(_TASKS)}, or a file of records)")
