"""Adapter: SD3's conditioning as one segmented prompt per text (``EncodedPrompt.segments``).

ComfyUI's SD3 text encoder gives, per prompt, CLIP-L|CLIP-G's 77 positions (concatenated, padded
with zeros to 4096) followed by T5-XXL's positions (at least 77), and ``context_embedder`` reads all
of them. CFR must pair CLIP positions by CLIP's token ids and T5 positions by T5's, so each prompt
comes back as two windows: (77, CLIP length) then (T5 window, T5 length). A CLIP without T5 (or with
T5 only) gives the one window it has. Prompts are encoded in batches as ``ComfyTextEncoder`` does:
ComfyUI concatenates the batch's CLIP windows, then the batch's T5 windows, along the sequence.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..mace_ops.interfaces import EncodedPrompt
from .comfy_text_encoder import ComfyTextEncoder

T5_END = 1  # T5's end token (its tokenizer has no start token; it pads with 0)


class SD3TextEncoder(ComfyTextEncoder):
    def __init__(self, clip, **kw):
        super().__init__(clip, key="l", **kw)
        csm = clip.cond_stage_model
        self.has_clip = getattr(csm, "clip_l", None) is not None or getattr(csm, "clip_g", None) is not None
        self.has_t5 = getattr(csm, "t5xxl", None) is not None
        if not (self.has_clip or self.has_t5):
            raise ValueError("clip: this SD3 text encoder has neither CLIP nor T5 loaded; load its text encoders")

    @staticmethod
    def _t5_length(ids: list[int]) -> int:
        return ids.index(T5_END) + 1 if T5_END in ids else len(ids)

    def encode(self, prompts: Sequence[str]) -> list[EncodedPrompt]:
        out: list[EncodedPrompt] = []
        for i in range(0, len(prompts), self.batch_size):
            if self.check_interrupt is not None:
                self.check_interrupt()
            token_lists = [self._tokens(p) for p in prompts[i: i + self.batch_size]]
            merged = {k: [t[k][0] for t in token_lists] for k in token_lists[0]}
            cond = self.clip.encode_from_tokens(merged)[0].to(torch.float32)
            clip_rows = [len(t["l"][0]) if self.has_clip else 0 for t in token_lists]
            t5_rows = [len(t["t5xxl"][0]) if self.has_t5 else 0 for t in token_lists]
            if cond.shape[0] != sum(clip_rows) + sum(t5_rows):
                raise ValueError(f"clip: SD3 conditioning has {cond.shape[0]} positions, expected "
                                 f"{sum(clip_rows) + sum(t5_rows)}; connect ComfyUI's SD3 text encoder")
            at = {"l": 0, "t5xxl": sum(clip_rows)}  # where each part's rows of this batch start
            for tokens, nc, nt in zip(token_lists, clip_rows, t5_rows):
                ids, feats, segments = [], [], []
                for part, rows in (("l", nc), ("t5xxl", nt)):
                    if not rows:
                        continue
                    window = [int(t[0]) for t in tokens[part][0]]
                    ids += window
                    feats.append(cond[at[part]: at[part] + rows])
                    segments.append((rows, self._length(window) if part == "l" else self._t5_length(window)))
                    at[part] += rows
                out.append(EncodedPrompt(tuple(ids), segments[0][1], torch.cat(feats).clone(), tuple(segments)))
        return out
