"""Edit cases from a file of KnowEdit-style (EasyEdit) records: ``rlsedit run --dataset FILE``,
:func:`rlsedit.load_cases`.

A record (a JSON array of them, or one per line)::

    {"subject": "Danielle Darrieux", "prompt": "The mother tongue of Danielle Darrieux is",
     "target_new": "English", "ground_truth": ["French"],
     "rephrase_prompt": "Danielle Darrieux's mother tongue is",
     "portability": {"Reasoning": [{"prompt": "...", "ground_truth": [["English", "en"]]}]},
     "locality": {"Relation_Specificity": [{"prompt": "...", "ground_truth": ["..."]}]},
     "case_id": 0}

``prompt`` holds the subject literally or ``{}`` in its place; ``target_new`` and ``ground_truth`` may be
strings or lists (nested lists of aliases too: the first string is the answer); ``rephrase_prompt`` (or
``rephrase``) a string or a list; ``portability`` and ``locality`` map a group name to a list of
``{"prompt", "ground_truth"}``. The compact CounterFact form (``locality_prompt``,
``locality_ground_truth``) is read as one locality group, ``Neighborhood``. Without ``case_id`` a record's
position in the file (from 0) is its id.

Scores (token-level top-1 accuracy under teacher forcing, as zsRE's and EasyEdit's): **efficacy** of the
new object after the prompt; **generalization** after each rephrase (mean); **portability** of each
portability item's answer after its prompt (EasyEdit's portability: the new fact used in reasoning),
per group (``portability/<group>``) and over all items; **specificity**: the same for the locality items
(``locality/<group>`` per group). EasyEdit's locality compares the edited model's predictions with the
unedited model's; ours scores the given answer, as our zsRE specificity does, and a run reports the
unedited model's score beside it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch import nn

from rlsedit.datasets import _prompts
from rlsedit.eval.scoring import target_token_top1
from rlsedit.eval.summary import summarize_metrics
from rlsedit.requests import EditRequest, RequestError, first_answer
from rlsedit.tasks.base import Task

__all__ = ["KnowEditCase", "file_task", "read_cases", "score_knowedit", "summarize_knowedit"]

#: Metrics every summary has (groups add ``portability/<group>`` and ``locality/<group>``).
KNOWEDIT_METRICS = ("efficacy", "generalization", "specificity", "portability")


@dataclass(frozen=True)
class KnowEditCase:
    """One edit and the prompts that evaluate it.

    Attributes:
        case_id: the record's ``case_id`` or its position in the file.
        request: the edit (``case_id`` set).
        rephrase_prompts: paraphrases of the prompt (may be empty).
        portability / locality: ``{group: ((prompt, answer), ...)}``.
    """

    case_id: int | str
    request: EditRequest
    rephrase_prompts: tuple[str, ...]
    portability: dict[str, tuple[tuple[str, str], ...]]
    locality: dict[str, tuple[tuple[str, str], ...]]


def _answer(value: object, field: str) -> str:
    """The first non-blank string of a string or (nested) list of them."""
    value = first_answer(value, field)
    if not isinstance(value, str) or not value.strip():
        raise RequestError("must be a non-blank string or a list holding one", field=field)
    return value.strip()


def _texts(value: object, field: str) -> tuple[str, ...]:
    """A non-blank string or a list of them (:func:`rlsedit.datasets._prompts`), each stripped."""
    return tuple(p.strip() for p in _prompts(value, field))


def _groups(value: object, field: str) -> dict[str, tuple[tuple[str, str], ...]]:
    if not isinstance(value, Mapping):
        raise RequestError(f"must be an object of groups, got {type(value).__name__}", field=field)
    out: dict[str, tuple[tuple[str, str], ...]] = {}
    for group, items in value.items():
        where = f"{field}.{group}"
        if isinstance(items, Mapping):  # one item given as an object
            items = [items]
        if not isinstance(items, list):
            raise RequestError(
                f"must be a list of {{prompt, ground_truth}}, got {type(items).__name__}", field=where
            )
        pairs = []
        for k, item in enumerate(items):
            at = f"{where}[{k}]"
            if not isinstance(item, Mapping):
                raise RequestError(f"must be an object, got {type(item).__name__}", field=at)
            if "prompt" not in item or "ground_truth" not in item:
                raise RequestError("needs 'prompt' and 'ground_truth'", field=at)
            prompts = _texts(item["prompt"], f"{at}.prompt")
            answers = item["ground_truth"]
            if (
                isinstance(item["prompt"], list)
                and isinstance(answers, list)
                and len(answers) == len(prompts)
            ):
                pairs += [
                    (p, _answer(a, f"{at}.ground_truth")) for p, a in zip(prompts, answers, strict=True)
                ]
            else:
                pairs += [(p, _answer(answers, f"{at}.ground_truth")) for p in prompts]
        out[str(group)] = tuple(pairs)
    return out


def case_from_record(record: object, position: int) -> KnowEditCase:
    """A :class:`KnowEditCase` from one record (RequestError naming the field on bad input)."""
    if not isinstance(record, Mapping):
        raise RequestError(f"must be a JSON object, got {type(record).__name__}")
    for key in ("prompt", "subject", "target_new"):
        if key not in record:
            raise RequestError("missing required field", field=key)
    truth = record.get("ground_truth", record.get("target_true"))
    case_id = record.get("case_id", position)
    try:
        request = EditRequest(
            prompt=record["prompt"],
            subject=record["subject"],
            target_new=_answer(record["target_new"], "target_new"),
            target_true=None if truth is None else _answer(truth, "ground_truth"),
            case_id=case_id,
        )
    except RequestError as err:
        raise err.renamed(
            {"target_true": "ground_truth" if "ground_truth" in record else "target_true"}
        ) from None
    rephrase: tuple[str, ...] = ()
    for key in ("rephrase_prompt", "rephrase"):
        if record.get(key) is not None:
            rephrase = _texts(record[key], key)
            break
    portability = _groups(record.get("portability", {}), "portability")
    locality = _groups(record.get("locality", {}), "locality")
    if "locality_prompt" in record:
        pair = (
            _texts(record["locality_prompt"], "locality_prompt")[0],
            _answer(record.get("locality_ground_truth"), "locality_ground_truth"),
        )
        locality = {**locality, "Neighborhood": (pair,)}
    return KnowEditCase(request.case_id, request, rephrase, portability, locality)


def read_cases(path: str | Path) -> list[KnowEditCase]:
    """Every record of ``path`` (a JSON array, or JSON Lines), all or nothing: the first bad record raises
    :class:`RequestError` naming the file, the record (array index or line) and the field; duplicate
    ``case_id`` values are refused."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    source = path.name
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
        numbered = list(enumerate(records))
        unit, base = "record", 0
    except json.JSONDecodeError:
        numbered, unit, base = [], "line", 1
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number - 1, json.loads(line)))
            except json.JSONDecodeError as err:
                raise RequestError(
                    f"not valid JSON ({err.msg})", record=number, source=source, unit="line"
                ) from None
    cases: list[KnowEditCase] = []
    seen: set = set()
    for position, (index, record) in enumerate(numbered):
        try:
            case = case_from_record(record, position)
            if case.case_id in seen:
                raise RequestError(f"duplicate case_id {case.case_id!r}", field="case_id")
        except RequestError as err:
            raise err.located(index + base, source=source, unit=unit) from None
        seen.add(case.case_id)
        cases.append(case)
    if not cases:
        raise RequestError("holds no records", source=source)
    return cases


def score_knowedit(
    model: nn.Module, tokenizer: Any, cases: Sequence[KnowEditCase], batch_size: int = 32
) -> list[dict[str, Any]]:
    """Per-case records: ``case_id``, ``efficacy``, ``generalization`` (None without rephrases),
    ``portability`` and ``specificity`` (means over the case's items; None without any) and one value per
    group (``portability/<group>``, ``locality/<group>``), token accuracies in [0, 1]."""
    prompts: list[str] = []
    targets: list[str] = []
    slots: list[tuple[int, str]] = []  # (case index, metric) of each pair
    for i, c in enumerate(cases):
        new = c.request.target_new
        pairs = [(c.request.text, new, "efficacy")] + [(p, new, "generalization") for p in c.rephrase_prompts]
        for kind, groups in (("portability", c.portability), ("locality", c.locality)):
            pairs += [(p, a, f"{kind}/{g}") for g, items in groups.items() for p, a in items]
        for p, t, m in pairs:
            prompts.append(p)
            targets.append(t)
            slots.append((i, m))
    hits = target_token_top1(model, tokenizer, prompts, targets, batch_size=batch_size)
    values: list[dict[str, list[float]]] = [{} for _ in cases]
    for (i, metric), h in zip(slots, hits, strict=True):
        values[i].setdefault(metric, []).append(float(h.float().mean()))
    out = []
    for c, vals in zip(cases, values, strict=True):
        rec: dict[str, Any] = {"case_id": c.case_id}
        for metric, vs in vals.items():
            rec[metric] = sum(vs) / len(vs)
        rec.setdefault("generalization", None)
        for kind, name in (("portability", "portability"), ("locality", "specificity")):
            items = [v for m, vs in vals.items() if m.startswith(kind + "/") for v in vs]
            rec[name] = sum(items) / len(items) if items else None
        out.append(rec)
    return out


def summarize_knowedit(records: Iterable[dict[str, Any]], exclude: Iterable[Any] = ()) -> dict[str, Any]:
    """Mean token accuracy (percent) per metric and per group, with ``n`` and 95% half-widths."""
    records = list(records)
    groups = sorted({k for r in records for k in r if "/" in k})
    return summarize_metrics(records, [*KNOWEDIT_METRICS, *groups], exclude)


@lru_cache(maxsize=8)
def _file_cases(path: str, mtime_ns: int) -> tuple[KnowEditCase, ...]:
    return tuple(read_cases(path))


def file_task(path: str) -> Task:
    """The task of a file of records (its one split, ``test``, is the whole file in order)."""

    def every_case() -> Sequence[KnowEditCase]:
        return _file_cases(path, Path(path).stat().st_mtime_ns)

    def load(split: str, limit: int | None) -> Sequence[KnowEditCase]:
        return every_case()[:limit]

    return Task(
        name=path,
        splits=("test",),
        load=load,
        every_case=every_case,
        score=score_knowedit,
        summarize=summarize_knowedit,
        label=Path(path).name,
    )
