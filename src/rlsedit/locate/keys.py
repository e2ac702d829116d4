"""Keys and hidden states at the subject's last token.

``compute_keys`` returns the input of an MLP output projection (the edited matrix's keys) at each
request's subject's last token, averaged over context templates: by default as MEMIT, AlphaEdit and the
RLSEdit release do (``compute_ks``: the mean per context *type*), 1/2 the bare prompt's key and 1/2 the
mean of the generated contexts' keys (``key_weights``). ``compute_hidden`` returns a module's
output (e.g. a block's hidden state) at the subject's last token of the bare prompts. Both run the
forward only up to the module they read (the rest of the model is skipped).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from rlsedit.hooks import trace
from rlsedit.locate.tokens import encode_prompts
from rlsedit.models.arch import input_device
from rlsedit.requests import EditRequest

__all__ = [
    "KEY_WEIGHTINGS",
    "LowerBlocks",
    "compute_keys",
    "compute_hidden",
    "key_weights",
    "read_at_subject",
]

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


class LowerBlocks:
    """The output of the blocks below the first edited one, kept for one batch.

    Those blocks are not edited, so within a batch their output for a given row does not change: it is
    computed once per chunk of rows (by the first read) and each later read of that chunk (keys of a higher
    layer after the lower ones were edited, hidden states) runs only the blocks from ``first`` on, the lower
    ones replaced by stubs returning the kept output. The first read of each layout also runs in full and
    checks the stubbed forward against it on its first chunk (any architecture whose blocks do not chain
    plainly falls back to full forwards).

    Args:
        first: index of the first edited block (``0``: nothing to keep).
    """

    def __init__(self, model: nn.Module, first: int) -> None:
        from rlsedit.models.arch import get_arch, get_module

        blocks = get_module(model, get_arch(model).blocks)
        self.blocks = blocks if isinstance(blocks, nn.ModuleList) and first > 0 else None
        self.first = first
        self.name = f"{get_arch(model).blocks}.{first - 1}" if first > 0 else ""
        self.kept: dict[tuple, torch.Tensor] = {}
        self.checked: bool | None = None  # None: not yet; False: the stubs failed the check

    def usable(self) -> bool:
        return self.blocks is not None and self.checked is not False

    @contextmanager
    def stubbed(self, key: tuple) -> Iterator[None]:
        """Blocks ``0 .. first - 1`` replaced by stubs giving the kept output of chunk ``key``."""
        from rlsedit.locate.forward import _blocks_replaced, _SkippedBlock

        assert self.blocks is not None
        stubs: list[nn.Module] = [_SkippedBlock(self.blocks[j]) for j in range(self.first - 1)]
        stubs.append(_SkippedBlock(self.blocks[self.first - 1], self.kept[key]))
        with _blocks_replaced(self.blocks, stubs):
            yield


def _read_chunk(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    idx: torch.Tensor,
    module_name: str,
    read_input: bool,
    *,
    lower: LowerBlocks | None,
    key: tuple,
    stub: bool,
) -> torch.Tensor:
    """One chunk's forward (``ids``, ``mask``: ``(n, T)``), read at positions ``idx`` (``(n,)``); with
    ``stub`` the lower blocks give their kept output, else their output is kept when ``lower`` asks for it.
    Returns ``(n, d)`` float32."""
    names = [module_name]
    keep = lower is not None and lower.usable() and not stub and key not in lower.kept
    if keep:
        names = [lower.name, module_name]
    with ExitStack() as stack:
        if stub:
            assert lower is not None
            stack.enter_context(lower.stubbed(key))
        # outputs are kept only where they are read: the module's, or the lower blocks' being kept
        capture_output = keep or not read_input
        tr = stack.enter_context(
            trace(model, names, capture_input=read_input, capture_output=capture_output, stop=True)
        )
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    if keep:
        lower.kept[key] = tr[lower.name].output.detach()
    rec = tr[module_name]
    x = rec.input if read_input else rec.output
    assert x is not None
    return x[torch.arange(x.shape[0], device=x.device), idx.to(x.device)].float()


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
    lower: LowerBlocks | None = None,
) -> torch.Tensor:
    """Read module ``module_name``'s input (or output) at the subject's last token of each row.

    ``lower``: the unedited lower blocks' output kept for this batch (:class:`LowerBlocks`); the module
    read must sit at or above its first edited block.

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
        key = (tuple(contexts), start, chunk_size)

        read = (ids, mask, idx, module_name, read_input)
        if lower is not None and lower.usable() and key in lower.kept:
            val = _read_chunk(model, *read, lower=lower, key=key, stub=True)
        else:
            val = _read_chunk(model, *read, lower=lower, key=key, stub=False)
            if lower is not None and lower.usable() and lower.checked is None and key in lower.kept:
                try:  # the first kept chunk: the stubbed forward must give what the full one gave
                    got = _read_chunk(model, *read, lower=lower, key=key, stub=True)
                    lower.checked = bool(torch.allclose(got, val, rtol=1e-4, atol=1e-5))
                except Exception:  # noqa: BLE001 -- any failure of the stubs means full forwards
                    lower.checked = False
                if not lower.checked:
                    lower.kept.clear()
        out.append(val)
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
    lower: LowerBlocks | None = None,
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
        model, tokenizer, requests, module_name, contexts, read_input=True, chunk_size=chunk_size, lower=lower
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
    lower: LowerBlocks | None = None,
) -> torch.Tensor:
    """Output of ``module_name`` (e.g. a block's hidden state) at the subject's last token of the bare
    prompts.

    Returns:
        ``(u, d_model)`` float32.
    """
    vals = read_at_subject(
        model, tokenizer, requests, module_name, ("",), read_input=False, chunk_size=chunk_size, lower=lower
    )
    return vals[:, 0]
