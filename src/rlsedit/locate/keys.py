"""Keys and hidden states at the subject's last token.

``compute_keys`` returns the input of an MLP output projection (the edited matrix's keys) at each
request's subject's last token, averaged over context templates. ``compute_hidden`` returns a module's
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

__all__ = ["compute_keys", "compute_hidden", "read_at_subject"]


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
) -> torch.Tensor:
    """Keys of the edited projection ``module_name``: its input at the subject's last token, averaged
    over ``contexts``.

    Returns:
        ``K`` of shape ``(d_k, u)``: one column per request (float32).
    """
    vals = read_at_subject(
        model, tokenizer, requests, module_name, contexts, read_input=True, chunk_size=chunk_size
    )
    return vals.mean(1).T.contiguous()


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
