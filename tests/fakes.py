"""Tiny random-weight stand-ins for a text encoder and K/V weights (no ComfyUI, no downloads).

``FakeTextEncoder`` mimics SD1 CLIP's layout: start token, words, end token, padding with end
tokens, and a causal mix so that a word's information leaks into every later position (the
situation CFR addresses). Words outside its vocabulary raise ValueError, like a closed vocabulary.
"""
from __future__ import annotations

import torch

from mace_ops.interfaces import EncodedPrompt
from mace_ops.templates import GENERIC_PRESERVE_PROMPTS, OBJECT_TEMPLATES, PERSON_TEMPLATES, STYLE_TEMPLATES

EXTRA_WORDS = (
    "ship boat vessel car automobile cat dog ground sky street person art woman man red green blue "
    "van gogh picasso monet style cow horse vincent painting photo wearing clothes nudity naked"
)


def _vocabulary() -> list[str]:
    words = set(EXTRA_WORDS.split())
    for text in OBJECT_TEMPLATES + PERSON_TEMPLATES + STYLE_TEMPLATES + GENERIC_PRESERVE_PROMPTS:
        words.update(text.replace("{}", " ").replace("'s", " 's").split())
    return ["<sos>", "<eot>"] + sorted(words)


class FakeTextEncoder:
    def __init__(self, dim: int = 32, window: int = 24, seed: int = 0, multi_token: dict[str, list[str]] | None = None):
        g = torch.Generator().manual_seed(seed)
        self.vocab = {w: i for i, w in enumerate(_vocabulary())}
        self.sos_id, self.end_id = self.vocab["<sos>"], self.vocab["<eot>"]
        self.window, self.dim = window, dim
        self.embed = torch.randn(len(self.vocab), dim, generator=g, dtype=torch.float64)
        self.pos = 0.3 * torch.randn(window, dim, generator=g, dtype=torch.float64)
        self.mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
        self.multi_token = multi_token or {}

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for word in text.replace("'s", " 's").split():
            for piece in self.multi_token.get(word, [word]):
                if piece not in self.vocab:
                    raise ValueError(f"unknown word {piece!r} in {text!r}")
                ids.append(self.vocab[piece])
        return ids

    def encode(self, prompts):
        out = []
        for prompt in prompts:
            content = self.tokenize(prompt)
            if len(content) + 2 > self.window:
                raise ValueError(f"prompt too long for one window: {prompt!r}")
            ids = [self.sos_id] + content + [self.end_id] * (self.window - len(content) - 1)
            x = self.embed[ids] + self.pos
            counts = torch.arange(1, self.window + 1, dtype=torch.float64)[:, None]
            causal = torch.cumsum(x, 0) / counts  # position i sees tokens 0..i
            feats = torch.layer_norm(x + torch.tanh(causal @ self.mix), (self.dim,))
            out.append(EncodedPrompt(tuple(ids), len(content) + 2, feats.to(torch.float32)))
        return out


def fake_kv_weights(dim: int = 32, outs=(16, 24, 16), seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for i, c in enumerate(outs):
        for kind in ("to_k", "to_v"):
            weights[f"block.{i}.attn2.{kind}.weight"] = torch.randn(c, dim, generator=g) / dim**0.5
    return weights
