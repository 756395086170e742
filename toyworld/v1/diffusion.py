"""Diffusion maths of the toy world: cosine schedule, noising, DDIM sampling with CFG.

eps-prediction, T=1000 cosine schedule, DDIM with eta=0 and x0 clipping to [-1, 1],
classifier-free guidance against the empty prompt. Sampling is batched and seeded by a
``torch.Generator``; K/V weights can be substituted for one call (``kv_weights``) without
mutating the model, through the per-call ``weight_transform`` of every ``XAttn``.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import torch

from . import vocab
from .model import Hooks, T2I

NUM_TRAIN_TIMESTEPS = 1000


def cosine_alpha_bar(T: int = NUM_TRAIN_TIMESTEPS, s: float = 0.008) -> torch.Tensor:
    """alpha_bar[t] for t = 0..T-1 (Nichol & Dhariwal), betas clipped at 0.999."""
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(((steps / T) + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float()


ALPHA_BAR = cosine_alpha_bar()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, for integer timesteps t (B,)."""
    ab = ALPHA_BAR.to(x0.device)[t.long()].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def ids_tensor(prompts: Sequence[str], vocabulary=vocab) -> torch.Tensor:
    """(B, L) window ids of prompts in a world's vocabulary (default: v1's)."""
    return torch.tensor(vocabulary.batch_ids(prompts), dtype=torch.long)


def kv_hooks(kv_weights: Optional[Mapping[str, torch.Tensor]]) -> Optional[Hooks]:
    """Hooks that substitute the given K/V weights by name (others unchanged)."""
    if not kv_weights:
        return None
    def transform(name: str, w: torch.Tensor) -> torch.Tensor:
        return kv_weights[name].to(w.dtype) if name in kv_weights else w
    return Hooks(weight_transform=transform)


def ddim_timesteps(steps: int, T: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Evenly spaced DDIM timesteps, from T-1 down to 0."""
    return [int(round(x)) for x in torch.linspace(T - 1, 0, steps).tolist()]


@torch.no_grad()
def sample_from_context(model: T2I, ctx: torch.Tensor, uncond: torch.Tensor, *, steps: int = 10,
                        cfg: float = 7.0, generator: Optional[torch.Generator] = None,
                        noise: Optional[torch.Tensor] = None,
                        kv_weights: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
    """DDIM (eta 0) from text features ``ctx`` (B, L, d); ``uncond`` (L, d) or (B, L, d).

    Returns images (B, 3, 32, 32) in [-1, 1].
    """
    b = ctx.shape[0]
    if uncond.ndim == 2:
        uncond = uncond.unsqueeze(0).expand(b, -1, -1)
    x = noise.clone() if noise is not None else torch.randn(b, 3, 32, 32, generator=generator)
    hooks = kv_hooks(kv_weights)
    both = torch.cat([uncond, ctx], 0)
    ts = ddim_timesteps(steps)
    for i, t in enumerate(ts):
        tt = torch.full((2 * b,), t, dtype=torch.long)
        eps_u, eps_c = model(torch.cat([x, x], 0), tt, both, hooks).chunk(2)
        eps = eps_u + cfg * (eps_c - eps_u)
        ab = ALPHA_BAR[t]
        x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        ab_prev = ALPHA_BAR[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    return x


@torch.no_grad()
def encode_prompts(model: T2I, prompts: Sequence[str]) -> torch.Tensor:
    return model.encode_text(ids_tensor(prompts, model.vocab))


@torch.no_grad()
def sample(model: T2I, prompts: Sequence[str], *, steps: int = 10, cfg: float = 7.0, seed: int = 0,
           batch_size: int = 64, kv_weights: Optional[Mapping[str, torch.Tensor]] = None,
           context_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Sample one image per prompt, seeded; images (N, 3, 32, 32) in [-1, 1].

    The noise of prompt i depends only on ``seed`` and i, not on the batch size.
    ``kv_weights`` substitutes cross-attention K/V weights by name for this call only;
    ``context_transform`` maps every text context (B, L, d), the unconditional one included
    (a gated erasure such as ``mace_ops.ace.GatedErasure``).
    """
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), 3, 32, 32, generator=gen)
    tf = context_transform if context_transform is not None else (lambda c: c)
    uncond = tf(encode_prompts(model, [""]))[0]
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i: i + batch_size])
        ctx = tf(encode_prompts(model, chunk))
        out.append(sample_from_context(model, ctx, uncond, steps=steps, cfg=cfg,
                                       noise=noise[i: i + len(chunk)], kv_weights=kv_weights))
    return torch.cat(out, 0) if out else torch.zeros(0, 3, 32, 32)
