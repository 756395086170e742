"""The one linear solve behind CFR and fusion: a symmetric positive definite system in float64.

``solve_right(R, A)`` returns M = R A^{-1} for symmetric A via a Cholesky factorisation, with a
clear error when A is singular or too ill-conditioned to trust. One factorisation per input width
serves every K/V weight that reads that width.
"""
from __future__ import annotations

import torch

MAX_CONDITION = 1e12


class IllConditionedError(ValueError):
    pass


def condition_number(A: torch.Tensor) -> float:
    eig = torch.linalg.eigvalsh(A.to(torch.float64))
    lo, hi = float(eig[0]), float(eig[-1])
    return float("inf") if lo <= 0 else hi / lo


def solve_right(R: torch.Tensor, A: torch.Tensor, hint: str) -> tuple[torch.Tensor, float]:
    """M with M A = R (A symmetric positive definite), computed in float64.

    Returns (M, condition number of A). ``hint`` is appended to errors: it should name the
    settings that make A better conditioned (e.g. a larger lambda or more preserve prompts).
    """
    A64, R64 = A.to(torch.float64), R.to(torch.float64)
    A64 = 0.5 * (A64 + A64.T)
    cond = condition_number(A64)
    if not cond < MAX_CONDITION:
        raise IllConditionedError(
            f"closed-form solve is ill-conditioned (condition number {cond:.3g} >= {MAX_CONDITION:.0e}); {hint}"
        )
    L, info = torch.linalg.cholesky_ex(A64)
    if int(info) != 0:
        raise IllConditionedError(f"closed-form solve: matrix is not positive definite; {hint}")
    # M A = R  <=>  A M^T = R^T  (A symmetric)
    Mt = torch.cholesky_solve(R64.T.contiguous(), L)
    return Mt.T.contiguous(), cond
