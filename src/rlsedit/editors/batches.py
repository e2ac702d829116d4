"""The batch list of a run (:class:`BatchRecord`, as committed in the manifest) and what the edit loop
derives from it: batch hashes, which batches a repeated call skips, which earlier requests a batch
supersedes; and the request-by-request batch of ROME-style editors.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any, TypedDict

from torch import nn
from tqdm.auto import tqdm

from rlsedit.editors.base import BatchReport, LayerUpdate
from rlsedit.models.arch import context_limit
from rlsedit.requests import EditRequest, RequestError

__all__ = ["BatchRecord", "applied_hashes", "check_fits_context", "dedupe", "hash_requests", "one_at_a_time"]

log = logging.getLogger(__name__)


class BatchRecord(TypedDict):
    """One applied batch as the manifest keeps it.

    Attributes:
        id: the batch's identifier (one past the previous batch's).
        hash: :func:`hash_requests` of the requests as submitted (before in-batch duplicates were dropped).
        requests: the applied requests (``EditRequest.to_dict()``).
        active: per request, 1 while applied, 0 once retracted or superseded.
        records: ``{str(layer): blob reference}`` of the tensors recorded for the batch.
    """

    id: int
    hash: str
    requests: list[dict[str, Any]]
    active: list[int]
    records: dict[str, dict]


def hash_requests(requests: Sequence[EditRequest]) -> str:
    """A batch's identity: the first 32 hex digits of the SHA-256 of its requests as canonical JSON."""
    payload = json.dumps([r.to_dict() for r in requests], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def applied_hashes(batches: list[BatchRecord]) -> set[str]:
    """Hashes of the batches a repeated ``edit`` call skips: every batch in the run whose inactive
    requests (if any) were all superseded by a later batch re-editing the same fact. A request
    superseded that way is still applied (and replaced); skipping such batches keeps a resumed or
    repeated run from applying them twice. One retracted by hand makes its batch applicable again."""
    known: set[str] = set()
    later: set[tuple[str, str]] = set()
    for b in reversed(batches):
        keys = [EditRequest.from_dict(rd).key for rd in b["requests"]]
        if all(active or key in later for active, key in zip(b["active"], keys, strict=True)):
            known.add(b["hash"])
        later.update(keys)
    return known


def dedupe(
    reqs: list[EditRequest], batches: list[BatchRecord]
) -> tuple[list[EditRequest], list[tuple[int, int]]]:
    """Drop earlier duplicates (same subject and prompt) inside the batch; find the requests
    of ``batches`` this batch supersedes."""
    last: dict[tuple[str, str], int] = {}
    for i, r in enumerate(reqs):
        last[r.key] = i
    kept = [r for i, r in enumerate(reqs) if last[r.key] == i]
    if len(kept) < len(reqs):
        log.warning("%d request(s) re-edited later in the same batch were dropped", len(reqs) - len(kept))
    keys = {r.key for r in kept}
    superseded = []
    for b in batches:
        for j, rd in enumerate(b["requests"]):
            if b["active"][j] and EditRequest.from_dict(rd).key in keys:
                superseded.append((b["id"], j))
    return kept, superseded


def one_at_a_time(
    editor: Any, reqs: list[EditRequest], report: BatchReport
) -> tuple[dict[int, LayerUpdate], dict[str, float]]:
    """Locate and solve each request in turn (``one_request_at_a_time``), inside the same batch.

    Each request sees the model and the layer state as left by the requests before it; on failure
    the editor's transaction restores both. The layers' deltas add up, the state is the last one, and
    the records are kept per request (keys prefixed ``"<index>."``).
    """
    merged: dict[int, LayerUpdate] = {}
    timings: dict[str, float] = {}
    subs: list[BatchReport] = []
    # a batch of 100 takes minutes here: a bar on a terminal (none in a log file)
    bar = tqdm(reqs, desc=f"{editor.name} batch {report.batch_id}", unit="request", leave=False, disable=None)
    for i, req in enumerate(bar):
        sub = BatchReport(batch_id=report.batch_id, n_requests=1)
        pendings, t = editor.locate_and_solve([req], sub)
        subs.append(sub)
        for key, value in t.items():
            timings[key] = timings.get(key, 0.0) + value
        for layer, p in pendings.items():
            editor.layer_state[layer] = p.state  # the next request builds on it
            record = {f"{i}.{k}": v for k, v in p.record.items()}
            prev = merged.get(layer)
            if prev is None:
                merged[layer] = LayerUpdate(p.delta, p.state, record)
            else:
                merged[layer] = LayerUpdate(prev.delta + p.delta, p.state, {**prev.record, **record})

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    report.residual_before = mean([s.residual_before for s in subs])
    report.residual_after = mean([s.residual_after for s in subs])
    report.target_nll_init = mean([s.target_nll_init for s in subs])
    report.target_nll_final = mean([s.target_nll_final for s in subs])
    report.targets_cached = all(s.targets_cached for s in subs)
    report.targets_keys = [k for s in subs for k in s.targets_keys]
    for layer, p in merged.items():
        report.layers[layer] = {
            "residual_norm": mean([s.layers[layer]["residual_norm"] for s in subs]),
            "delta_norm": float(p.delta.norm()),
            "weight_norm": subs[0].layers[layer]["weight_norm"],
        }
    return merged, timings


def check_fits_context(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], templates: Sequence[str]
) -> None:
    """Refuse requests too long for the model: the longest context template, the prompt and the new
    target must fit in its context window. Raises :class:`RequestError` naming the request's index."""
    limit = context_limit(model)
    if limit is None:
        return
    longest = max(templates, key=len) if templates else ""
    for index, r in enumerate(requests):
        n = len(tokenizer(longest + r.text + r.target_new_text)["input_ids"])
        if n > limit:
            raise RequestError(
                f"with its subject, target_new and the longest context template it is {n} tokens long; "
                f"the model takes at most {limit}",
                record=index,
                field="prompt",
                unit="index",
            )
