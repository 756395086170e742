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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .attention_loss import layer_term
from .interfaces import AttentionProbe, CrossAttentionDenoiser, KVWeights

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

    def loss(self, idx: torch.Tensor, context: torch.Tensor, positions: torch.Tensor, masks: torch.Tensor | None,
             weights: KVWeights, transform: WeightTransform | None = None) -> torch.Tensor:
        """The attention loss of samples ``idx`` (``attention_loss``, summed over layers)."""
        terms = [layer_term(p, positions, masks) for p in self.probes(idx, context, weights, transform)]
        return torch.stack(terms).sum()


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
