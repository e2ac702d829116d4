"""Keys and hidden states at the subject's last token.

``compute_keys`` returns the input of an MLP output projection (the edited matrix's keys) at each
request's subject's last token, averaged over context templates: by default as MEMIT, AlphaEdit and the
RLSEdit release do (``compute_ks``: the mean per context *type*), 1/2 the bare prompt's key and 1/2 the
mean of the generated contexts' keys (``key_weights``). ``compute_hidden`` returns a module's
output (e.g. a block's hidden state) at the subject's last token of the bare prompts. Both run the
forward only up to the module they read (the rest of the model is skipped).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rlsedit.hooks import trace
from rlsedit.locate.tokens import encode_prompts
from rlsedit.models.arch import input_device
from rlsedit.requests import EditRequest

__all__ = ["KEY_WEIGHTINGS", "compute_keys", "compute_hidden", "key_weights", "read_at_subject"]

#: How keys are averaged over the context templates: "reference" (1/2 the bare prompt, 1/2 the mean of the
#: generated contexts: MEMIT / AlphaEdit / RLSEdit's ``compute_ks``) or "uniform" (every template alike).
KEY_WEIGHTINGS = ("reference", "uniform")


def key_weights(n_contexts: int, weighting: str = "reference") -> torch.Tensor:
    """Weights ``(n_contexts,)`` (summing to 1) of the context templates in a key average.

    The first template is the bare prompt (``""``). "reference": 1/2 for it and ``1/(2 (n - 1))`` for each
    generated one (a lone bare prompt weighs 1); "uniform": ``1/n`` each.
    """
    if weighting not in KEY_WEIGHTINGS:
        raise ValueError(f"key weighting must be one of {KEY_WEIGHTINGS}, got {weighting!r}")
    if n_contexts < 1:
        raise ValueError(f"at least one context template is needed, got {n_contexts}")
    if weighting == "uniform" or n_contexts == 1:
        return torch.full((n_contexts,), 1.0 / n_contexts)
    w = torch.full((n_contexts,), 0.5 / (n_contexts - 1))
    w[0] = 0.5
    return w


@torch.no_grad()
def read_at_subject(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    module_name: str,
    contexts: Sequence[str] = ("",),
    *,
    read_input: bool,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Read module ``module_name``'s input (or output) at the subject's last token of each row.

    Returns:
        ``(len(requests), len(contexts), d)`` float32 tensor on the device of the module read (with a model
        spread over several devices, that module's, not the input's).
    """
    device = input_device(model)
    batch = encode_prompts(tokenizer, requests, contexts)
    n = batch.input_ids.shape[0]
    out: list[torch.Tensor] = []
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        ids = batch.input_ids[sl].to(device)
        mask = batch.attention_mask[sl].to(device)
        idx = batch.subject_last[sl].to(device)
        # The forward is causal: tokens after the last subject token cannot change what is read there, so
        # the chunk is cut after the latest subject's last token (this also trims the right padding).
        width = int(idx.max()) + 1
        ids, mask = ids[:, :width], mask[:, :width]
        with trace(
            model, [module_name], capture_input=read_input, capture_output=not read_input, stop=True
        ) as tr:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        rec = tr[module_name]
        x = rec.input if read_input else rec.output
        assert x is not None
        out.append(x[torch.arange(x.shape[0], device=x.device), idx.to(x.device)].float())
    vals = torch.cat(out, 0)
    return vals.view(len(requests), len(contexts), -1)


def compute_keys(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    module_name: str,
    contexts: Sequence[str] = ("",),
    chunk_size: int = 64,
    weighting: str = "reference",
    with_prompt: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Keys of the edited projection ``module_name``: its input at the subject's last token, averaged
    over ``contexts`` with :func:`key_weights` (``contexts[0]`` must be the bare prompt ``""`` when there
    are several and ``weighting`` is "reference").

    Returns:
        ``K`` of shape ``(d_k, u)``: one column per request (float32); with ``with_prompt``, also the
        bare prompt's keys ``(d_k, u)`` (ROME's residual and denominator use them).
    """
    if weighting == "reference" and len(contexts) > 1 and contexts[0] != "":
        raise ValueError('the reference key weighting needs contexts[0] == "" (the bare prompt)')
    vals = read_at_subject(
        model, tokenizer, requests, module_name, contexts, read_input=True, chunk_size=chunk_size
    )
    w = key_weights(len(contexts), weighting).to(device=vals.device, dtype=vals.dtype)
    K = torch.einsum("ucd,c->du", vals, w).contiguous()
    if with_prompt:
        return K, vals[:, 0].T.contiguous()
    return K


def compute_hidden(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    module_name: str,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Output of ``module_name`` (e.g. a block's hidden state) at the subject's last token of the bare
    prompts.

    Returns:
        ``(u, d_model)`` float32.
    """
    vals = read_at_subject(
        model, tokenizer, requests, module_name, ("",), read_input=False, chunk_size=chunk_size
    )
    return vals[:, 0]
