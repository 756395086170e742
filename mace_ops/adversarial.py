"""Adversarial augmentation (RECE-style, for CFR/fusion and ACE): embeddings an attack found
become extra erase pairs.

A soft prompt v (``attacks.soft_prompt_attack``) that still draws the erased concept is put in
every template and aligned with the anchor's prompt like a concept phrase with its tokens mapped
(``alignment.align(..., include_concept=True)``): the soft positions go to the anchor's token,
the shared prefix/suffix and the padding pair up. Those (context, anchor input) pairs join the
closed form like the concept's own (``cfr.refine_cross_attention(extra_pairs=...)``), so the
refit maps what the attack found onto the anchor too. Rounds alternate: edit -> attack the edit
-> add what was found -> refit from the original weights (the caller's loop).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .alignment import align
from .covariance import PairStats
from .interfaces import EmbeddingTextEncoder
from .templates import check_templates, fill


@torch.no_grad()
def embedding_pairs(encoder: EmbeddingTextEncoder, embeddings: Sequence[torch.Tensor], templates: Sequence[str],
                    anchor: str, stats: PairStats | None = None) -> PairStats:
    """The aligned (soft prompt, anchor prompt) pairs of every embedding in every template."""
    check_templates(templates)
    anchor_enc = encoder.encode([fill(t, anchor) for t in templates])
    for v in embeddings:
        soft = encoder.encode_embeddings(list(templates), v.detach())
        if stats is None:
            stats = PairStats(soft[0].features.shape[1])
        for o, n in zip(soft, anchor_enc):
            a = align(o.ids, o.length, n.ids, n.length, True)
            stats.add_pairs(o.features[list(a.old)].detach(), n.features[list(a.new)])
    if stats is None:
        raise ValueError("embedding_pairs: no embeddings")
    return stats
