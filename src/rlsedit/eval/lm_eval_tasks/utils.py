"""Hooks of the bundled task definitions for lm-evaluation-harness (``custom_dataset``, ``doc_to_*``): the
items, prompts, label words and gold labels are rlsedit's own (:mod:`rlsedit.eval.capability`), so the
harness scores exactly the items and prompts our zero-shot code scores."""

from __future__ import annotations

from typing import Any

from rlsedit.eval.capability import capability_task, task_items


def _docs(task: str, n_items: int = 100, seed: int = 0, **_: Any) -> dict[str, Any]:
    import datasets

    return {"test": datasets.Dataset.from_list(task_items(task, int(n_items), int(seed)))}


def sst2(**kw: Any) -> dict[str, Any]:
    return _docs("sst2", **kw)


def mrpc(**kw: Any) -> dict[str, Any]:
    return _docs("mrpc", **kw)


def cola(**kw: Any) -> dict[str, Any]:
    return _docs("cola", **kw)


def rte(**kw: Any) -> dict[str, Any]:
    return _docs("rte", **kw)


def mmlu(**kw: Any) -> dict[str, Any]:
    return _docs("mmlu", **kw)


def sst2_text(doc: dict[str, Any]) -> str:
    return capability_task("sst2").prompt(doc)


def mrpc_text(doc: dict[str, Any]) -> str:
    return capability_task("mrpc").prompt(doc)


def cola_text(doc: dict[str, Any]) -> str:
    return capability_task("cola").prompt(doc)


def rte_text(doc: dict[str, Any]) -> str:
    return capability_task("rte").prompt(doc)


def mmlu_text(doc: dict[str, Any]) -> str:
    return capability_task("mmlu").prompt(doc)


def sst2_gold(doc: dict[str, Any]) -> int:
    return capability_task("sst2").gold(doc)


def mrpc_gold(doc: dict[str, Any]) -> int:
    return capability_task("mrpc").gold(doc)


def cola_gold(doc: dict[str, Any]) -> int:
    return capability_task("cola").gold(doc)


def rte_gold(doc: dict[str, Any]) -> int:
    return capability_task("rte").gold(doc)


def mmlu_gold(doc: dict[str, Any]) -> int:
    return capability_task("mmlu").gold(doc)
