"""Concept-focal importance sampling (CFIS): which diffusion timesteps LoRA training looks at.

MACE draws the training timestep t from a smooth "bump" on [t1, t2] instead of uniformly:

    p(t) = (sigmoid(gamma (t - t1)) - sigmoid(gamma (t - t2))) / Z,   t = 0 .. T-1

With the paper's t1 = 200, t2 = 400, gamma = 0.05 and T = 1000 the mass in [200, 400) is about
0.861, the mean about 300, and almost nothing lies below 100 or above 500. Small t are the late,
detail-forming steps; the early steps, shared by similar concepts, are left alone.
``TimestepSampler`` draws from this density (or uniformly) with its own seeded generator, so a
training run is reproducible for a seed.
"""
from __future__ import annotations

import torch

SAMPLER_KINDS = ("cfis", "uniform")


def cfis_density(num_timesteps: int = 1000, t1: float = 200.0, t2: float = 400.0, gamma: float = 0.05) -> torch.Tensor:
    """p(t) for t = 0..num_timesteps-1 (float64, sums to 1)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not gamma > 0:
        raise ValueError(f"CFIS gamma must be > 0, got {gamma}")
    if not t1 < t2:
        raise ValueError(f"CFIS needs t1 < t2, got t1={t1}, t2={t2}")
    t = torch.arange(num_timesteps, dtype=torch.float64)
    p = torch.sigmoid(gamma * (t - t1)) - torch.sigmoid(gamma * (t - t2))
    total = float(p.sum())
    if not total > 0:
        raise ValueError(f"CFIS density is empty on 0..{num_timesteps - 1} for t1={t1}, t2={t2}, gamma={gamma}")
    return p / total


class TimestepSampler:
    """Draw integer timesteps from CFIS or uniformly, reproducibly for a seed.

    ``kind``: "cfis" or "uniform". ``sample(n)`` returns a (n,) int64 tensor on ``device``.
    """

    def __init__(
        self,
        kind: str = "cfis",
        num_timesteps: int = 1000,
        t1: float = 200.0,
        t2: float = 400.0,
        gamma: float = 0.05,
        seed: int = 0,
        device: torch.device | str | None = None,
    ):
        if kind not in SAMPLER_KINDS:
            raise ValueError(f"timestep sampler: unknown kind {kind!r}; choose one of {list(SAMPLER_KINDS)}")
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.kind = kind
        self.num_timesteps = num_timesteps
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.generator = torch.Generator().manual_seed(int(seed))
        if kind == "cfis":
            self.probs = cfis_density(num_timesteps, t1, t2, gamma)
        else:
            self.probs = torch.full((num_timesteps,), 1.0 / num_timesteps, dtype=torch.float64)

    def sample(self, n: int) -> torch.Tensor:
        if n < 0:
            raise ValueError(f"sample: n must be >= 0, got {n}")
        if n == 0:
            t = torch.zeros(0, dtype=torch.long)
        elif self.kind == "uniform":
            t = torch.randint(0, self.num_timesteps, (n,), generator=self.generator)
        else:
            t = torch.multinomial(self.probs, n, replacement=True, generator=self.generator)
        return t.to(self.device)

    def mean(self) -> float:
        return float((self.probs * torch.arange(self.num_timesteps, dtype=torch.float64)).sum())
