"""Closed-form edit of the layer that reads SDXL's pooled text embedding (UCE-style).

SDXL's UNet also reads the prompt through its *pooled* embedding p (OpenCLIP-bigG's projected
end-token state, width 1280): ``y = [p, size embeddings]`` enters ``label_emb.0.0`` (a Linear
2816 -> 1280) and is added to the timestep embedding of every res block -- outside
cross-attention, so MACE's K/V edits leave it.  This edits the columns of that first linear layer
that read p (``W_p``, out x d) so that the concept's pooled embeddings produce what the anchor's
do, while the preserve prompts' pooled embeddings keep their effect:

    min_W'  sum_c ||W' p_c - W_p p_a(c)||^2 + s sum_j ||W' q_j - W_p q_j||^2 + lambda ||W' - W_p||_F^2

    =>  W' = W_p M,   M = (lambda I + G + s P)(lambda I + B + s P)^-1,
        G = sum_c p_a(c) p_c^T,  B = sum_c p_c p_c^T,  P = sum_j q_j q_j^T

(p_c: pooled embedding of a concept prompt, p_a(c): of the same template with the anchor, q_j:
of a preserve prompt; s = preserve_scale * n_pairs / n_preserve, as in CFR).  It is CFR's
equation on other vectors, so it reuses ``PairStats`` and ``cfr_transform``: one d x d solve.  The
size-embedding columns and the bias are untouched.  ``encode_pooled(prompts) -> (N, d)`` is the
only thing asked of the text encoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .cfr import CFRConfig, cfr_transform
from .concepts import Concept
from .covariance import PairStats
from .templates import fill
from .validation import require_finite

PooledEncoder = Callable[[Sequence[str]], torch.Tensor]


@dataclass
class PooledEdit:
    key: str
    delta: torch.Tensor  # same shape as the layer's weight; zero outside the pooled columns
    transform: torch.Tensor  # M, d x d, float64
    condition: float
    n_pairs: int
    n_preserve: int


def pooled_stats(encode_pooled: PooledEncoder, concepts: Sequence[Concept], templates: Sequence[str],
                 default_anchor: str, preserve_prompts: Sequence[str]) -> PairStats:
    """Pairs (concept prompt's p, anchor prompt's p) over every phrase and template; preserve p's."""
    stats = None
    for concept in concepts:
        anchor = default_anchor if concept.anchor is None else concept.anchor
        new = encode_pooled([fill(t, anchor) for t in templates]).to(torch.float64)
        stats = stats or PairStats(new.shape[1])
        for phrase in concept.phrases:
            stats.add_pairs(encode_pooled([fill(t, phrase) for t in templates]).to(torch.float64), new)
    if stats is None:
        raise ValueError("pooled edit: no concepts")
    if preserve_prompts:
        stats.add_preserve(encode_pooled(list(preserve_prompts)).to(torch.float64))
    return stats


def edit_pooled_projection(weight: torch.Tensor, key: str, stats: PairStats, config: CFRConfig) -> PooledEdit:
    """The delta on ``weight`` (out x in, the pooled embedding in columns ``[:stats.dim]``)."""
    d = stats.dim
    if weight.ndim != 2 or weight.shape[1] < d:
        raise ValueError(f"pooled edit: {key} has shape {tuple(weight.shape)}; it cannot read a width-{d} embedding")
    M, cond = cfr_transform(stats, config)
    w = weight.detach().to(torch.float32)
    delta = torch.zeros_like(w)
    delta[:, :d] = w[:, :d] @ (M - torch.eye(d, dtype=M.dtype)).to(torch.float32)
    require_finite({key: delta}, "pooled edit", "raise lambda or add preserve prompts")
    return PooledEdit(key, delta, M, float(cond), stats.n_pairs, stats.n_preserve)
