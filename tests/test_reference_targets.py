"""Targets as MEMIT's reference computes them (``memit/compute_z.py``), written out here directly on a
tiny model and compared with :func:`rlsedit.locate.targets.compute_targets`.

The reference, per request: ``delta`` (zeros) is added to block ``layer``'s output at the subject's last
token of every prompt (the rewriting prompts ``context + prompt + target[:-1]`` and the KL prompt
``"{subject} is a"``); each iteration computes

    nll  = mean over prompts of (sum over target tokens of -log p) / n_target_tokens
    kl   = kl_div(init, cur, log_target=True)      # = sum_v p (log p - log p0) at the KL prompt's subject
    wd   = v_weight_decay * ||delta|| / ||h0||^2
    loss = nll + kl_factor * kl + wd

and stops when ``loss < 5e-2`` or at the last iteration, otherwise steps Adam and projects ``delta`` into
the ball of radius ``clamp_norm_factor * ||h0||``. The target is ``h0 + delta``.
"""

from __future__ import annotations

import pytest
import torch

from rlsedit.locate.targets import TargetConfig, compute_targets
from rlsedit.locate.tokens import encode_text_upto, target_ids
from rlsedit.requests import EditRequest
from tiny_models import tiny_model

LAYER = 1
CONTEXTS = ["", "Hello there. ", "I. "]
REQUEST = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
SETTINGS = {"lr": 0.5, "kl_factor": 0.5, "weight_decay": 0.5, "clamp_norm_factor": 0.75}


def _block_output_hook(position: int, delta: torch.Tensor):
    def hook(module, args, output):
        hs = output[0] if isinstance(output, tuple) else output
        hs = hs.clone()
        hs[0, position] = hs[0, position] + delta.to(hs.dtype)
        return (hs, *output[1:]) if isinstance(output, tuple) else hs

    return hook


def _logits(model, ids: list[int], position: int, delta: torch.Tensor) -> torch.Tensor:
    """``(len(ids), vocab)`` logits of one unpadded prompt with ``delta`` added at block LAYER's output."""
    handle = model.model.layers[LAYER].register_forward_hook(_block_output_hook(position, delta))
    try:
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    finally:
        handle.remove()


def memit_reference_z(
    model, tokenizer, req: EditRequest, steps: int, stop: float, gradient_init: bool = False
) -> tuple[torch.Tensor, int]:
    """The reference loop above for one request: ``(z (d_model,), optimiser steps taken)``.

    ``gradient_init`` (our ``init="gradient"`` option, not MEMIT's): the first step sets
    ``delta = -clamp_norm_factor * ||h0|| * g / ||g||`` with ``g`` the loss's gradient at ``delta = 0``; the
    later steps are the reference's Adam steps (Adam's state starts at the second step)."""
    tgt = target_ids(tokenizer, req.target_new_text)
    prompts = []
    for ctx in CONTEXTS:
        ids, last = encode_text_upto(tokenizer, ctx + req.text, len(ctx) + len(req.prefix) + len(req.subject))
        prompts.append((ids + tgt[:-1], last, len(ids)))
    kl_ids, kl_last = encode_text_upto(tokenizer, f"{req.subject} is a", len(req.subject))
    d = model.config.hidden_size
    delta = torch.zeros(d, requires_grad=True)
    with torch.no_grad():
        hs = {}
        handle = model.model.layers[LAYER].register_forward_hook(
            lambda m, a, o: hs.__setitem__("h", (o[0] if isinstance(o, tuple) else o)[0].detach())
        )
        model(input_ids=torch.tensor([prompts[0][0]]), use_cache=False)
        handle.remove()
        h0 = hs["h"][prompts[0][1]].float()
    opt = torch.optim.Adam([delta], lr=SETTINGS["lr"])
    kl_init = None
    taken = 0
    for it in range(steps + 1):
        opt.zero_grad()
        nll = torch.zeros(())
        for ids, last, n in prompts:
            lp = torch.log_softmax(_logits(model, ids, last, delta), -1)
            pos = torch.arange(n - 1, n - 1 + len(tgt))
            nll = nll - lp[pos, torch.tensor(tgt)].sum() / len(tgt)
        nll = nll / len(prompts)
        kl_lp = torch.log_softmax(_logits(model, kl_ids, kl_last, delta)[kl_last], -1)
        if kl_init is None:
            kl_init = kl_lp.detach().clone()
        kl = torch.nn.functional.kl_div(kl_init, kl_lp, log_target=True, reduction="sum")
        wd = SETTINGS["weight_decay"] * delta.norm() / h0.norm() ** 2
        loss = nll + SETTINGS["kl_factor"] * kl + wd
        if float(loss.detach()) < stop or it == steps:
            break
        loss.backward()
        if gradient_init and it == 0:
            with torch.no_grad():
                g = delta.grad
                delta.copy_(-SETTINGS["clamp_norm_factor"] * h0.norm() * g / g.norm())
                delta.grad = None
        else:
            opt.step()
        taken += 1
        with torch.no_grad():
            limit = SETTINGS["clamp_norm_factor"] * h0.norm()
            if delta.norm() > limit:
                delta.mul_(limit / delta.norm())
    return (h0 + delta).detach(), taken


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    model, tok = tiny_model("llama", seed=0, initializer_range=0.3)
    model.eval()
    return model, tok


@pytest.mark.parametrize("fast", [False, True])
def test_targets_follow_memit_compute_z(model_and_tokenizer, fast: bool) -> None:
    model, tok = model_and_tokenizer
    steps = 6
    ref_z, ref_steps = memit_reference_z(model, tok, REQUEST, steps, stop=0.0)
    assert ref_steps == steps
    cfg = TargetConfig(steps=steps, stop_nll=0.0, fast=fast, **SETTINGS)
    ours = compute_targets(model, tok, [REQUEST], LAYER, CONTEXTS, cfg)
    assert int(ours.steps[0]) == steps
    rel = float((ours.z[0] - ref_z).norm() / ref_z.norm())
    assert rel < 1e-4, rel
    # this project's earlier loss (KL(p0 || p) after "is a", squared decay) is another target
    old = TargetConfig(
        steps=steps, stop_nll=0.0, fast=fast, kl_form="after_prompt", weight_decay_form="squared", **SETTINGS
    )
    other = compute_targets(model, tok, [REQUEST], LAYER, CONTEXTS, old)
    assert float((other.z[0] - ref_z).norm() / ref_z.norm()) > 100 * max(rel, 1e-7)


def test_early_stop_on_the_total_loss(model_and_tokenizer) -> None:
    """The reference stops once NLL + KL + decay < threshold. With the threshold just above the NLL after
    3 steps, the NLL-only rule stops by step 3 while the total-loss rule runs as long as the reference
    loop, to the same target."""
    model, tok = model_and_tokenizer
    steps = 8

    def run(**kw):
        return compute_targets(model, tok, [REQUEST], LAYER, CONTEXTS, TargetConfig(**SETTINGS, **kw))

    threshold = float(run(steps=3, stop_nll=0.0).nll_final[0]) * 1.0001
    by_nll = run(steps=steps, stop_nll=threshold, stop_on="nll")
    by_loss = run(steps=steps, stop_nll=threshold)
    ref_z, ref_steps = memit_reference_z(model, tok, REQUEST, steps, stop=threshold)
    assert int(by_nll.steps[0]) <= 3
    assert int(by_loss.steps[0]) == ref_steps > int(by_nll.steps[0])
    assert float((by_loss.z[0] - ref_z).norm() / ref_z.norm()) < 1e-4


@pytest.mark.parametrize("fast", [False, True])
def test_gradient_init_steps_to_the_clamp_along_the_gradient(model_and_tokenizer, fast: bool) -> None:
    """``init="gradient"``: one step lands on the clamp sphere along the loss's negative gradient at 0
    (checked against the reference loop's own gradient); later steps are the reference's Adam steps."""
    model, tok = model_and_tokenizer
    for steps in (1, 4):
        ref_z, _ = memit_reference_z(model, tok, REQUEST, steps, stop=0.0, gradient_init=True)
        cfg = TargetConfig(steps=steps, stop_nll=0.0, fast=fast, init="gradient", **SETTINGS)
        ours = compute_targets(model, tok, [REQUEST], LAYER, CONTEXTS, cfg)
        assert int(ours.steps[0]) == steps
        assert float((ours.z[0] - ref_z).norm() / ref_z.norm()) < 1e-4
        if steps == 1:
            d = ours.z[0] - ours.h0[0]
            assert abs(float(d.norm() / ours.h0[0].norm()) - SETTINGS["clamp_norm_factor"]) < 1e-5
        # the default first step (Adam from zero) is another target
        zero = compute_targets(
            model,
            tok,
            [REQUEST],
            LAYER,
            CONTEXTS,
            TargetConfig(steps=steps, stop_nll=0.0, fast=fast, **SETTINGS),
        )
        assert float((zero.z[0] - ref_z).norm() / ref_z.norm()) > 1e-3


def test_target_config_rejects_bad_init() -> None:
    with pytest.raises(ValueError, match="init"):
        TargetConfig(init="newton")
    with pytest.raises(ValueError, match="init_scale"):
        TargetConfig(init_scale=0.0)


@pytest.mark.parametrize("fast", [False, True])
def test_n_contexts_uses_the_first_templates_only(model_and_tokenizer, fast: bool) -> None:
    """``n_contexts=k``: the loss runs the bare prompt and the first k generated contexts, exactly as if
    only those were given; -1 runs all of them."""
    model, tok = model_and_tokenizer
    cfg = {"steps": 3, "stop_nll": 0.0, "fast": fast, **SETTINGS}
    fewer = compute_targets(model, tok, [REQUEST], LAYER, CONTEXTS, TargetConfig(n_contexts=1, **cfg))
    given = compute_targets(model, tok, [REQUEST], LAYER, CONTEXTS[:2], TargetConfig(**cfg))
    torch.testing.assert_close(fewer.z, given.z)
    every = compute_targets(model, tok, [REQUEST], LAYER, CONTEXTS, TargetConfig(n_contexts=-1, **cfg))
    assert float((every.z - fewer.z).norm() / every.z.norm()) > 1e-4
    with pytest.raises(ValueError, match="n_contexts"):
        TargetConfig(n_contexts=-2)
