"""Toy-world adapters for the mace_ops interfaces.

* ``ToyTextEncoder`` implements ``TextEncoder``: closed-vocabulary tokenization and per-token
  features (the text encoder's final-LayerNorm outputs, shape (16, 64)) of whole prompts.
* ``ToyDenoiser`` implements ``CrossAttentionDenoiser``: the 14 cross-attention to_k/to_v
  weights by name, noising, and a forward pass that reports every ``XAttn``'s probabilities.
* ``toy_kv_weights(model)``: the K/V weights dict of a model (detached copies).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from mace_ops.interfaces import AttentionProbe, EncodedPrompt, KVWeights
from . import diffusion, vocab
from .model import Hooks, T2I


def toy_kv_weights(model: T2I) -> KVWeights:
    """The 14 to_k/to_v weights, (64, 64) each, keyed by their state_dict names (copies)."""
    out: KVWeights = {}
    for layer in model.xattn_layers():
        out[layer.k_name] = layer.to_k.weight.detach().clone()
        out[layer.v_name] = layer.to_v.weight.detach().clone()
    return out


class ToyTextEncoder:
    """``TextEncoder`` over the toy model's causal text encoder (SD1-like token layout)."""

    def __init__(self, model: T2I):
        self.model = model
        self.vocab = model.vocab
        self.end_id: int = self.vocab.EOT_ID
        self.start_id: int = self.vocab.SOS_ID
        self.context_length: int = self.vocab.CONTEXT_LENGTH

    def tokenize(self, text: str) -> list[int]:
        return self.vocab.tokenize(text)

    def ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, L) token ids of whole prompts."""
        return diffusion.ids_tensor(prompts, self.vocab)

    @torch.no_grad()
    def context(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, L, 64) text features, ready to pass as cross-attention context."""
        return self.model.encode_text(self.ids(prompts))

    def encode(self, prompts: Sequence[str]) -> list[EncodedPrompt]:
        prompts = list(prompts)
        if not prompts:
            return []
        encoded = [self.vocab.encode_ids(p) for p in prompts]
        feats = self.context(prompts)
        return [EncodedPrompt(ids=tuple(ids), length=n, features=feats[i])
                for i, (ids, n) in enumerate(encoded)]


class ToyDenoiser:
    """``CrossAttentionDenoiser`` over the toy UNet; latents are the images in [-1, 1], (B, 3, 32, 32)."""

    num_train_timesteps: int = diffusion.NUM_TRAIN_TIMESTEPS

    def __init__(self, model: T2I):
        self.model = model

    def kv_weights(self) -> KVWeights:
        return toy_kv_weights(self.model)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return diffusion.add_noise(x0, noise, t)

    def forward_with_attention(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        on_attention: Callable[[AttentionProbe], None],
        weight_transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        def report(name: str, probs: torch.Tensor, height: int, width: int, query: torch.Tensor) -> None:
            on_attention(AttentionProbe(layer=name, probs=probs, height=height, width=width, query=query,
                                        key_name=f"{name}.to_k.weight"))

        t = torch.as_tensor(t, dtype=torch.long).reshape(-1).expand(x_t.shape[0])
        return self.model(x_t, t, context, Hooks(weight_transform=weight_transform, on_attention=report))
