"""lm-evaluation-harness as a scorer of general ability (optional: ``pip install rlsedit[lmeval]``).

The model is evaluated in memory, edited as it is, through the harness's Hugging Face wrapper (``HFLM``
given the model object: no export round-trip). Two kinds of task:

- **bundled** (``sst2``, ``mrpc``, ``cola``, ``rte``, ``mmlu``): rlsedit's items, prompts and label words
  (:mod:`rlsedit.eval.capability`) as harness task definitions shipped in ``rlsedit/eval/lm_eval_tasks/``
  (YAML files the harness loads from disk; the items come from the bundled files, so nothing is
  downloaded). The harness scores each label word by its log-likelihood as the prompt's continuation, as
  our own code does, and the result has the same fields as
  :func:`rlsedit.eval.capability.zero_shot_accuracy` (plus ``"backend": "lm-eval"``), so either backend
  fills the same tables.
- **harness tasks** (any other name, e.g. ``hellaswag``): the harness's own definitions, results as the
  harness reports them (their datasets must be in the local Hugging Face cache when offline).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["BUNDLED_TASKS_DIR", "harness_available", "lm_eval_accuracy", "lm_eval_tasks"]

log = logging.getLogger(__name__)

#: The bundled tasks' definitions for the harness (``rlsedit_<task>.yaml`` and their hooks).
BUNDLED_TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"


def harness_available() -> bool:
    """Whether lm-evaluation-harness (the package ``lm-eval``) is installed."""
    return importlib.util.find_spec("lm_eval") is not None


def _require() -> None:
    if not harness_available():
        raise ImportError(
            "lm-evaluation-harness is not installed: pip install 'rlsedit[lmeval]' (the package lm-eval)"
        )


def _wrapper(model: nn.Module, tokenizer: Any, batch_size: int) -> Any:
    from lm_eval.models.huggingface import HFLM

    from rlsedit.models.arch import input_device

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(input_device(model)))


def _quiet_harness() -> None:
    # the harness logs every task's defaults and a hint about custom kwargs at WARNING
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def lm_eval_accuracy(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    n_items: int = 100,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy of the bundled ``tasks`` scored by the harness, on the same fixed samples
    (``n_items``, ``seed``: :func:`rlsedit.eval.capability.task_items`) and prompts as our own code.

    Returns:
        ``{task: {"task", "accuracy" (%), "ci95", "chance", "n", "correct", "labels", "predicted",
        "seconds", "backend": "lm-eval", "harness": version}}``.
    """
    from rlsedit.eval.capability import CAPABILITY_TASKS, accuracy_record, capability_task

    _require()
    bad = [t for t in tasks if t not in CAPABILITY_TASKS]
    if bad:
        raise ValueError(f"not bundled task(s) {bad}; bundled: {', '.join(CAPABILITY_TASKS)}")
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _quiet_harness()
    t0 = time.perf_counter()
    manager = TaskManager(
        include_path=str(BUNDLED_TASKS_DIR),
        include_defaults=False,
        metadata={"n_items": int(n_items), "seed": int(seed)},
    )
    names = [f"rlsedit_{t}" for t in tasks]
    res = simple_evaluate(
        model=_wrapper(model, tokenizer, batch_size),
        tasks=names,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
    )
    seconds = time.perf_counter() - t0
    out: dict[str, dict[str, Any]] = {}
    for task, name in zip(tasks, names, strict=True):
        k = len(capability_task(task).labels)
        samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
        pred = [max(range(k), key=lambda j, s=s: s["filtered_resps"][j][0]) for s in samples]
        rec = accuracy_record(task, pred, [int(s["target"]) for s in samples], seconds / len(tasks))
        acc, n = res["results"][name]["acc,none"], rec["n"]
        if n and abs(100.0 * acc - rec["accuracy"]) > 1e-6:  # the harness's own aggregate agrees
            raise RuntimeError(f"{name}: harness accuracy {acc} != {rec['correct']}/{n} from its samples")
        out[task] = {**rec, "backend": "lm-eval", "harness": getattr(lm_eval, "__version__", "unknown")}
    return out


def lm_eval_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """The harness's own ``tasks`` (registered names, e.g. ``hellaswag``) on the model as it is, with
    ``limit`` documents per task (None: all). Returns ``{"results": the harness's results per task,
    "seconds", "harness": version}``."""
    _require()
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _quiet_harness()
    t0 = time.perf_counter()
    # the harness's tasks, and ours under their harness names (rlsedit_sst2, ...: the default sample)
    manager = TaskManager(include_path=str(BUNDLED_TASKS_DIR))
    res = simple_evaluate(
        model=_wrapper(model, tokenizer, batch_size),
        tasks=list(tasks),
        limit=limit,
        log_samples=False,
        task_manager=manager,
    )
    results = {
        k: {m: v for m, v in r.items() if isinstance(v, (int, float, str))} for k, r in res["results"].items()
    }
    return {
        "results": results,
        "seconds": time.perf_counter() - t0,
        "harness": getattr(lm_eval, "__version__", "unknown"),
    }
