"""The small interfaces every MACE algorithm works on.

mace_ops never imports ComfyUI. A model reaches the algorithms through three adapters:

* ``TextEncoder`` turns prompts into the per-token features that the cross-attention
  ``to_k``/``to_v`` projections read, together with the token ids of each position.
  An encoder may also implement ``EmbeddingTextEncoder`` (optional): continuous token embeddings
  in place of a phrase's words, for the soft-prompt attack and adversarial augmentation.
* ``KVWeights`` is a plain ``dict[str, Tensor]``: the cross-attention key/value projection
  weights by name, each of shape ``(out_features, in_features)``.
* ``CrossAttentionDenoiser`` (LoRA training) runs the denoiser and reports the cross-attention
  probabilities of every cross-attention layer.

The ComfyUI adapters live in ``nodes/``; the toy-world adapters live in ``toyworld/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Protocol, Sequence, runtime_checkable

import torch

KVWeights = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt encoded in one context window.

    ids:      every position of the window (start token, words, end token, padding), length L.
    length:   number of real positions, start (if the encoder has one) and end token included (ids[:length]).
    features: (L, d) float tensor, what the cross-attention K/V projections read at each position.
    """

    ids: tuple[int, ...]
    length: int
    features: torch.Tensor
    segments: tuple[tuple[int, int], ...] = ()
    """Several windows read one after the other (SD3 reads CLIP's 77 positions, then T5's): (window,
    length) per window, in order; ``ids`` and ``features`` cover all of them, ``length`` is the
    first window's. Empty: one window."""

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.features.shape[0] != len(self.ids):
            raise ValueError(
                f"EncodedPrompt: features must be (L, d) with L={len(self.ids)}, got {tuple(self.features.shape)}"
            )
        if not 1 <= self.length <= len(self.ids):  # 1: an empty prompt of an encoder without start token (T5)
            raise ValueError(f"EncodedPrompt: length {self.length} outside [1, {len(self.ids)}]")
        if self.segments and (sum(w for w, _ in self.segments) != len(self.ids)
                              or any(not 1 <= n <= w for w, n in self.segments)):
            raise ValueError(f"EncodedPrompt: segments {self.segments} do not cover the {len(self.ids)} positions")

    def windows(self) -> tuple[tuple[int, int, int], ...]:
        """(offset, window, length) of every window (one for an unsegmented prompt)."""
        parts, out, offset = self.segments or ((len(self.ids), self.length),), [], 0
        for window, length in parts:
            out.append((offset, window, length))
            offset += window
        return tuple(out)


@runtime_checkable
class TextEncoder(Protocol):
    """What CFR, fusion and LoRA training need from a text encoder.

    ``tokenize`` returns the content token ids of a phrase (no start/end/padding). It raises
    ``ValueError`` naming the phrase when a word cannot be tokenized (closed vocabularies).
    ``encode`` encodes whole prompts; every prompt must fit in one window, else ``ValueError``.
    """

    end_id: int
    """id of the end-of-text token (SD1 pads with it; SD2/SDXL-G pad with another id)."""

    def tokenize(self, text: str) -> list[int]: ...

    def encode(self, prompts: Sequence[str]) -> list[EncodedPrompt]: ...


SOFT_TOKEN_ID = -1
"""The id ``EmbeddingTextEncoder.encode_embeddings`` reports at the positions of continuous embeddings."""


@runtime_checkable
class EmbeddingTextEncoder(TextEncoder, Protocol):
    """Optional capability: encode prompts whose concept slot holds continuous token embeddings.

    ``word_embeddings(text)`` returns the (n, e) input embeddings of a phrase's content tokens
    (what the first text-encoder layer reads, before positions), without autograd history.
    ``encode_embeddings(templates, embeddings)`` fills each template's one ``{}`` with the k rows
    of ``embeddings`` (k, e) and encodes it like ``encode``; the returned ids hold
    ``SOFT_TOKEN_ID`` at the k soft positions and the features keep autograd history back to
    ``embeddings`` (the encoder's own weights get no gradient).
    """

    def word_embeddings(self, text: str) -> torch.Tensor: ...

    def encode_embeddings(self, templates: Sequence[str], embeddings: torch.Tensor) -> list[EncodedPrompt]: ...


@dataclass
class AttentionProbe:
    """Cross-attention probabilities of one layer in one forward pass.

    probs: (batch, heads, queries, keys) softmax probabilities, with autograd history when the
           forward ran with gradients. queries = H*W of that layer's feature map.
    height, width: the spatial size of the layer's feature map (queries = height*width).
    layer: a stable name for the cross-attention layer.
    query: (batch, heads, queries, d_head) the layer's per-head queries, or None. With them
           ``probs = softmax(query @ key^T / sqrt(d_head))``, ``key`` = the context projected by the
           weight named ``key_name`` (``context @ W^T``, no bias) and split into heads like the
           queries: what ``cached_queries`` recomputes without running the denoiser again.
    key_name: the ``kv_weights`` name of this layer's to_k weight, or None.
    """

    layer: str
    probs: torch.Tensor
    height: int
    width: int
    query: torch.Tensor | None = None
    key_name: str | None = None


@runtime_checkable
class CrossAttentionDenoiser(Protocol):
    """A denoiser whose cross-attention maps can be read (LoRA erasure training).

    ``kv_weights`` names the cross-attention ``to_k``/``to_v`` weights the LoRAs attach to.
    ``forward_with_attention`` runs one denoising forward of noisy latents ``x_t`` at integer
    timesteps ``t`` (0..num_train_timesteps-1) with text ``context`` (B, L, d); it returns the
    model output and calls ``on_attention`` for every cross-attention layer, in order.
    ``weight_transform(name, weight) -> weight`` lets the caller substitute an effective weight
    (e.g. W + up @ down) for any K/V weight during that forward, keeping autograd history.
    """

    num_train_timesteps: int

    def kv_weights(self) -> KVWeights: ...

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def forward_with_attention(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        on_attention: Callable[[AttentionProbe], None],
        weight_transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor: ...
