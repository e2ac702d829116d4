"""Hooks of the bundled task definitions for lm-evaluation-harness (``custom_dataset``, ``doc_to_text``,
``doc_to_target``, ``doc_to_choice``): the items, prompts, gold labels and label words are rlsedit's own
(:mod:`rlsedit.eval.capability`), so the harness scores exactly what our zero-shot code scores. Each item
carries its task's name (``_task``) for the other hooks."""

from __future__ import annotations

from typing import Any

from rlsedit.eval.capability import capability_task, task_items


def docs(task: str, n_items: int = 100, seed: int = 0, **_: Any) -> dict[str, Any]:
    """``{"test": the fixed sample of ``task``}`` (``n_items`` and ``seed`` come from the TaskManager's
    metadata; ``task`` from the definition's ``dataset_kwargs``)."""
    import datasets

    items = [{**x, "_task": task} for x in task_items(task, int(n_items), int(seed))]
    return {"test": datasets.Dataset.from_list(items)}


def text(doc: dict[str, Any]) -> str:
    return capability_task(doc["_task"]).prompt(doc)


def gold(doc: dict[str, Any]) -> int:
    return capability_task(doc["_task"]).gold(doc)


def choices(doc: dict[str, Any]) -> list[str]:
    return list(capability_task(doc["_task"]).labels)
