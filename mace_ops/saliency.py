"""ANT's weight saliency for the LoRA stage: which K/V output rows a single concept may change.

ANT (Li et al., 2025) restricts fine-tuning to the parameters most responsible for the concept,
found from the erasure loss's gradient averaged over augmented inputs. Here the parameters are the
rows of every attn2 K/V weight W (out x in) and the loss is the LoRA stage's own objective L
(the attention mass of the concept's tokens, or the trajectory loss) at the base model:

    s_W[o] = sum_{prompts, t, x} | dL / dW[o, :] |_1         (one backward through a zero delta on W)
    keep   = the top ``share`` of rows by s_W / mean(s_W), pooled over all K/V weights

The augmentation is the stage's own prompt set — every template filled with every phrase of the
concept — at ``samples`` seeded (latent, t) draws, so no prompt or noise level decides alone. The
LoRA then trains as usual, with its ``up`` factor's other rows held at zero (``mask_up``), so the
edit W + up @ down touches only the salient rows.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch


def salient_rows(loss_of: Callable[[Callable[[str, torch.Tensor], torch.Tensor]], torch.Tensor],
                 weights: Mapping[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
    """weight name -> (out,) bool mask of its salient rows. ``loss_of(weight_transform)`` returns the
    loss (summed over the augmented draws) with ``weight_transform`` applied to every K/V weight."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"LoRA saliency: share {share!r} must be in (0, 1]")
    deltas = {k: torch.zeros(w.shape, dtype=torch.float32, device=w.device, requires_grad=True)
              for k, w in weights.items()}

    def transform(name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight + deltas[name].to(weight.dtype) if name in deltas else weight

    loss = loss_of(transform)
    grads = torch.autograd.grad(loss, list(deltas.values()), allow_unused=True)
    scores = {}
    for (name, d), g in zip(deltas.items(), grads):
        s = torch.zeros(d.shape[0], device=d.device) if g is None else g.abs().sum(1)
        scores[name] = s / s.mean().clamp_min(1e-30)          # comparable across layers of different scale
    pooled = torch.cat(list(scores.values()))
    k = max(1, int(round(share * pooled.numel())))
    threshold = pooled.topk(k).values.min()
    return {name: s >= threshold for name, s in scores.items()}


def mask_up(up: Mapping[str, torch.Tensor], rows: Mapping[str, torch.Tensor]) -> None:
    """Zero, in place, the ``up`` factor's rows outside the salient ones."""
    with torch.no_grad():
        for name, u in up.items():
            u[~rows[name].to(u.device)] = 0.0
