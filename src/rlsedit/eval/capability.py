"""General capability of a (possibly edited) model: WikiText-2 perplexity and zero-shot GLUE / MMLU.

Every task runs on a fixed sample of the bundled items, so that figures before and after editing (and
across runs) compare the same items:

- **perplexity** on the first ``ppl_tokens`` tokens of the bundled WikiText-2 test split (its tokenised
  form, with ``<unk>`` and `` @-@ ``, as bundled: figures are comparable before and after editing, not
  with published numbers on the raw text). Strided windows: each window holds ``ppl_window`` tokens and
  scores only the tokens not scored by the previous one, so every token after the first is scored once,
  with at least ``ppl_window - ppl_stride`` tokens of context (except in the first window). The 95%
  interval treats windows as independent clusters (the ratio estimator's standard error on the mean NLL,
  mapped through exp). Chance level: the vocabulary size (a uniform model's perplexity).
- **SST-2, MRPC, CoLA, RTE, MMLU**: zero-shot prompts (below); each label word (or answer letter) is
  scored by its total log-probability as the continuation of the prompt and the most likely one is the
  prediction. ``n_items`` per task, stratified by gold label (equal numbers per class, drawn with
  ``random.Random(seed)``), so chance is 1 / number of classes and always guessing one class scores
  exactly chance. Accuracy in percent with a Wilson 95% interval; ``predicted`` counts each label's
  predictions (a model that always says "yes" shows here). Prompts longer than the model's context are
  cut from the left.

Prompts (label words in brackets, gold label order)::

    sst2  "Review: {sentence}\\nSentiment (positive or negative):"                   [negative, positive]
    mrpc  "Sentence 1: {sentence1}\\nSentence 2: {sentence2}\\nQuestion: Do both sentences mean the same
           thing? Answer yes or no.\\nAnswer:"                                          [no, yes]
    cola  "Sentence: {sentence}\\nQuestion: Is this sentence grammatically correct? Answer yes or no.
           \\nAnswer:"                                                                 [no, yes]
    rte   "{sentence1}\\nQuestion: {sentence2} True or False?\\nAnswer:"               [True, False]
    mmlu  "The following is a multiple choice question about {subject}.\\n\\n{question}\\nA. ..\\nB. ..
           \\nC. ..\\nD. ..\\nAnswer:"                                                  [A, B, C, D]

(GLUE labels as bundled: SST-2 1 = positive, MRPC 1 = equivalent, CoLA 1 = acceptable, RTE 0 =
entailment.) The defaults are modest (100 items per task, 4,096 WikiText tokens): a few minutes for a
135M-parameter model on a laptop CPU. Intervals say how far the sample can be trusted.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from rlsedit.eval.lmeval import harness_available
from rlsedit.eval.summary import Z95, wilson_interval
from rlsedit.locate.tokens import pad_id_of, pad_rows
from rlsedit.models.arch import input_device

__all__ = [
    "CAPABILITY_TASKS",
    "CapabilityConfig",
    "accuracy_record",
    "capability_task",
    "evaluate_capability",
    "label_logprobs",
    "perplexity",
    "task_items",
    "zero_shot_accuracy",
]

log = logging.getLogger(__name__)

#: The classification tasks, in report order.
CAPABILITY_TASKS = ("sst2", "mrpc", "cola", "rte", "mmlu")


@dataclass
class CapabilityConfig:
    """What :func:`evaluate_capability` measures.

    Attributes:
        tasks: classification tasks (subset of :data:`CAPABILITY_TASKS`).
        n_items: items per task (stratified by label; capped by what is bundled).
        perplexity: whether to measure WikiText-2 perplexity.
        ppl_tokens: WikiText-2 test tokens scored (from the start of the split).
        ppl_window / ppl_stride: window length and stride (tokens) of the strided perplexity.
        seed: seeds the item samples.
        batch_size: rows per forward pass.
        backend: who scores ``tasks``: "auto" (lm-evaluation-harness where it is installed, else ours),
            "lm-eval" or "rlsedit" (:mod:`rlsedit.eval.lmeval`; both score the same items and prompts).
        lm_eval: the harness's own tasks besides (registered names such as ``hellaswag``; their data must
            be reachable), ``lm_eval_limit`` documents each (None: all).
    """

    tasks: tuple[str, ...] = CAPABILITY_TASKS
    n_items: int = 100
    perplexity: bool = True
    ppl_tokens: int = 4096
    ppl_window: int = 512
    ppl_stride: int = 256
    seed: int = 0
    batch_size: int = 8
    backend: str = "auto"
    lm_eval: tuple[str, ...] = ()
    lm_eval_limit: int | None = None

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        self.lm_eval = tuple(self.lm_eval)
        if self.backend not in ("auto", "lm-eval", "rlsedit"):
            raise ValueError(f"backend must be 'auto', 'lm-eval' or 'rlsedit', got {self.backend!r}")
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            raise ValueError("lm_eval_limit must be >= 1 (or None: every document)")
        if ((self.backend == "lm-eval" and self.tasks) or self.lm_eval) and not harness_available():
            raise ValueError(
                "lm-evaluation-harness is not installed: pip install 'rlsedit[lmeval]' (the package lm-eval)"
            )
        bad = [t for t in self.tasks if t not in CAPABILITY_TASKS]
        if bad:
            raise ValueError(f"unknown capability task(s) {bad}; valid: {', '.join(CAPABILITY_TASKS)}")
        if self.n_items < 1 or self.ppl_tokens < 2 or self.batch_size < 1:
            raise ValueError("n_items >= 1, ppl_tokens >= 2 and batch_size >= 1 are required")
        if not 1 <= self.ppl_stride <= self.ppl_window:
            raise ValueError("1 <= ppl_stride <= ppl_window is required")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        d["lm_eval"] = list(self.lm_eval)
        return d

    def zero_shot_backend(self) -> str:
        """Who scores ``tasks`` here: "lm-eval" or "rlsedit"."""
        if self.backend == "auto":
            return "lm-eval" if harness_available() else "rlsedit"
        return self.backend


# ------------------------------------------------------------------------------------------------ items


@dataclass(frozen=True)
class _Task:
    labels: tuple[str, ...]
    prompt: Callable[[dict[str, Any]], str]
    gold: Callable[[dict[str, Any]], int]
    load: Callable[[], list[dict[str, Any]]]


def _glue(task: str) -> Callable[[], list[dict[str, Any]]]:
    def load() -> list[dict[str, Any]]:
        from rlsedit.datasets import load_glue

        return load_glue(task)

    return load


def _mmlu() -> list[dict[str, Any]]:
    from rlsedit.datasets import load_mmlu

    return load_mmlu()


def _mmlu_prompt(x: dict[str, Any]) -> str:
    subject = str(x.get("subject", "")).replace("_", " ")
    lines = [f"The following is a multiple choice question about {subject}.", "", x["question"].strip()]
    lines += [f"{letter}. {str(c).strip()}" for letter, c in zip("ABCD", x["choices"], strict=True)]
    return "\n".join(lines + ["Answer:"])


_TASKS: dict[str, _Task] = {
    "sst2": _Task(
        ("negative", "positive"),
        lambda x: f"Review: {x['sentence'].strip()}\nSentiment (positive or negative):",
        lambda x: int(x["label"]),
        _glue("sst2"),
    ),
    "mrpc": _Task(
        ("no", "yes"),
        lambda x: (
            f"Sentence 1: {x['sentence1'].strip()}\nSentence 2: {x['sentence2'].strip()}\n"
            "Question: Do both sentences mean the same thing? Answer yes or no.\nAnswer:"
        ),
        lambda x: int(x["label"]),
        _glue("mrpc"),
    ),
    "cola": _Task(
        ("no", "yes"),
        lambda x: (
            f"Sentence: {x['sentence'].strip()}\n"
            "Question: Is this sentence grammatically correct? Answer yes or no.\nAnswer:"
        ),
        lambda x: int(x["label"]),
        _glue("cola"),
    ),
    "rte": _Task(
        ("True", "False"),
        lambda x: f"{x['sentence1'].strip()}\nQuestion: {x['sentence2'].strip()} True or False?\nAnswer:",
        lambda x: int(x["label"]),
        _glue("rte"),
    ),
    "mmlu": _Task(("A", "B", "C", "D"), _mmlu_prompt, lambda x: int(x["answer"]), _mmlu),
}


def capability_task(task: str) -> _Task:
    """A zero-shot task's definition: ``labels`` (the label words, in gold-label order), ``prompt(item)``,
    ``gold(item)`` and ``load()`` (every bundled item)."""
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(_TASKS)}")
    return _TASKS[task]


def task_items(task: str, n_items: int, seed: int = 0) -> list[dict[str, Any]]:
    """A fixed sample of ``n_items`` bundled items of ``task``, stratified by gold label.

    Each label gets ``n_items // k`` items (the first ``n_items % k`` labels one more), drawn with
    ``random.Random(seed)`` from that label's items; the result is in bundled file order. Fewer when the
    bundle holds fewer.
    """
    spec = _TASKS[task]
    items = spec.load()
    k = len(spec.labels)
    by_label: dict[int, list[int]] = {j: [] for j in range(k)}
    for i, x in enumerate(items):
        g = spec.gold(x)
        if g not in by_label:
            raise ValueError(f"{task}: item {i} has label {g}, expected 0..{k - 1}")
        by_label[g].append(i)
    rng = random.Random(seed)
    chosen: list[int] = []
    for j in range(k):
        want = n_items // k + (1 if j < n_items % k else 0)
        pool = by_label[j]
        chosen += rng.sample(pool, min(want, len(pool)))
    return [items[i] for i in sorted(chosen)]


# -------------------------------------------------------------------------------------- label scoring


def _prompt_rows(tokenizer: Any, prompts: Sequence[str], room: int, limit: int | None) -> list[list[int]]:
    """Token ids of each prompt, cut from the left so that ``room`` more tokens fit in ``limit``."""
    rows = []
    for p in prompts:
        ids = list(tokenizer(p, add_special_tokens=True)["input_ids"])
        if limit is not None and len(ids) + room > limit:
            ids = ids[len(ids) + room - limit :]
        rows.append(ids)
    return rows


@torch.no_grad()
def label_logprobs(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    labels: Sequence[str],
    batch_size: int = 8,
    single_token_fast_path: bool = True,
) -> torch.Tensor:
    """Total log-probability ``(n, L)`` (float32, CPU) of each label continuation ``" " + label`` after each
    prompt.

    When every label is one token (and ``single_token_fast_path``), one forward pass per prompt reads all
    labels from the next-token distribution; otherwise each (prompt, label) row is scored under teacher
    forcing. Both give the same numbers. Prompts are cut from the left to fit the model's context.
    """
    from rlsedit.models.arch import context_limit

    device = input_device(model)
    pad = pad_id_of(tokenizer)
    limit = context_limit(model)
    label_ids = [list(tokenizer(" " + lab.strip(), add_special_tokens=False)["input_ids"]) for lab in labels]
    if any(not ids for ids in label_ids):
        raise ValueError(f"a label tokenises to nothing: {labels}")
    out = torch.empty(len(prompts), len(labels))
    if single_token_fast_path and all(len(ids) == 1 for ids in label_ids):
        firsts = torch.tensor([ids[0] for ids in label_ids], device=device)
        rows = _prompt_rows(tokenizer, prompts, 1, limit)
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            ids, mask = pad_rows(chunk, pad)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logits = logits.to(device)  # the LM head may sit on another device
            last = torch.tensor([len(r) - 1 for r in chunk], device=device)
            logp = torch.log_softmax(logits[torch.arange(len(chunk), device=device), last].float(), -1)
            out[s : s + len(chunk)] = logp[:, firsts].cpu()
        return out
    longest = max(len(ids) for ids in label_ids)
    prompt_rows = _prompt_rows(tokenizer, prompts, longest, limit)
    flat: list[tuple[int, int, list[int], int]] = []  # (prompt, label, row ids, prompt length)
    for i, p_ids in enumerate(prompt_rows):
        for j, l_ids in enumerate(label_ids):
            flat.append((i, j, p_ids + l_ids, len(p_ids)))
    for s in range(0, len(flat), batch_size):
        chunk = flat[s : s + batch_size]
        ids, mask = pad_rows([row for _, _, row, _ in chunk], pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logits = logits.to(device)  # the LM head may sit on another device
        for k, (i, j, _, start) in enumerate(chunk):
            t_ids = label_ids[j]
            pos = torch.arange(start - 1, start - 1 + len(t_ids), device=device)
            logp = torch.log_softmax(logits[k, pos].float(), -1)
            out[i, j] = logp[
                torch.arange(len(t_ids), device=device), torch.tensor(t_ids, device=device)
            ].sum()
    return out


def zero_shot_accuracy(
    model: nn.Module, tokenizer: Any, task: str, n_items: int = 100, seed: int = 0, batch_size: int = 8
) -> dict[str, Any]:
    """Zero-shot accuracy of ``task`` on its fixed sample (see the module docstring).

    Returns:
        ``{"task", "accuracy" (%), "ci95": [low, high] (%, Wilson), "chance" (%), "n", "correct",
        "labels", "predicted": {label: count}, "seconds"}``.
    """
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(_TASKS)}")
    t0 = time.perf_counter()
    spec = _TASKS[task]
    items = task_items(task, n_items, seed)
    scores = label_logprobs(model, tokenizer, [spec.prompt(x) for x in items], spec.labels, batch_size)
    pred = scores.argmax(-1).tolist()
    gold = [spec.gold(x) for x in items]
    return {**accuracy_record(task, pred, gold, time.perf_counter() - t0), "backend": "rlsedit"}


def accuracy_record(task: str, pred: Sequence[int], gold: Sequence[int], seconds: float) -> dict[str, Any]:
    """The result of one zero-shot task from its predicted and gold label indices (whoever scored them):
    ``{"task", "accuracy" (%), "ci95": [low, high] (%, Wilson), "chance" (%), "n", "correct", "labels",
    "predicted": {label: count}, "seconds"}``."""
    labels = capability_task(task).labels
    correct = sum(int(p == g) for p, g in zip(pred, gold, strict=True))
    n = len(gold)
    lo, hi = wilson_interval(correct, n)
    return {
        "task": task,
        "accuracy": 100.0 * correct / n if n else None,
        "ci95": [100.0 * lo, 100.0 * hi],
        "chance": 100.0 / len(labels),
        "n": n,
        "correct": correct,
        "labels": list(labels),
        "predicted": {lab: sum(1 for p in pred if p == j) for j, lab in enumerate(labels)},
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------------ perplexity


def _first_tokens(tokenizer: Any, text: str, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` token ids of ``text`` (no special tokens), tokenising only a prefix."""
    chars = max(1024, 8 * n_tokens)
    while True:
        ids = list(tokenizer(text[:chars], add_special_tokens=False)["input_ids"])
        if len(ids) > n_tokens or chars >= len(text):
            return ids[:n_tokens]
        chars *= 2


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str | None = None,
    n_tokens: int = 4096,
    window: int = 512,
    stride: int = 256,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Token-level perplexity of the first ``n_tokens`` tokens of ``text`` (default: the bundled
    WikiText-2 test split) with strided windows (see the module docstring).

    ``window`` is capped by the model's context length (``stride`` with it). Window ``w`` covers tokens
    ``[b_w, b_w + window)`` with ``b_w = w * stride`` and scores the tokens after the previous window's
    end; the first token is never scored.

    Returns:
        ``{"perplexity", "ci95": [low, high], "chance" (vocabulary size), "nll" (mean, nats),
        "tokens" (scored), "windows", "window", "stride", "seconds"}``.
    """
    from rlsedit.models.arch import context_limit

    t0 = time.perf_counter()
    if text is None:
        from rlsedit.datasets import load_wikitext

        text = load_wikitext("test")
    limit = context_limit(model)
    if limit is not None and window > limit:
        stride = max(1, min(stride, limit))
        window = limit
    ids = _first_tokens(tokenizer, text, n_tokens)
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens")
    device = input_device(model)
    # windows: (begin, end, first scored position)
    spans: list[tuple[int, int, int]] = []
    prev_end = 1  # token 0 has no context
    begin = 0
    while prev_end < len(ids):
        end = min(begin + window, len(ids))
        if end > prev_end:
            spans.append((begin, end, prev_end))
            prev_end = end
        begin += stride
    sums: list[float] = []
    counts: list[int] = []
    pad = pad_id_of(tokenizer)
    for s in range(0, len(spans), batch_size):
        chunk = spans[s : s + batch_size]
        x, mask = pad_rows([ids[b:e] for b, e, _ in chunk], pad)
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logits = logits.to(device)  # the LM head may sit on another device
        for k, (b, e, first) in enumerate(chunk):
            pos = torch.arange(first - b - 1, e - b - 1, device=device)  # predicts tokens first..e-1
            tgt = torch.tensor(ids[first:e], device=device)
            logp = torch.log_softmax(logits[k, pos].float(), -1)
            nll = -logp[torch.arange(len(pos), device=device), tgt].double().sum()
            sums.append(float(nll))
            counts.append(e - first)
    total, n = math.fsum(sums), sum(counts)
    mean = total / n
    m = len(sums)
    if m > 1:
        # ratio estimator over windows (clusters): se^2 = m/(m-1) * sum (s_i - mean c_i)^2 / n^2
        dev = math.fsum((si - mean * ci) ** 2 for si, ci in zip(sums, counts, strict=True))
        se = math.sqrt(m / (m - 1) * dev) / n
    else:
        se = 0.0
    vocab = getattr(model.config, "vocab_size", None)
    if hasattr(model.config, "get_text_config"):
        vocab = getattr(model.config.get_text_config(), "vocab_size", vocab)
    return {
        "perplexity": math.exp(mean),
        "ci95": [math.exp(mean - Z95 * se), math.exp(mean + Z95 * se)],
        "chance": vocab,
        "nll": mean,
        "tokens": n,
        "windows": m,
        "window": window,
        "stride": stride,
        "seconds": time.perf_counter() - t0,
    }


def evaluate_capability(
    model: nn.Module, tokenizer: Any, config: CapabilityConfig | dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every measure of ``config`` (default :class:`CapabilityConfig`): ``{"config": ...,
    "perplexity": {...} (if asked), "<task>": {...} per task, "seconds"}``."""
    cfg = config if isinstance(config, CapabilityConfig) else CapabilityConfig(**(config or {}))
    t0 = time.perf_counter()
    out: dict[str, Any] = {"config": cfg.to_dict()}
    if cfg.perplexity:
        out["perplexity"] = perplexity(
            model,
            tokenizer,
            n_tokens=cfg.ppl_tokens,
            window=cfg.ppl_window,
            stride=cfg.ppl_stride,
            batch_size=max(1, cfg.batch_size // 2),
        )
        log.info("WikiText-2 perplexity %.2f", out["perplexity"]["perplexity"])
    if cfg.tasks and cfg.zero_shot_backend() == "lm-eval":
        from rlsedit.eval.lmeval import lm_eval_accuracy

        out.update(lm_eval_accuracy(model, tokenizer, cfg.tasks, cfg.n_items, cfg.seed, cfg.batch_size))
    for task in cfg.tasks:
        if task not in out:
            out[task] = zero_shot_accuracy(model, tokenizer, task, cfg.n_items, cfg.seed, cfg.batch_size)
        r = out[task]
        log.info(
            "%s: %.1f%% [%.1f, %.1f] (chance %.0f%%, n=%d)",
            task,
            r["accuracy"],
            r["ci95"][0],
            r["ci95"][1],
            r["chance"],
            r["n"],
        )
    if cfg.lm_eval:
        from rlsedit.eval.lmeval import lm_eval_tasks

        out["lm_eval"] = lm_eval_tasks(model, tokenizer, cfg.lm_eval, cfg.lm_eval_limit, cfg.batch_size)
    out["seconds"] = time.perf_counter() - t0
    return out
