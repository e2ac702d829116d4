"""Context managers that read, change or stop a forward pass at named modules.

Every hook lives only inside its ``with`` block and is removed on exit, also when the body raises.

Example::

    with trace(model, ["model.layers.3.mlp.down_proj"], capture_input=True, stop=True) as tr:
        model(**batch)                       # stops once the module has run
    keys = tr["model.layers.3.mlp.down_proj"].input    # (batch, seq, d_k)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from rlsedit.models.arch import get_module

__all__ = ["StopForward", "Captured", "trace", "edit_output", "add_at_positions"]


class StopForward(Exception):
    """Raised inside a forward pass to end it early; swallowed by :func:`trace` with ``stop=True``."""


@dataclass
class Captured:
    """What :func:`trace` recorded at one module: its first positional input and its output tensor."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


def _main_tensor(value: object) -> torch.Tensor:
    """The hidden-state tensor of a module's input/output (the first element of a tuple)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot find a tensor in a module value of type {type(value).__name__}")


def _replace_main(value: object, new: torch.Tensor) -> object:
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    raise TypeError(f"cannot replace the tensor in a module value of type {type(value).__name__}")


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The main input of a module call: the first positional argument, else ``hidden_states=``/``input=``,
    else the first tensor keyword argument."""
    if args:
        return _main_tensor(args)
    for key in ("hidden_states", "input", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("cannot find the input tensor of a module call (no positional or tensor keyword arg)")


@contextmanager
def trace(
    model: nn.Module,
    names: Sequence[str],
    *,
    capture_input: bool = False,
    capture_output: bool = True,
    stop: bool = False,
    detach: bool = True,
) -> Iterator[dict[str, Captured]]:
    """Record the input and/or output of the modules ``names`` during forwards run in the block.

    Shapes: for a transformer block or an MLP projection the recorded tensors are ``(batch, seq, d)``
    (``d`` = the module's input or output width, e.g. ``d_k`` for the input of the MLP output projection).
    In transformers 5 decoder blocks, MLPs and linear layers all return a plain tensor; attention modules
    return ``(output, weights)``, whose first element is recorded.

    Args:
        model: the model whose submodules are hooked.
        names: dotted module paths.
        capture_input: record the module's first positional input (e.g. MLP keys, ``(batch, seq, d_k)``).
        capture_output: record the module's output (its first tensor if it returns a tuple).
        stop: end the forward pass (raise :class:`StopForward`, swallowed on exit) as soon as every one of
            ``names`` has run once: later modules do not run and the model call returns nothing, so the
            statements after it inside the ``with`` block are skipped too. Put the model call last.
        detach: detach recorded tensors from the autograd graph.

    Yields:
        ``{name: Captured}``, filled as the forward runs (the latest call wins).
    """
    names = list(dict.fromkeys(names))
    if not names:
        raise ValueError("trace needs at least one module name")
    modules = {name: get_module(model, name) for name in names}
    records = {name: Captured() for name in names}
    seen: set[str] = set()
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            rec = records[name]
            if capture_input:
                x = _first_input(args, kwargs)
                rec.input = x.detach() if detach else x
            if capture_output:
                y = _main_tensor(output)
                rec.output = y.detach() if detach else y
            seen.add(name)
            if stop and len(seen) == len(names):
                raise StopForward()

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
        try:
            yield records
        except StopForward:
            if not stop:
                raise
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_output(model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace module ``name``'s output tensor ``y`` by ``fn(y)`` (same shape) for forwards in the block.

    ``y`` is the module's output, or its first element when the module returns a tuple; for blocks and MLP
    projections it has shape ``(batch, seq, d)``. ``fn`` may be differentiable: gradients flow through it.
    """
    module = get_module(model, name)

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        y = _main_tensor(output)
        new = fn(y)
        if new.shape != y.shape:
            raise ValueError(f"edit_output: fn changed the shape {tuple(y.shape)} -> {tuple(new.shape)}")
        return _replace_main(output, new)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def add_at_positions(
    model: nn.Module,
    name: str,
    vectors: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> Iterator[None]:
    """Add ``vectors[i]`` to module ``name``'s output at ``(rows[i], positions[i])`` (differentiably).

    The output must be ``(batch, seq, d)``; positions index the sequence as the module sees it (with left
    padding, count the pad tokens). Meant for full forwards: a cached generation step with one new token
    raises an :class:`IndexError` for positions beyond it. Repeated ``(row, position)`` pairs add up.

    Args:
        vectors: ``(n, d)`` vectors to add (``d`` = the output's last dimension), or ``(d,)`` for all.
        positions: ``(n,)`` token positions.
        rows: ``(n,)`` batch rows; defaults to ``0..n-1``.
    """
    positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
    n = positions.shape[0]
    if rows is None:
        rows = torch.arange(n)
    rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0).expand(n, -1)
    if vectors.dim() != 2 or vectors.shape[0] != n or rows.shape[0] != n:
        raise ValueError("add_at_positions: vectors, positions and rows must have the same length")
    # bounds once, on the host, not in every forward
    p_lo, p_hi = (int(positions.min()), int(positions.max())) if n else (0, 0)
    r_lo, r_hi = (int(rows.min()), int(rows.max())) if n else (0, 0)

    def fn(y: torch.Tensor) -> torch.Tensor:
        if y.shape[-1] != vectors.shape[-1]:
            raise ValueError(f"vector size {vectors.shape[-1]} != module output size {y.shape[-1]}")
        if n == 0:
            return y
        if y.dim() != 3:
            raise ValueError(f"add_at_positions needs a (batch, seq, d) output, got shape {tuple(y.shape)}")
        if p_hi >= y.shape[1] or p_lo < -y.shape[1]:
            raise IndexError(f"positions {p_lo}..{p_hi} out of range for the output's {y.shape[1]} tokens")
        if r_hi >= y.shape[0] or r_lo < -y.shape[0]:
            raise IndexError(f"rows {r_lo}..{r_hi} out of range for the output's batch of {y.shape[0]}")
        r, p = rows.to(y.device), positions.to(y.device)
        return y.index_put((r, p), vectors.to(device=y.device, dtype=y.dtype), accumulate=True)

    with edit_output(model, name, fn):
        yield
