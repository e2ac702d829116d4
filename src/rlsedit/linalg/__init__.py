"""Pure tensor linear algebra for closed-form knowledge editing.

Notation (one edited layer, see ``ARCHITECTURE.md``):

* ``W``  -- ``(d_k, d_v)``: a key row ``k^T`` maps to the value ``k^T W``.
* ``K``  -- ``(d_k, u)``: the keys of one edit batch, one column per fact.
* ``V``  -- ``(u, d_v)``: the *target* values of the batch (not the innovation).
* ``Sigma`` -- ``(d_k, d_k)``: uncentred second moment of the layer's keys, ``K_0 K_0^T := Sigma``.

RLSEdit minimises, after ``t`` batches,

    J_t(W) = sum_s ||K_s^T W - V_s||_F^2 + lam^2 ||W - W_0||_F^2 + mu^2 ||K_0^T (W - W_0)||_F^2

whose minimiser is ``W_t = A_t^{-1} ((lam^2 I + mu^2 Sigma) W_0 + sum_s K_s V_s)`` with
``A_t = lam^2 I + mu^2 Sigma + sum_s K_s K_s^T``. The recursion carries ``C_t = A_t^{-1}`` and updates
it (:func:`rls_step`) or downdates it (:func:`rls_retract`) at a cost of ``O(d_k^2 u)`` per batch.

The MEMIT, AlphaEdit and ROME solves are written in the same notation.

Every function here is pure: inputs are never modified, results are new tensors on the inputs'
device. Nothing here knows about models. The recursion is in :mod:`rlsedit.linalg.rls`, the baselines'
solves in :mod:`rlsedit.linalg.solves`, argument checks in :mod:`rlsedit.linalg.checks`.
"""

from rlsedit.linalg.rls import (
    RetractionError,
    anchor_matrix,
    drift,
    drift_estimate,
    initial_inverse,
    reinvert,
    rls_retract,
    rls_step,
)
from rlsedit.linalg.solves import alphaedit_delta, memit_delta, nullspace_projector, rome_rank_one, solve_spd

__all__ = [
    "RetractionError",
    "anchor_matrix",
    "alphaedit_delta",
    "drift",
    "drift_estimate",
    "initial_inverse",
    "memit_delta",
    "nullspace_projector",
    "reinvert",
    "rls_retract",
    "rls_step",
    "rome_rank_one",
    "solve_spd",
]
