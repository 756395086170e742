"""Adapter: a ComfyUI CLIP object as a ``mace_ops`` TextEncoder.

Prompts are tokenized with ComfyUI's own tokenizer (prompt weights disabled) and encoded with the
CLIP exactly as sampling will see it (same clip-skip layer), so the features are the ones the
cross-attention K/V projections read. Many prompts are encoded in one batched forward by passing
their windows as the chunks of one token list; ComfyUI encodes chunks independently and
concatenates them. SDXL's two encoders give concatenated features, as its UNet reads them.

Every batch is an interrupt point (``comfy.model_management.throw_exception_if_processing_interrupted``):
encoding is the longest loop of CFR and fusion (60 prompts per concept and phrase pair), so
Cancel acts after at most one batch of ``batch_size`` (8) prompts, not one concept.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

import comfy.model_management

from ..mace_ops.interfaces import EncodedPrompt


class ComfyTextEncoder:
    def __init__(self, clip, batch_size: int = 8,
                 check_interrupt: Callable[[], None] | None = comfy.model_management.throw_exception_if_processing_interrupted):
        if clip is None:
            raise ValueError("clip: no CLIP connected; connect the CLIP output of your checkpoint loader")
        self.clip = clip
        self.batch_size = batch_size
        self.check_interrupt = check_interrupt
        keys = sorted(clip.tokenize("a", disable_weights=True).keys())
        self.key = "l" if "l" in keys else keys[0]
        sub = getattr(clip.tokenizer, f"clip_{self.key}", None) or getattr(clip.tokenizer, self.key, None)
        if sub is None or getattr(sub, "end_token", None) is None:
            raise ValueError("clip: this text encoder has no end token; MACE supports CLIP-based models (SD1.x, SD2.x, SDXL)")
        self.end_id = int(sub.end_token)
        self.start_id = getattr(sub, "start_token", None)

    def _tokens(self, text: str) -> dict:
        tokens = self.clip.tokenize(text, disable_weights=True)
        if any(len(chunks) != 1 for chunks in tokens.values()):
            raise ValueError(f"prompt longer than one 77-token window: {text[:60]!r}...; shorten it")
        return tokens

    def _length(self, ids: list[int]) -> int:
        first = 1 if ids and ids[0] == self.start_id else 0
        for i in range(first, len(ids)):
            if ids[i] == self.end_id:
                return i + 1
        return len(ids)

    def tokenize(self, text: str) -> list[int]:
        ids = [int(t[0]) for t in self._tokens(text)[self.key][0]]
        length = self._length(ids)
        start = 1 if ids and ids[0] == self.start_id else 0
        return ids[start : length - 1]

    def encode_pooled(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, d) pooled embeddings, float32, as CLIPTextEncode hands them to sampling (SDXL: the
        OpenCLIP-bigG projection).  One forward per prompt: ComfyUI returns only the first
        chunk's pooled output of a batched call."""
        out = []
        for i, text in enumerate(prompts):
            if self.check_interrupt is not None and i % self.batch_size == 0:
                self.check_interrupt()
            _cond, pooled = self.clip.encode_from_tokens(self._tokens(text), return_pooled=True)
            if pooled is None:
                raise ValueError("clip: this text encoder gives no pooled embedding")
            out.append(pooled.reshape(-1).to(torch.float32))
        return torch.stack(out)

    def encode(self, prompts: Sequence[str]) -> list[EncodedPrompt]:
        out: list[EncodedPrompt] = []
        for i in range(0, len(prompts), self.batch_size):
            if self.check_interrupt is not None:
                self.check_interrupt()
            part = list(prompts[i : i + self.batch_size])
            token_lists = [self._tokens(p) for p in part]
            merged = {k: [t[k][0] for t in token_lists] for k in token_lists[0]}
            cond = self.clip.encode_from_tokens(merged)
            window = len(merged[self.key][0])
            feats = cond.reshape(len(part), window, cond.shape[-1]).to(torch.float32)
            for tokens, f in zip(token_lists, feats):
                ids = tuple(int(t[0]) for t in tokens[self.key][0])
                out.append(EncodedPrompt(ids, self._length(list(ids)), f.clone()))
        return out
