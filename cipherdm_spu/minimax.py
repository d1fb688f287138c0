"""Weighted minimax fits over a basis by linear programming: the fits behind our kernels' coefficients
(scripts/fit_kernels.py) and the accuracy side of their cost floors (scripts/primitive_costs.py). scipy comes with
jax, which requires it."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog


def minimax(a: np.ndarray, target: np.ndarray, basis: np.ndarray, weight=None, cap=None, capped=None):
    """Coefficients c minimising max |w (basis @ c - target)|, and that max; with `cap`, subject to
    |basis @ c - target| <= cap everywhere, or on the rows ``capped = (basis, target)`` where given
    (RuntimeError if no polynomial of the basis meets it)."""
    w = np.ones_like(target) if weight is None else weight
    n = basis.shape[1]
    wb = basis * w[:, None]
    A = np.block([[wb, -np.ones((len(a), 1))], [-wb, -np.ones((len(a), 1))]])
    b = np.concatenate([w * target, -w * target])
    if cap is not None:
        cap_basis, cap_target = (basis, target) if capped is None else capped
        zero = np.zeros((len(cap_target), 1))
        A = np.vstack([A, np.block([[cap_basis, zero], [-cap_basis, zero]])])
        b = np.concatenate([b, cap_target + cap, cap - cap_target])
    res = linprog(np.r_[np.zeros(n), 1.0], A_ub=A, b_ub=b, bounds=[(None, None)] * n + [(0, None)], method="highs")
    if not res.success:
        raise RuntimeError(res.message)
    return res.x[:n], res.x[n]
