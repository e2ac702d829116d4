"""The terms of RLSEdit's objective per edited layer (the paper's Figure 2).

For an edited layer with current weight ``W`` (``(d_k, d_v)``), base weight ``W_0``, key second moment
``Sigma`` and the active recorded batches ``(K_s (d_k, u_s), V_s (u_s, d_v))``:

- ``fit_batch``:      ``||K_t^T W - V_t||_F^2`` for the last applied batch ``t`` (its active requests);
- ``fit_total``:      ``sum_s ||K_s^T W - V_s||_F^2`` over every active request;
- ``dist_w0``:        ``||W - W_0||_F^2``;
- ``anchor``:         ``tr((W - W_0)^T Sigma (W - W_0))`` (Sigma symmetrised, unweighted);
- ``objective``:      ``J = fit_total + lam^2 dist_w0 + mu_t^2 anchor``, what RLSEdit minimises;
- ``n_keys``:         the number of active requests (key columns) in ``fit_total``.

``fit_total`` comes from running sums, ``tr(W^T P W) - 2 tr(W^T B) + vv`` with ``P = sum K K^T = A_t - A_0``,
``B = sum K V`` and ``vv = sum ||V||^2`` kept in the editor's state, so its cost does not grow with the
number of batches (``source``: "running sums"). :func:`objective_terms_from_records` computes every
term directly from the records (the reference the tests compare with).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from rlsedit.linalg import anchor_matrix

if TYPE_CHECKING:  # the editor imports this module when asked for its terms
    from rlsedit.editors.rlsedit import RLSEditor

__all__ = ["objective_terms", "objective_terms_from_records"]


def _active(batch: dict[str, Any]) -> list[int]:
    return [j for j, a in enumerate(batch["active"]) if a]


def _common(editor: RLSEditor, layer: int, W: torch.Tensor) -> dict[str, float]:
    """``dist_w0``, ``anchor`` and ``fit_batch`` for ``layer`` (``W (d_k, d_v)`` float64)."""
    dev = W.device
    D = W - editor.W0[layer].to(device=dev, dtype=torch.float64)
    S = editor.sigmas[layer].to(device=dev, dtype=torch.float64)
    S = 0.5 * (S + S.T)
    out = {"dist_w0": float((D * D).sum()), "anchor": float((D * (S @ D)).sum())}
    fit_batch = 0.0
    if editor.batches:
        last = editor.batches[-1]
        cols = _active(last)
        if cols:
            rec = editor.load_record(last, layer)
            K = rec["K"][:, cols].to(device=dev, dtype=torch.float64)
            V = rec["V"][cols].to(device=dev, dtype=torch.float64)
            fit_batch = float(((K.T @ W - V) ** 2).sum())
    out["fit_batch"] = fit_batch
    return out


def _finish(
    editor: RLSEditor, layer: int, terms: dict[str, float], fit_total: float, n_keys: int, source: str
) -> dict:
    cfg = editor.config
    terms = dict(terms)
    terms["fit_total"] = fit_total
    mu2 = editor.anchor_mu2(layer)  # mu_t^2: mu^2 unless a growing anchor raised it
    terms["objective"] = fit_total + cfg.lam**2 * terms["dist_w0"] + mu2 * terms["anchor"]
    terms["n_keys"] = n_keys
    terms["source"] = source
    return terms


def _weight(editor: RLSEditor, layer: int, device: torch.device) -> torch.Tensor:
    return editor._weights()[layer].detach().to(device=device, dtype=torch.float64)


@torch.no_grad()
def objective_terms_from_records(editor: RLSEditor) -> dict[int, dict[str, Any]]:
    """Every term per edited layer computed directly from the recorded ``K_s``, ``V_s`` (reads every
    batch's records: cost grows with the number of batches). See the module docstring."""
    out = {}
    for layer in editor.config.layers:
        dev = editor.layer_state[layer]["A"].device
        W = _weight(editor, layer, dev)
        fit_total, n = 0.0, 0
        for b in editor.batches:
            cols = _active(b)
            if not cols:
                continue
            rec = editor.load_record(b, layer)
            K = rec["K"][:, cols].to(device=dev, dtype=torch.float64)
            V = rec["V"][cols].to(device=dev, dtype=torch.float64)
            fit_total += float(((K.T @ W - V) ** 2).sum())
            n += len(cols)
        out[layer] = _finish(editor, layer, _common(editor, layer, W), fit_total, n, "records")
    return out


@torch.no_grad()
def objective_terms(editor: RLSEditor) -> dict[int, dict[str, Any]]:
    """The objective's terms per edited layer after the last applied batch (see the module docstring),
    from the editor's running sums.

    Returns:
        ``{layer: {"fit_batch", "fit_total", "dist_w0", "anchor", "objective", "n_keys", "source"}}``.
    """
    from rlsedit.editors.rlsedit import RLSEditor

    if not isinstance(editor, RLSEditor):
        raise TypeError(f"objective terms are defined for the rlsedit editor, not {type(editor).__name__}")
    cfg = editor.config
    n_keys = sum(len(_active(b)) for b in editor.batches)
    out = {}
    for layer in cfg.layers:
        st = editor.layer_state[layer]
        dev = st["A"].device
        W = _weight(editor, layer, dev)
        P = st["A"] - anchor_matrix(
            editor.sigmas[layer].to(dev), cfg.lam, math.sqrt(editor.anchor_mu2(layer))
        )
        fit_total = float((W * (P @ W)).sum() - 2.0 * (W * st["B"]).sum() + st["vv"])
        out[layer] = _finish(editor, layer, _common(editor, layer, W), fit_total, n_keys, "running sums")
    return out
