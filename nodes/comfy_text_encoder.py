"""Adapter: a ComfyUI CLIP object as a ``mace_ops`` TextEncoder.

Prompts are tokenized with ComfyUI's own tokenizer (prompt weights disabled) and encoded with the
CLIP exactly as sampling will see it (same clip-skip layer), so the features are the ones the
cross-attention K/V projections read. Many prompts are encoded in one batched forward by passing
their windows as the chunks of one token list; ComfyUI encodes chunks independently and
concatenates them. SDXL's two encoders give concatenated features, as its UNet reads them.

Every batch is an interrupt point (``comfy.model_management.throw_exception_if_processing_interrupted``):
encoding is the longest loop of CFR and fusion (60 prompts per concept and phrase pair), so
Cancel acts after at most one batch of ``batch_size`` (8) prompts, not one concept.

**Continuous embeddings** (``EmbeddingTextEncoder``, for the soft-prompt attack and ACE's
adversarial refit). ComfyUI's own textual-inversion path does the work: a tensor in a token list
in place of a token id is taken as that position's input embedding (``SDClipModel.process_tokens``),
so a template's ``{}`` slot is filled with k placeholder words, tokenized by ComfyUI's tokenizer
(start, end and padding as for any prompt), and the k placeholder entries are replaced by the k
embedding rows; ``clip.encode_from_tokens`` then runs exactly as for ``encode`` (same layer, same
clip skip, same concatenation). The embedding width e is the sum over the text encoders whose
features are concatenated: SD1 768 (CLIP-L), SD2 1024 (OpenCLIP-H), SDXL 768 + 1280 = 2048 (the
first 768 columns go to CLIP-L, the rest to bigG; ``word_embeddings`` concatenates the same way).
For gradients to reach the embeddings through ComfyUI's encoder, which was written for inference,
two things are scoped to the call (restored after it): every LayerNorm gets a copy of its input
(the encoder layers add to their input in place after the norm has saved it, ``x += attn(ln(x))``),
and every weight is read through a per-call copy (the weights of a checkpoint loaded in a prompt
are inference tensors, which autograd cannot save). A dynamic-VRAM CLIP (newer ComfyUI on NVIDIA)
rebuilds its weight functions at every load, so gradients run through its legacy-patcher copy
(``comfy_compat.static_clip``) instead.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

import comfy.model_management

from ..mace_ops.interfaces import SOFT_TOKEN_ID, EncodedPrompt
from ..mace_ops.templates import check_templates
from .comfy_compat import static_clip
from .comfy_denoiser import _plain

PLACEHOLDER = "a"  # one CLIP token, also next to punctuation: marks the soft slot before it is replaced


class ComfyTextEncoder:
    def __init__(self, clip, batch_size: int = 8,
                 check_interrupt: Callable[[], None] | None = comfy.model_management.throw_exception_if_processing_interrupted,
                 key: str | None = None):
        """``key``: the tokenizer whose ids describe the features (default CLIP-L's "l" where there is one;
        FLUX's conditioning is T5's: "t5xxl")."""
        if clip is None:
            raise ValueError("clip: no CLIP connected; connect the CLIP output of your checkpoint loader")
        self.clip = clip
        self.batch_size = batch_size
        self.check_interrupt = check_interrupt
        keys = sorted(clip.tokenize("a", disable_weights=True).keys())
        if key is not None and key not in keys:
            raise ValueError(f"clip: this text encoder has no {key!r} tokenizer (it has {keys}); connect the CLIP "
                             "of this checkpoint")
        self.key = key or ("l" if "l" in keys else keys[0])
        sub = getattr(clip.tokenizer, f"clip_{self.key}", None) or getattr(clip.tokenizer, self.key, None)
        if sub is None or getattr(sub, "end_token", None) is None:
            raise ValueError("clip: this text encoder has no end token; MACE supports CLIP-based models (SD1.x, SD2.x, SDXL)")
        self.end_id = int(sub.end_token)
        self.start_id = getattr(sub, "start_token", None)
        self._windows: dict = {}
        self._static = None

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

    # ------------------------------------------------------------------ EmbeddingTextEncoder

    def _parts(self, clip=None) -> list[tuple[str, torch.nn.Module]]:
        """[(token key, SDClipModel)] of ``clip`` (default: this encoder's) in the order their
        features are concatenated."""
        csm = (clip or self.clip).cond_stage_model
        name = getattr(csm, "clip", None)
        if isinstance(name, str) and isinstance(getattr(csm, name, None), torch.nn.Module):
            parts = [(csm.clip_name, getattr(csm, name))]
        elif isinstance(getattr(csm, "clip_l", None), torch.nn.Module) and isinstance(getattr(csm, "clip_g", None),
                                                                                         torch.nn.Module):
            parts = [("l", csm.clip_l), ("g", csm.clip_g)]                     # SDXL: cat([l, g], -1)
        else:
            parts = []
        if not parts or any(not hasattr(sub, "transformer") for _, sub in parts):
            raise ValueError("clip: this text encoder cannot take continuous embeddings (the soft-prompt attack and "
                             "the adversarial refit need them); supported: SD1.x, SD2.x, SDXL")
        return parts

    def require_embeddings(self) -> None:
        """ValueError naming the supported families unless this CLIP can take continuous embeddings."""
        self._parts()

    @staticmethod
    def _width(sub) -> int:
        return int(sub.transformer.get_input_embeddings().weight.shape[1])

    def _content(self, text: str, key: str) -> list[int]:
        ids = [int(t[0]) for t in self._tokens(text)[key][0]]
        start = 1 if ids and ids[0] == self.start_id else 0
        return ids[start: self._length(ids) - 1]

    def word_embeddings(self, text: str) -> torch.Tensor:
        """(n, e) float32 input embeddings of the phrase's tokens (SDXL: CLIP-L's, then bigG's)."""
        self.clip.load_model()
        rows = []
        for key, sub in self._parts():
            emb = sub.transformer.get_input_embeddings()
            ids = torch.tensor([self._content(text, key)], dtype=torch.long, device=emb.weight.device)
            with torch.inference_mode(False), torch.no_grad():
                rows.append(emb(ids, out_dtype=torch.float32)[0].to("cpu").clone())
        if len({r.shape[0] for r in rows}) != 1:
            raise ValueError(f"clip: the text encoders tokenize {text!r} differently")
        return torch.cat(rows, dim=-1)

    def _soft_window(self, template: str, k: int) -> tuple[dict, int]:
        """(ComfyUI token lists of the template with k placeholders in its slot, index of the first)."""
        key = (template, k)
        cache = self._windows
        if key in cache:
            return cache[key]
        pre, post = template.split("{}")
        tokens = self._tokens(pre + " ".join([PLACEHOLDER] * k) + post)
        starts = set()
        for part, _sub in self._parts():
            ids = [int(t[0]) for t in tokens[part][0]]
            first = 1 if ids and ids[0] == self.start_id else 0
            head, tail, mark = self._content(pre, part), self._content(post, part), self._content(PLACEHOLDER, part)
            content = ids[first: self._length(ids) - 1]
            if len(mark) != 1 or content != head + mark * k + tail:
                raise ValueError(f"template {template!r}: the words around '{{}}' do not tokenize on their own; put "
                                 "spaces around '{}'")
            starts.add(first + len(head))
        if len(starts) != 1:
            raise ValueError(f"template {template!r}: the text encoders place the slot differently")
        cache[key] = (tokens, starts.pop())
        return cache[key]

    def _grad_clip(self):
        """The CLIP that gradients run through: this one, or its legacy-patcher copy when it is a
        dynamic-VRAM CLIP (which rebuilds weight functions at every load, dropping the per-call copies)."""
        if self._static is None:
            self._static = static_clip(self.clip)
        return self._static

    @contextlib.contextmanager
    def _autograd_safe(self, parts):
        """Scoped to one call: LayerNorms read a copy of their input, weights a per-call copy (see the docstring)."""
        hooks, saved = [], []
        copy_input = lambda _m, args: (args[0].clone(),) + tuple(args[1:])  # noqa: E731
        try:
            for _key, sub in parts:
                for m in sub.transformer.modules():
                    if isinstance(m, torch.nn.LayerNorm):
                        hooks.append(m.register_forward_pre_hook(copy_input))
                    for attr in ("weight_function", "bias_function"):
                        if hasattr(m, attr):
                            mine = list(getattr(m, attr)) + [_plain]
                            saved.append((m, attr, m.__dict__.get(attr), mine))
                            setattr(m, attr, mine)
            yield
        finally:
            for h in hooks:
                h.remove()
            for m, attr, old, mine in reversed(saved):
                if m.__dict__.get(attr) is mine:
                    if old is None:
                        delattr(m, attr)
                    else:
                        setattr(m, attr, old)

    def encode_embeddings(self, templates: Sequence[str], embeddings: torch.Tensor) -> list[EncodedPrompt]:
        parts = self._parts()
        widths = [self._width(sub) for _, sub in parts]
        if embeddings.ndim != 2 or embeddings.shape[1] != sum(widths) or embeddings.shape[0] < 1:
            raise ValueError(f"embeddings: expected (k, {sum(widths)}) for this CLIP, got {tuple(embeddings.shape)}")
        templates = list(templates)
        check_templates(templates)
        if any(t.count("{}") != 1 for t in templates):
            raise ValueError("templates: each needs exactly one '{}'")
        k = int(embeddings.shape[0])
        columns = dict(zip([key for key, _ in parts], torch.split(embeddings.float(), widths, dim=1)))
        grad = torch.is_grad_enabled() and embeddings.requires_grad
        clip = self._grad_clip() if grad else self.clip
        if clip is not self.clip:
            parts = self._parts(clip)
        clip.load_model()
        out: list[EncodedPrompt] = []
        for i in range(0, len(templates), self.batch_size):
            if self.check_interrupt is not None:
                self.check_interrupt()
            merged, rows = {}, []
            for t in templates[i: i + self.batch_size]:
                tokens, start = self._soft_window(t, k)
                for key, window in tokens.items():
                    window = list(window[0])
                    if key in columns:
                        window[start: start + k] = [(columns[key][j], 1.0) for j in range(k)]
                    merged.setdefault(key, []).append(window)
                ids = [int(x[0]) for x in tokens[self.key][0]]
                n = self._length(ids)
                ids[start: start + k] = [SOFT_TOKEN_ID] * k
                rows.append((ids, n))
            with self._autograd_safe(parts) if grad else contextlib.nullcontext():
                cond = clip.encode_from_tokens(merged)
            window = len(rows[0][0])
            feats = cond.reshape(len(rows), window, cond.shape[-1]).to(torch.float32)
            for (ids, n), f in zip(rows, feats):
                out.append(EncodedPrompt(tuple(ids), n, f if grad else f.clone()))
        return out
