"""A per-run memo of text encodings: each distinct prompt is encoded once while it stays recent.

A mass erasure encodes the same prompts many times: every concept's CFR pairs re-encode the
anchor's templated prompts (one anchor, N concepts), each LoRA's own-CFR step and its training
encode the concept's prompts again, and fusion encodes them and the preserve prompts once more.
``CachedTextEncoder`` wraps any ``TextEncoder``: ``encode`` looks every prompt up in a bounded
LRU (``max_prompts``; features are (L, d) per prompt, so the bound caps memory — 512 prompts of
77 x 768 float32 are 120 MB) and encodes only the missing ones, in one call, in their order.
Results are the wrapped encoder's, bit for bit; wrapping twice does not nest. ``remember`` seeds the
memo with encodings made elsewhere (e.g. cached calibration captions); anything else (an
``EmbeddingTextEncoder``'s ``word_embeddings`` / ``encode_embeddings``) passes through to the
wrapped encoder, uncached.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from .interfaces import EncodedPrompt, TextEncoder

DEFAULT_MAX_PROMPTS = 512


class CachedTextEncoder:
    def __init__(self, inner: TextEncoder, max_prompts: int = DEFAULT_MAX_PROMPTS):
        self.inner = inner.inner if isinstance(inner, CachedTextEncoder) else inner
        self.max_prompts = int(max_prompts)
        self.end_id = self.inner.end_id
        self._memo: OrderedDict[str, EncodedPrompt] = OrderedDict()
        self.hits = self.misses = 0

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (during construction or unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def tokenize(self, text: str) -> list[int]:
        return self.inner.tokenize(text)

    def remember(self, prompts: Sequence[str], encoded: Sequence[EncodedPrompt]) -> None:
        """Put ``encoded[i]`` in the memo as the encoding of ``prompts[i]`` (newest last, bound kept)."""
        if len(prompts) != len(encoded):
            raise ValueError(f"remember: {len(prompts)} prompts for {len(encoded)} encodings")
        for p, enc in zip(prompts, encoded):
            self._memo[p] = enc
            self._memo.move_to_end(p)
        while len(self._memo) > self.max_prompts:
            self._memo.popitem(last=False)

    def encode(self, prompts: Sequence[str]) -> list[EncodedPrompt]:
        prompts = list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._memo))
        fresh = dict(zip(missing, self.inner.encode(missing))) if missing else {}
        out = []
        for p in prompts:
            if p in fresh:
                enc = fresh[p]
            else:
                enc = self._memo[p]
                self._memo.move_to_end(p)
            out.append(enc)
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        for p, enc in fresh.items():
            self._memo[p] = enc
            self._memo.move_to_end(p)
        while len(self._memo) > self.max_prompts:
            self._memo.popitem(last=False)
        return out


def cached(encoder: TextEncoder, max_prompts: int = DEFAULT_MAX_PROMPTS) -> CachedTextEncoder:
    """``encoder`` wrapped in a fresh per-run memo (an already wrapped one keeps its memo)."""
    return encoder if isinstance(encoder, CachedTextEncoder) else CachedTextEncoder(encoder, max_prompts)
