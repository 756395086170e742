"""Rank-r LoRA factors on the cross-attention K/V weights, applied as a per-call weight transform.

For each K/V weight W (out, in) a ``KVLora`` holds ``down`` (r, in), initialised N(0, (1/r)^2)
(std 1/r, as diffusers' LoRA layer), and ``up`` (out, r), initialised to 0, so at the start the
effective weight ``W + (alpha/r) up @ down`` is exactly W. alpha defaults to r (scale 1, the
reference's ``network_alpha=None``). Factors are float32 whatever the model's dtype; the delta is
cast to the weight's dtype and device when applied, keeping autograd history back to the factors.
Rank-1 on the 32 SD1.x attn2 K/V weights gives 2 * (16 * 768 + 12480) = 49,536 parameters.

Why not peft: peft injects adapters by replacing or wrapping ``nn.Linear`` modules in place. In
ComfyUI one diffusion model is a shared ``nn.Module`` owned by a ``ModelPatcher``; other nodes and
later prompts reuse it, and every change must go through the patcher (patches, weight wrappers)
so that it can be undone. Mutating or wrapping its modules would leak the LoRA into every other
use of the model. A weight transform evaluated at every call (ComfyUI's ``add_weight_wrapper``,
our ``CrossAttentionDenoiser.weight_transform``) changes nothing in place, needs no module
surgery, and is all the LoRA needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from .interfaces import KVWeights


@dataclass
class LoraFactors:
    """One weight's LoRA: delta = (alpha / rank) * up @ down, rank = down.shape[0]."""

    up: torch.Tensor  # (out, r)
    down: torch.Tensor  # (r, in)
    alpha: float

    def __post_init__(self) -> None:
        if self.up.ndim != 2 or self.down.ndim != 2 or self.up.shape[1] != self.down.shape[0]:
            raise ValueError(f"LoRA factors: up {tuple(self.up.shape)} and down {tuple(self.down.shape)} do not chain")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.scale * (self.up.detach().to(dtype) @ self.down.detach().to(dtype))


class KVLora:
    """Trainable LoRA factors for a set of named K/V weights (nothing of the model is touched)."""

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        rank: int = 1,
        alpha: float | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
    ):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not shapes:
            raise ValueError("LoRA: no K/V weight to attach to")
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.shapes = {name: (int(s[0]), int(s[1])) for name, s in shapes.items()}
        g = torch.Generator().manual_seed(int(seed))
        self.up: dict[str, torch.Tensor] = {}
        self.down: dict[str, torch.Tensor] = {}
        for name in sorted(self.shapes):  # init order independent of the mapping's order
            out_f, in_f = self.shapes[name]
            down = torch.randn(self.rank, in_f, generator=g, dtype=torch.float32) / self.rank
            self.down[name] = down.to(device).requires_grad_(True)
            self.up[name] = torch.zeros(out_f, self.rank, dtype=torch.float32, device=device).requires_grad_(True)

    @classmethod
    def for_weights(cls, weights: KVWeights, rank: int = 1, alpha: float | None = None, seed: int = 0) -> "KVLora":
        """Fresh factors for every weight, on the weights' device."""
        if not weights:
            raise ValueError("LoRA: no K/V weight to attach to")
        device = next(iter(weights.values())).device
        return cls({k: tuple(w.shape) for k, w in weights.items()}, rank, alpha, seed, device)

    @classmethod
    def from_factors(cls, factors: Mapping[str, LoraFactors], trainable: bool = False) -> "KVLora":
        """Rebuild from saved factors (all must share rank and alpha)."""
        if not factors:
            raise ValueError("LoRA: no factors")
        ranks = {f.rank for f in factors.values()}
        alphas = {float(f.alpha) for f in factors.values()}
        if len(ranks) != 1 or len(alphas) != 1:
            raise ValueError(f"LoRA factors mix ranks {sorted(ranks)} / alphas {sorted(alphas)}")
        first = next(iter(factors.values()))
        lora = cls({k: (f.up.shape[0], f.down.shape[1]) for k, f in factors.items()}, first.rank, first.alpha)
        for name, f in factors.items():
            lora.up[name] = f.up.detach().to(torch.float32).clone().requires_grad_(trainable)
            lora.down[name] = f.down.detach().to(torch.float32).clone().requires_grad_(trainable)
        return lora

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def parameters(self) -> list[torch.Tensor]:
        return [t for name in self.shapes for t in (self.down[name], self.up[name])]

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        for name in self.shapes:
            yield f"{name}:down", self.down[name]
            yield f"{name}:up", self.up[name]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())

    def delta(self, name: str) -> torch.Tensor:
        """scale * up @ down (float32, with autograd history)."""
        return self.scale * (self.up[name] @ self.down[name])

    def weight_transform(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """W + delta for LoRA'd names (cast to W's dtype/device), W itself for any other name."""
        if name not in self.shapes:
            return weight
        if tuple(weight.shape) != self.shapes[name]:
            raise ValueError(f"LoRA {name}: weight is {tuple(weight.shape)}, LoRA made for {self.shapes[name]}")
        return weight + self.delta(name).to(device=weight.device, dtype=weight.dtype)

    def deltas(self) -> KVWeights:
        """Detached float32 deltas by weight name."""
        with torch.no_grad():
            return {name: self.delta(name).detach().clone() for name in self.shapes}

    def factors(self) -> dict[str, LoraFactors]:
        """Detached float32 copies of the factors by weight name."""
        return {
            name: LoraFactors(self.up[name].detach().clone(), self.down[name].detach().clone(), self.alpha)
            for name in self.shapes
        }

    def to(self, device: torch.device | str) -> "KVLora":
        for store in (self.up, self.down):
            for name, t in store.items():
                store[name] = t.detach().to(device).requires_grad_(t.requires_grad)
        return self
