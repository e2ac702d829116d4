"""Conformance suite: every registered editor, on tiny models of several architectures.

Parametrised over :func:`rlsedit.list_editors`, so a newly registered editor gets these tests without
changes here (its tiny-model settings come from ``TINY_SETTINGS``; an editor not listed there gets the
shared settings, on one layer if it refuses two). Each editor on each architecture must:

(a) make the new target clearly likelier than the true one on the edited prompt (the check fails on the
    unedited model, so it fails when the weight write is disabled);
(b) keep the shape, dtype, device and ``requires_grad`` of every parameter;
(c) leave every parameter outside ``editor.edited_modules()`` byte-identical;
(d) change nothing (weights, state, applied batches, the run directory) when a batch fails: an invalid
    request, a failure after the weights were written, an update over the bound;
(e) round-trip through ``save`` / ``load_editor``, and edit the same afterwards as without it;
(f) give identical weights when the same run is repeated with the same seed.

Tiny random models respond weakly to edits, so the settings are strong: initializer_range 0.5, prompts
that end with the subject, single-token targets, the last two layers (of four) edited, bare prompts for
keys and targets (no context templates: their keys would differ from the bare prompt's), no KL or
weight decay on the target, more optimisation steps and a larger clamp. The real-model test at the end
(marked ``real_model``) checks efficacy on SmolLM2-135M with the shipped defaults.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import tiny_models
from rlsedit import EditRequest, RequestError, list_editors, load_editor, make_editor
from rlsedit.editors.base import EditError, build_config, editor_class
from rlsedit.eval.scoring import target_nll
from rlsedit.models.arch import mlp_out_name, num_layers
from rlsedit.stats import second_moments

ARCHS = ["llama", "gpt2", "gpt_neox", "phi", "qwen2"]
EDITORS = list_editors()

#: Settings shared by every editor on the tiny models (target optimisation and the edited layers).
TINY_COMMON: dict[str, Any] = {"layers": [2, 3], **tiny_models.STRONG_TARGETS}
#: Per-editor settings on the tiny models (over TINY_COMMON). The anchors are weak: the tiny models'
#: statistics come from a few texts, and the edits must be strong enough to measure.
TINY_SETTINGS: dict[str, dict[str, Any]] = {
    "rlsedit": {"lam": 1.0, "mu": 1.0},
    "memit": {"mu": 1.0},
    # a tiny random Sigma has any scale: the null space relative to its largest eigenvalue
    "alphaedit": {"alpha": 1.0, "nullspace_threshold": 0.5, "nullspace_rule": "relative"},
    "evoedit": {"alpha": 1.0, "nullspace_threshold": 0.5, "nullspace_rule": "relative"},
    "rome": {"layers": [3], "lam": 1.0, "mu": 1.0},
    # UltraEdit's own step (no target optimisation), strong enough to measure on a tiny model; its
    # normaliser primed with tune requests (two single-token edits alone leave it little but signs)
    "ultraedit": {"layers": [3], "lr": 0.1, "warmup": 64},
    # FT's own lr and steps (FT has no target optimisation)
    "ft": {"layers": [3], "lr": 0.05, "steps": 30, "norm_constraint": 0.5},
}
#: Fewer optimisation steps where efficacy is not checked.
FAST: dict[str, Any] = {"steps": 5}
#: Context templates for the runs that check determinism and saving (their sampling must repeat too).
WITH_TEMPLATES: dict[str, Any] = {**FAST, "n_templates": 2, "template_length": 4}
#: (a): after the edit, NLL(true) - NLL(new) must exceed this (nats, mean per token) on each request.
MARGIN = 1.0
INIT_RANGE = 0.5

#: (prompt ending with the subject, subject, two single-token targets of the tiny tokenizer).
FACTS = [
    ("The mother tongue of {}", "Danielle Darrieux", "language", "city"),
    ("The twin city of {}", "Lyon", "located", "which"),
    ("Toko Yasuda plays the {}", "piano", "and", "for"),
]


def settings(name: str, **extra: Any) -> dict[str, Any]:
    """The overrides for editor ``name`` on a tiny model (a new editor that refuses two layers gets one)."""
    out = {**TINY_COMMON, **TINY_SETTINGS.get(name, {}), **extra}
    if name not in TINY_SETTINGS:
        try:
            build_config(editor_class(name).config_class, {}, out)
        except ValueError:
            out["layers"] = [3]
    return out


def tiny(arch: str, seed: int = 0) -> tuple[nn.Module, Any]:
    return tiny_models.tiny_model(arch, seed=seed, initializer_range=INIT_RANGE)


@functools.cache
def _tiny_sigmas(arch: str) -> dict[int, torch.Tensor]:
    model, tokenizer = tiny(arch)
    layers = list(range(num_layers(model)))
    names = [mlp_out_name(model, layer) for layer in layers]
    s = second_moments(model, tokenizer, names, samples=16, max_len=32, use_cache=False, progress=False)
    return {layer: s[name] for layer, name in zip(layers, names, strict=True)}


def tiny_sigmas(arch: str) -> dict[int, torch.Tensor]:
    """``{layer: Sigma (d_k, d_k)}`` of every layer of ``tiny(arch)`` from a few corpus texts (computed
    once per architecture, never cached on disk)."""
    return {layer: s.clone() for layer, s in _tiny_sigmas(arch).items()}


def nlls(model: nn.Module, tokenizer: Any, reqs: list[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(NLL(target_new), NLL(target_true))``, each ``(u,)``, on the edited prompts."""
    texts = [r.text for r in reqs]
    new = target_nll(model, tokenizer, texts, [r.target_new for r in reqs])
    true = target_nll(model, tokenizer, texts, [r.target_true or "" for r in reqs])
    return new, true


def requests_for(
    model: nn.Module, tokenizer: Any, facts: list[tuple[str, str, str, str]]
) -> list[EditRequest]:
    """One request per fact; the target the model finds less likely becomes ``target_new``."""
    out = []
    for prompt, subject, a, b in facts:
        text = prompt.replace("{}", subject)
        na, nb = target_nll(model, tokenizer, [text, text], [a, b]).tolist()
        new, true = (a, b) if na >= nb else (b, a)
        out.append(EditRequest(prompt, subject, new, true))
    return out


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = dict(model.named_parameters())
    assert set(got) == set(expected)
    changed = [n for n, p in got.items() if not torch.equal(p.detach(), expected[n])]
    assert not changed, f"parameters changed: {changed}"


def assert_states_equal(a: dict[int, dict[str, torch.Tensor]], b: dict[int, dict[str, torch.Tensor]]) -> None:
    assert set(a) == set(b)
    for layer in a:
        assert set(a[layer]) == set(b[layer]), layer
        for key in a[layer]:
            assert torch.equal(a[layer][key], b[layer][key]), (layer, key)


def build(name: str, arch: str, **extra: Any) -> tuple[Any, list[EditRequest]]:
    """A fresh tiny model, its editor ``name`` and the requests (all facts) for it."""
    model, tok = tiny(arch)
    editor = make_editor(name, model, tok, sigmas=tiny_sigmas(arch), **settings(name, **extra))
    return editor, requests_for(model, tok, FACTS)


@dataclass
class Run:
    """One editor on one tiny model, before and after editing the first two facts in one batch."""

    name: str
    arch: str
    editor: Any
    reqs: list[EditRequest]
    before: dict[str, torch.Tensor]
    meta_before: dict[str, tuple]
    nll_before: tuple[torch.Tensor, torch.Tensor]
    nll_after: tuple[torch.Tensor, torch.Tensor]


def _meta(model: nn.Module) -> dict[str, tuple]:
    return {n: (tuple(p.shape), p.dtype, p.device, p.requires_grad) for n, p in model.named_parameters()}


@pytest.fixture(
    scope="module", params=[(e, a) for e in EDITORS for a in ARCHS], ids=lambda p: f"{p[0]}-{p[1]}"
)
def run(request: pytest.FixtureRequest) -> Run:
    name, arch = request.param
    editor, reqs = build(name, arch)
    model, tok = editor.model, editor.tokenizer
    edited = reqs[:2]
    before, meta = params(model), _meta(model)
    nll_before = nlls(model, tok, edited)
    editor.edit(edited)
    return Run(name, arch, editor, reqs, before, meta, nll_before, nlls(model, tok, edited))


# ----------------------------------------------------------------------------------------------------------
# (a) - (c): one edit


def test_edit_makes_new_target_likelier(run: Run) -> None:
    (new0, true0), (new1, true1) = run.nll_before, run.nll_after
    # the check must fail on the unedited model: the new target starts out no likelier than the true one
    assert bool((true0 - new0 <= 0).all()), (new0, true0)
    margin = true1 - new1
    assert bool((margin > MARGIN).all()), (
        f"NLL(true) - NLL(new) = {margin.tolist()} (before: {new0}, {true0})"
    )
    assert bool((new1 < new0).all())


def test_edit_keeps_parameter_shapes_dtypes_devices(run: Run) -> None:
    assert _meta(run.editor.model) == run.meta_before


def test_edit_changes_only_edited_modules(run: Run) -> None:
    edited = run.editor.edited_modules()
    assert edited, "an editor must name the modules it changes"
    changed = set()
    for n, p in run.editor.model.named_parameters():
        inside = any(n.startswith(m + ".") for m in edited)
        if not inside:
            assert torch.equal(p.detach(), run.before[n]), f"{n} is outside {edited} but changed"
        elif not torch.equal(p.detach(), run.before[n]):
            changed.add(n)
    assert changed, "the edit changed no weight"


# ----------------------------------------------------------------------------------------------------------
# (d): failed batches change nothing


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", EDITORS)
def test_invalid_request_changes_nothing(name: str, arch: str) -> None:
    editor, reqs = build(name, arch, **FAST)
    before, state = params(editor.model), {k: dict(v) for k, v in editor.layer_state.items()}
    bad = {"prompt": "The twin city of {}", "subject": "Lyon", "target_new": "   "}
    with pytest.raises(RequestError, match="target_new"):
        editor.edit([reqs[0], bad])
    assert_params_equal(editor.model, before)
    assert_states_equal(editor.layer_state, state)
    assert editor.batches == []


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", EDITORS)
def test_failure_after_writing_rolls_back(name: str, arch: str, tmp_path, monkeypatch) -> None:
    """A batch that fails after its weights and state were written (here: in ``after_batch``) is undone,
    also in the attached run directory."""
    editor, reqs = build(name, arch, **FAST)
    editor.edit(reqs[:1])
    editor.attach(tmp_path / "run")
    before, state = params(editor.model), {k: dict(v) for k, v in editor.layer_state.items()}
    batches = [dict(b) for b in editor.batches]

    def boom() -> None:
        assert not all(torch.equal(p.detach(), before[n]) for n, p in editor.model.named_parameters())
        raise RuntimeError("injected failure")

    monkeypatch.setattr(editor, "after_batch", boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        editor.edit(reqs[1:])
    assert_params_equal(editor.model, before)
    assert_states_equal(editor.layer_state, state)
    assert editor.batches == batches
    fresh, tok = tiny(arch)
    loaded = load_editor(tmp_path / "run", fresh, tok)
    assert len(loaded.batches) == 1
    assert_params_equal(fresh, before)


@pytest.mark.parametrize("name", EDITORS)
def test_update_over_the_bound_changes_nothing(name: str) -> None:
    editor, reqs = build(name, "llama", max_delta_ratio=1e-6, **FAST)
    before = params(editor.model)
    with pytest.raises(EditError, match="max_delta_ratio"):
        editor.edit(reqs[:2])
    assert_params_equal(editor.model, before)
    assert editor.batches == []


# ----------------------------------------------------------------------------------------------------------
# (e), (f): determinism and save / load


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", EDITORS)
def test_repeat_and_save_load_roundtrip(name: str, arch: str, tmp_path) -> None:
    # (f) the same run twice
    a, reqs = build(name, arch, **WITH_TEMPLATES)
    b, _ = build(name, arch, **WITH_TEMPLATES)
    assert a.templates == b.templates
    a.edit(reqs[:2])
    b.edit(reqs[:2])
    edited = params(a.model)
    assert_params_equal(b.model, edited)
    assert_states_equal(a.layer_state, b.layer_state)
    # (e) save, then load into a fresh copy of the base model
    a.save(tmp_path / "run")
    fresh, tok = tiny(arch)
    c = load_editor(tmp_path / "run", fresh, tok)
    assert c.name == name and c.templates == a.templates and c.batches == a.batches
    assert_params_equal(fresh, edited)
    assert_states_equal(c.layer_state, a.layer_state)
    # a further edit behaves the same with and without the save / load
    b.edit(reqs[2:])
    c.edit(reqs[2:])
    assert_params_equal(fresh, params(b.model))
    assert_states_equal(c.layer_state, b.layer_state)
    assert [x["hash"] for x in c.batches] == [x["hash"] for x in b.batches]


# ----------------------------------------------------------------------------------------------------------
# The real model


#: Speed only: one context template instead of the default five (target optimisation on the CPU is the
#: bulk of the real-model test's time). Everything else is the shipped SmolLM2-135M default.
REAL_OVERRIDES: dict[str, Any] = {"n_templates": 1}


@pytest.fixture(scope="module")
def smollm() -> tuple[nn.Module, Any]:
    import rlsedit

    return rlsedit.load_model("smollm2-135m")


@pytest.mark.real_model
@pytest.mark.parametrize("name", EDITORS)
def test_real_model_efficacy(name: str, smollm: tuple[nn.Module, Any]) -> None:
    """Each editor with the shipped SmolLM2-135M defaults: the new target becomes likelier than the true
    one on both edited CounterFact prompts. Statistics: the default 1000 texts, cached on disk after the
    first run. The model is shared by the editors and restored after each."""
    from rlsedit.datasets import load_counterfact

    model, tok = smollm
    reqs = [case.request for case in load_counterfact(split="test", limit=2)]
    editor = make_editor(name, model, tok, **REAL_OVERRIDES)
    inside = tuple(m + "." for m in editor.edited_modules())
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(inside)}
    try:
        new0, true0 = nlls(model, tok, reqs)
        editor.edit(reqs)
        new1, true1 = nlls(model, tok, reqs)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    logging.getLogger(__name__).info(
        "%s: NLL(new) %s -> %s, NLL(true) %s -> %s",
        name,
        new0.tolist(),
        new1.tolist(),
        true0.tolist(),
        true1.tolist(),
    )
    assert bool((new1 < true1).all()), f"{name}: NLL(new) {new1.tolist()} vs NLL(true) {true1.tolist()}"
    assert bool((new1 < new0).all())
