"""Toy-world adapters for the mace_ops interfaces.

* ``ToyTextEncoder`` implements ``TextEncoder``: closed-vocabulary tokenization and per-token
  features (the text encoder's final-LayerNorm outputs, shape (16, 64)) of whole prompts; and
  ``EmbeddingTextEncoder`` (continuous embeddings in a template's ``{}`` slot).
* ``ToyDenoiser`` implements ``CrossAttentionDenoiser``: the 14 cross-attention to_k/to_v
  weights by name, noising, and a forward pass that reports every ``XAttn``'s probabilities.
* ``toy_kv_weights(model)``: the K/V weights dict of a model (detached copies).
* ``ToyMlpSite`` implements ``mace_ops.text_gate.MlpSite``: the last text layer's MLP, its norm,
  and the residual stream before and after it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from mace_ops.interfaces import SOFT_TOKEN_ID, AttentionProbe, EncodedPrompt, KVWeights
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


    def word_embeddings(self, text: str) -> torch.Tensor:
        ids = torch.tensor(self.tokenize(text), dtype=torch.long)
        return self.model.text.tok.weight[ids].detach().clone()

    def encode_embeddings(self, templates: Sequence[str], embeddings: torch.Tensor) -> list[EncodedPrompt]:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.model.text.tok.weight.shape[1]:
            raise ValueError(f"embeddings: expected (k, {self.model.text.tok.weight.shape[1]}), "
                             f"got {tuple(embeddings.shape)}")
        k, rows, lengths = embeddings.shape[0], [], []
        for t in templates:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r}: needs exactly one {{}}")
            pre, post = t.split("{}")
            words = self.vocab.tokenize(pre) + [SOFT_TOKEN_ID] * k + self.vocab.tokenize(post)
            n = len(words) + 2
            if n > self.context_length:
                raise ValueError(f"template {t!r} with {k} soft tokens needs {n} tokens, window is {self.context_length}")
            rows.append([self.start_id] + words + [self.end_id] * (self.context_length - n + 1))
            lengths.append(n)
        ids = torch.tensor(rows, dtype=torch.long)
        soft = ids == SOFT_TOKEN_ID
        emb = self.model.text.tok(ids.clamp(min=0))
        fill = embeddings.to(emb.dtype).unsqueeze(0).expand(len(rows), -1, -1).reshape(-1, emb.shape[-1])
        emb = emb.masked_scatter(soft.unsqueeze(-1), fill) if soft.any() else emb
        feats = self.model.text.forward_embeddings(emb)
        return [EncodedPrompt(ids=tuple(r), length=n, features=feats[i]) for i, (r, n) in enumerate(zip(rows, lengths))]


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


class ToyResiduals(ToyTextEncoder):
    """``ToyTextEncoder`` whose features are the residual stream entering ``layer``'s MLP norm
    (``after`` False) or leaving its MLP (``after`` True), per token."""

    def __init__(self, model: T2I, layer: int = -1, after: bool = False):
        super().__init__(model)
        self.layer, self.after = model.text.layers[layer], after

    @torch.no_grad()
    def context(self, prompts: Sequence[str]) -> torch.Tensor:
        caught = []
        hook = self.layer.ln2.register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
        try:
            self.model.text(self.ids(prompts))
        finally:
            hook.remove()
        r = caught[0]
        return r + self.layer.ff(self.layer.ln2(r)) if self.after else r


class ToyMlpSite:
    """The toy text encoder's ``layer`` MLP (Linear, GELU, Linear after ``ln2``) as an ``MlpSite``."""

    activation = "gelu"

    def __init__(self, model: T2I, layer: int = -1):
        self.block = model.text.layers[layer]
        self.inputs, self.outputs = ToyResiduals(model, layer), ToyResiduals(model, layer, after=True)

    def norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.block.ln2.weight.detach(), self.block.ln2.bias.detach()

    def mlp(self) -> dict[str, torch.Tensor]:
        ff = self.block.ff
        return {"fc1.weight": ff[0].weight.detach(), "fc1.bias": ff[0].bias.detach(),
                "fc2.weight": ff[2].weight.detach(), "fc2.bias": ff[2].bias.detach()}
