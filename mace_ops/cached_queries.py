"""Cached-query LoRA training: the MACE attention loss against queries recorded once.

The attention loss (``attention_loss``) reads only the cross-attention probabilities

    A_l = softmax(q_l k_l^T / sqrt(d)),   k_l = c (W_l + dK_l)^T  (split into heads like q_l)

of every attn2 layer l. The queries q_l depend on the image, the timestep, the noise, the prompt
and, through the earlier layers' outputs, on the LoRA itself. Freezing that last dependence (q_l
of the model without the LoRA, recorded in one forward without grad per sample) makes a training
step a small-matrix problem, with no denoiser forward or backward:

    loss(dK) = sum_l sum_b || softmax(q_lb (c_b (W_l + dK_l)^T)^T / sqrt(d))[:, M_b, S_b] ||_F

The value projection does not enter this loss, so only the K LoRAs train on this path. The
first step's loss equals the full path's on the same sample (the LoRA starts at zero).
``QueryCache`` holds the queries of N samples per layer, in the dtype the denoiser computed them.

``BatchedKLora`` trains C concepts at once: concept c has its own weights W_c (its own CFR), its
own factors (up_c, down_c) and its own queries, stacked along a leading concept dimension,

    k_c = c_c W_c^T + s (c_c down_c^T) up_c^T        (batched matmuls, one per layer)

and the per-concept losses are the same ``layer_term`` sums; C = 1 is the one-concept path.
Gradient clipping is per concept (as ``clip_grad_norm_`` on that concept's factors), and AdamW is
elementwise, so the concepts stay independent: equal to training them in turn within float
tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .attention_loss import layer_term
from .interfaces import AttentionProbe, CrossAttentionDenoiser, KVWeights
from .lora import KVLora

QUERY_CHUNK = 8  # samples per recording forward
WeightTransform = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass
class QueryLayer:
    layer: str
    key_name: str
    query: torch.Tensor  # (N, heads, HW, d_head)
    height: int
    width: int


class QueryCache:
    """The per-layer queries of N (latent, timestep, noise, prompt) samples."""

    def __init__(self, layers: list[QueryLayer]):
        if not layers:
            raise ValueError("cached queries: the denoiser reported no cross-attention layer")
        self.layers = layers

    @property
    def key_names(self) -> list[str]:
        return [layer.key_name for layer in self.layers]

    def numel(self) -> int:
        return sum(layer.query.numel() for layer in self.layers)

    def probes(self, idx: torch.Tensor, context: torch.Tensor, weights: KVWeights,
               transform: WeightTransform | None = None) -> list[AttentionProbe]:
        """Probabilities of samples ``idx`` with keys from ``context`` (B, L, d) and ``transform(W)``."""
        out = []
        for layer in self.layers:
            w = weights[layer.key_name]
            w = transform(layer.key_name, w) if transform is not None else w
            q = layer.query[idx.to(layer.query.device)].float()  # (B, heads, HW, d_head)
            b, heads, _, d_head = q.shape
            k = (context.float() @ w.float().T).reshape(b, context.shape[1], heads, d_head).transpose(1, 2)
            probs = torch.softmax((q @ k.transpose(-1, -2)) * d_head ** -0.5, dim=-1)
            out.append(AttentionProbe(layer.layer, probs, layer.height, layer.width))
        return out


def record_queries(denoiser: CrossAttentionDenoiser, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                   weights: KVWeights, should_stop: Callable[[], object] | None = None) -> QueryCache:
    """One forward without grad per ``QUERY_CHUNK`` samples; keeps every attn2 layer's queries."""
    n = x_t.shape[0]
    layers: list[QueryLayer] = []
    with torch.no_grad():
        for start in range(0, n, QUERY_CHUNK):
            if should_stop is not None and should_stop():
                raise InterruptedError("recording the cross-attention queries stopped")
            stop = min(n, start + QUERY_CHUNK)
            seen: list[AttentionProbe] = []
            denoiser.forward_with_attention(x_t[start:stop], t[start:stop], context[start:stop], seen.append)
            if not layers:
                for p in seen:
                    if p.query is None or p.key_name not in weights:
                        raise ValueError(
                            f"cached queries: the denoiser does not report the queries and to_k weight of layer "
                            f"{p.layer!r}; train with path 'full'")
                    q = p.query
                    layers.append(QueryLayer(p.layer, p.key_name, q.new_empty((n,) + tuple(q.shape[1:])),
                                             p.height, p.width))
            if len(seen) != len(layers):
                raise RuntimeError(f"cached queries: {len(seen)} cross-attention layers in one forward, "
                                   f"{len(layers)} in the first")
            for layer, p in zip(layers, seen):
                layer.query[start:stop] = p.query.detach()
    return QueryCache(layers)


class BatchedKLora:
    """The K factors of C LoRAs stacked (concept, ...) and trained against their query caches."""

    def __init__(self, loras: Sequence[KVLora], weights: Sequence[KVWeights], caches: Sequence[QueryCache]):
        if not (len(loras) == len(weights) == len(caches) >= 1):
            raise ValueError("batched LoRA: one LoRA, weight set and query cache per concept")
        self.loras, self.caches = list(loras), list(caches)
        self.keys = caches[0].key_names
        if any(c.key_names != self.keys for c in caches):
            raise ValueError("batched LoRA: the concepts' denoisers report different cross-attention layers")
        if len({(lo.rank, lo.alpha) for lo in loras}) != 1:
            raise ValueError("batched LoRA: the concepts' LoRAs differ in rank or alpha")
        self.scale = loras[0].scale
        self.w = {k: torch.stack([w[k].detach().float() for w in weights]) for k in self.keys}  # (C, out, d)
        self.down = {k: torch.stack([lo.down[k].detach() for lo in loras]).requires_grad_(True) for k in self.keys}
        self.up = {k: torch.stack([lo.up[k].detach() for lo in loras]).requires_grad_(True) for k in self.keys}

    def parameters(self) -> list[torch.Tensor]:
        return [t for k in self.keys for t in (self.down[k], self.up[k])]

    def losses(self, idx: torch.Tensor, contexts: torch.Tensor, positions: torch.Tensor,
               masks: torch.Tensor | None) -> torch.Tensor:
        """(C,) attention losses of samples ``idx`` of every concept; contexts (C, B, L, d), positions (C, B, L)."""
        ctx = contexts.float()
        totals = [None] * len(self.loras)
        for li, key in enumerate(self.keys):
            layers = [cache.layers[li] for cache in self.caches]
            q = torch.stack([layer.query[idx.to(layer.query.device)] for layer in layers]).float()  # (C,B,h,HW,dh)
            c, b, heads, _, d_head = q.shape
            k = torch.einsum("cbld,cod->cblo", ctx, self.w[key])
            k = k + self.scale * torch.einsum("cblr,cor->cblo", torch.einsum("cbld,crd->cblr", ctx, self.down[key]),
                                              self.up[key])
            k = k.reshape(c, b, ctx.shape[2], heads, d_head).transpose(2, 3) * d_head ** -0.5  # (C, B, heads, L, dh)
            probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # the scale on the small side
            first = layers[0]
            for ci in range(c):
                term = layer_term(AttentionProbe(first.layer, probs[ci], first.height, first.width), positions[ci],
                                  None if masks is None else masks[ci])
                totals[ci] = term if totals[ci] is None else totals[ci] + term
        return torch.stack(totals)

    def preservation(self, P: torch.Tensor) -> torch.Tensor:
        """(C,) ``lora_train.preservation_loss`` of each concept's K factors (its V factors are zero)."""
        total = None
        for key in self.keys:
            down, up, w = self.down[key], self.up[key], self.w[key]
            num = (self.scale ** 2) * ((down @ P @ down.transpose(1, 2)) * (up.transpose(1, 2) @ up)).sum((1, 2))
            den = ((w @ P) * w).sum((1, 2)).clamp_min(1e-12)
            total = num / den if total is None else total + num / den
        return total

    def clip_grad_norms(self, max_norm: float) -> None:
        """Each concept's gradient scaled as ``clip_grad_norm_`` would on that concept's factors alone."""
        params = self.parameters()
        sq = torch.stack([p.grad.pow(2).flatten(1).sum(1) for p in params]).sum(0)  # (C,)
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef.view(-1, *([1] * (p.ndim - 1))))

    def write_back(self) -> None:
        """Copy the trained factors into the concepts' own ``KVLora`` objects."""
        for ci, lora in enumerate(self.loras):
            for key in self.keys:
                lora.down[key] = self.down[key][ci].detach().clone().requires_grad_(True)
                lora.up[key] = self.up[key][ci].detach().clone().requires_grad_(True)
