"""CFR and LoRA fusion solved per layer, as the reference implementation does: the baselines that the
shared solves (``mace_ops.cfr``, ``mace_ops.fusion``) are timed and checked against.

For each K/V weight W (d_out x d) on its own:

    W* = (λ W + Σ_i V_iᵀ C_i) (λ I + Σ_i C_iᵀ C_i)⁻¹

with C_i the context rows (token features) of concept i's prompts and V_i their targets:

* ``per_layer_cfr``: C_i the concept prompt's features at the positions aligned with the anchor
  prompt's (``mace_ops.alignment.align``), V_i = E_i Wᵀ with E_i the anchor prompt's features there;
* ``per_layer_fusion``: C_i every position of the concept's prompts (all 77), V_i = C_i (W' + ΔW_i)ᵀ
  with ΔW_i the concept's LoRA delta, W = W'.

Choices copied from the reference on purpose: every layer's targets V_i are held in memory (memory
grows with concepts x layers) and each layer takes one ``torch.inverse`` in ``dtype`` (float32), which
loses most of a small LoRA delta when the system's condition number is ~1e6. The pack instead sums
d x d statistics once in float64 and factors them once per width (``mace_ops.ridge``). Sizes and
errors measured: docs/code-notes.md#mace_opsper_layerpy.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .alignment import align
from .templates import fill


def per_layer_cfr(encoder, weights: dict[str, torch.Tensor], concepts, templates, lamb: float):
    """CFR's new weights, one float32 inverse per layer (see the module docstring)."""
    values = {k: [] for k in weights}
    contexts = []
    for c in concepts:
        new = encoder.encode([fill(t, c.anchor) for t in templates])
        old = encoder.encode([fill(t, c.phrases[0]) for t in templates])
        for o, n in zip(old, new):
            a = align(o.ids, o.length, n.ids, n.length)
            ctx, emb = o.features[list(a.old)], n.features[list(a.new)]
            contexts.append(ctx)
            for k, w in weights.items():
                values[k].append(emb @ w.T)
    out = {}
    for k, w in weights.items():
        mat1 = lamb * w + sum(v.T @ c for v, c in zip(values[k], contexts))
        mat2 = lamb * torch.eye(w.shape[1]) + sum(c.T @ c for c in contexts)
        out[k] = mat1 @ torch.inverse(mat2)
    return out


def per_layer_fusion(encoder, current: dict[str, torch.Tensor], loras: Iterable, templates, lamb: float,
                     dtype=torch.float32):
    """Fused weights from ``loras``, (concept, {weight name: LoraFactors}) pairs taken one at a time,
    every position of the concept's prompts as context, one inverse per layer in ``dtype``."""
    values = {k: [] for k in current}
    contexts = []
    for c, lora in loras:
        # all 77 positions of the prompts (all_words=True): 2,310 vectors for 30 templates
        ctx = torch.cat([e.features for e in encoder.encode([fill(t, c.phrases[0]) for t in templates])]).to(dtype)
        contexts.append(ctx)
        for k, w in current.items():  # the LoRA fused into W' once per concept, targets recorded per layer
            values[k].append(ctx @ (w.to(dtype) + lora[k].delta(dtype)).T)
        del lora
    out = {}
    for k, w in current.items():
        mat1 = lamb * w.to(dtype) + sum(v.T @ c for v, c in zip(values[k], contexts))
        mat2 = lamb * torch.eye(w.shape[1], dtype=dtype) + sum(c.T @ c for c in contexts)
        out[k] = (mat1 @ torch.inverse(mat2)).float()
    return out
