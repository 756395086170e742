"""Running d x d sums that every closed-form MACE solve factors through.

For pairs (c, e) of context vectors and their targets' inputs, and preserve vectors p:

    G = sum e c^T      (targets are W e, so sum W e c^T = W G)
    B = sum c c^T
    P = sum p p^T

All sums are float64 and O(d^2) whatever the number of concepts, prompts or layers. Adding in any
order or in chunks gives the same result (up to float rounding), and ``merge`` joins two sums.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PairStats:
    dim: int
    G: torch.Tensor = field(init=False)
    B: torch.Tensor = field(init=False)
    P: torch.Tensor = field(init=False)
    n_pairs: int = 0
    n_preserve: int = 0

    def __post_init__(self) -> None:
        z = lambda: torch.zeros(self.dim, self.dim, dtype=torch.float64)  # noqa: E731
        self.G, self.B, self.P = z(), z(), z()

    def _check(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what}: expected (n, {self.dim}) vectors, got {tuple(x.shape)}")
        return x.detach().to(device="cpu", dtype=torch.float64)

    def add_pairs(self, context: torch.Tensor, target_input: torch.Tensor) -> None:
        """Rows of ``context`` should be mapped to what the old weights give for ``target_input``."""
        c, e = self._check(context, "context"), self._check(target_input, "target_input")
        if c.shape[0] != e.shape[0]:
            raise ValueError(f"add_pairs: {c.shape[0]} contexts but {e.shape[0]} targets")
        self.G += e.T @ c
        self.B += c.T @ c
        self.n_pairs += c.shape[0]

    def add_preserve(self, vectors: torch.Tensor) -> None:
        p = self._check(vectors, "preserve")
        self.P += p.T @ p
        self.n_preserve += p.shape[0]

    def merge(self, other: "PairStats") -> "PairStats":
        if other.dim != self.dim:
            raise ValueError(f"merge: dims differ ({self.dim} vs {other.dim})")
        out = PairStats(self.dim)
        out.G, out.B, out.P = self.G + other.G, self.B + other.B, self.P + other.P
        out.n_pairs, out.n_preserve = self.n_pairs + other.n_pairs, self.n_preserve + other.n_preserve
        return out
