"""The README's main job: edit a few CounterFact facts into the default model and show before/after."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from rlsedit.datasets import load_counterfact
from rlsedit.editors import make_editor
from rlsedit.eval.scoring import greedy_continuations, target_nll
from rlsedit.models.load import load_model

__all__ = ["run_demo"]

log = logging.getLogger(__name__)


def _probe(model, tok, cases) -> list[dict]:
    rows = []
    prompts = [c.request.text for c in cases]
    para = [c.paraphrase_prompts[0] for c in cases]
    neigh = [c.neighborhood_prompts[0] for c in cases]
    new = [c.request.target_new for c in cases]
    true = [c.request.target_true for c in cases]
    nll = {
        "prompt_new": target_nll(model, tok, prompts, new),
        "prompt_true": target_nll(model, tok, prompts, true),
        "para_new": target_nll(model, tok, para, new),
        "para_true": target_nll(model, tok, para, true),
        "neigh_new": target_nll(model, tok, neigh, new),
        "neigh_true": target_nll(model, tok, neigh, true),
    }
    gens = greedy_continuations(model, tok, prompts, max_new_tokens=8)
    for i, c in enumerate(cases):
        rows.append({"case": c, "gen": gens[i], **{k: float(v[i]) for k, v in nll.items()}})
    return rows


def run_demo(
    model_name: str = "smollm2-135m",
    n: int = 4,
    method: str = "rlsedit",
    device=None,
    dtype=None,
    out: Callable[[str], None] = print,
) -> int:  # noqa: T201 - default sink for library use
    """Edit ``n`` CounterFact facts (held-out split) in one batch and report before/after.

    For each fact: the greedy continuation of the prompt, and whether the new object is preferred over
    the true one (lower mean per-token NLL) on the prompt, its paraphrase, and the neighbourhood prompt
    (where the true object should stay preferred).
    """
    t0 = time.perf_counter()
    model, tok = load_model(model_name, device=device, dtype=dtype)
    cases = load_counterfact(split="test", limit=n)
    out(f"model {model_name} loaded in {time.perf_counter() - t0:.1f}s; editing {n} facts with {method}")
    before = _probe(model, tok, cases)
    t1 = time.perf_counter()
    editor = make_editor(method, model, tok)
    t2 = time.perf_counter()
    report = editor.edit([c.request for c in cases])
    t3 = time.perf_counter()
    after = _probe(model, tok, cases)
    out(
        f"editor ready in {t2 - t1:.1f}s (statistics cached after the first run); edit took {t3 - t2:.1f}s "
        f"(targets {report.seconds('targets'):.1f}s, keys {report.seconds('keys'):.1f}s, "
        f"update {report.seconds('update'):.2f}s)"
    )
    out("")
    score = {"efficacy": 0, "paraphrase": 0, "neighbourhood": 0}
    for b, a in zip(before, after, strict=True):
        c = b["case"]
        r = c.request
        out(f"{r.text!r}: {r.target_true!r} -> {r.target_new!r}")
        out(f"   before: ...{b['gen']!r}")
        out(f"   after:  ...{a['gen']!r}")
        eff = a["prompt_new"] < a["prompt_true"]
        par = a["para_new"] < a["para_true"]
        nei = a["neigh_true"] < a["neigh_new"]
        score["efficacy"] += eff
        score["paraphrase"] += par
        score["neighbourhood"] += nei
        out(
            f"   NLL new/true on the prompt {b['prompt_new']:.2f}/{b['prompt_true']:.2f} -> "
            f"{a['prompt_new']:.2f}/{a['prompt_true']:.2f} ({'new wins' if eff else 'true wins'}); "
            f"paraphrase {'new wins' if par else 'true wins'}; neighbourhood "
            f"{'true kept' if nei else 'true lost'}"
        )
    out("")
    out(
        f"efficacy {score['efficacy']}/{n}, paraphrase {score['paraphrase']}/{n}, "
        f"neighbourhood kept {score['neighbourhood']}/{n}; total {time.perf_counter() - t0:.1f}s"
    )
    return 0
