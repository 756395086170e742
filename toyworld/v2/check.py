"""The erasure check in toy world v2: the base model judges images, the scorer knows the truth.

What ``MACE Erasure Check`` does in ComfyUI, on the toy world's prompt sets (``evaluate.prompt_sets``):
every image is judged by ``mace_ops.diffusion_classifier`` with the *base* model, among the
candidates a user would list — the erased concepts, the kept ones and the anchor (``candidates``).
Each image keeps its own prompt as the template: the word that named the concept (main word,
nickname or style synonym) is replaced by each candidate's main word in turn (``judge_inputs``).
``check_accuracy`` is the fraction of a set judged to show its own concept, next to the scorer's
identity (names) or style (styles) accuracy on the same images.
"""
from __future__ import annotations

from dataclasses import dataclass
import time
from typing import Sequence

import torch

from mace_ops.diffusion_classifier import JudgeConfig, Judgement, classify
from mace_ops.erasure_check import judge_table
from ..v1 import diffusion
from . import erase, scorer, vocab
from .evaluate import DEFAULT_CFG, DEFAULT_STEPS, PromptSet


def candidates(kind: str, erased: Sequence[str], kept: Sequence[str]) -> list[str]:
    """The judge's candidate words: the anchor first, then the erased and kept concepts (main words)."""
    return [erase.ANCHORS[kind]] + list(dict.fromkeys(list(erased) + list(kept)))


def _slot(prompt: str, index: dict) -> tuple[str, str]:
    """(template with '{}' where the concept's word was, that word) of a prompt."""
    words = prompt.split()
    for i, w in enumerate(words):
        if w in index:
            return " ".join(words[:i] + ["{}"] + words[i + 1:]), w
    raise ValueError(f"prompt {prompt!r} names no concept")


def judge_inputs(world, pset: PromptSet, kind: str, cands: Sequence[str]):
    """(contexts (U, L, d), table (N, K), labels (N,)) for ``classify``: image i, candidate k -> its prompt."""
    index = vocab.NAME_INDEX if kind == "name" else vocab.STYLE_INDEX
    main = vocab.NAMES if kind == "name" else vocab.STYLES
    slots = [_slot(p, index) for p in pset.prompts]
    texts, table, labels = judge_table([t for t, _ in slots], [main[index[w]] for _, w in slots], cands)
    return diffusion.encode_prompts(world.model, texts), table, labels


@dataclass
class SetCheck:
    images: torch.Tensor        # (N, 3, 32, 32)
    judgement: Judgement
    truth: torch.Tensor         # (N,) bool: the scorer sees the prompt's concept
    seconds: float              # judging time

    @property
    def check_accuracy(self) -> float:
        return self.judgement.recognised.double().mean().item()

    @property
    def scorer_accuracy(self) -> float:
        return self.truth.double().mean().item()


def check_set(world, pset: PromptSet, kind: str, cands: Sequence[str], config: JudgeConfig = JudgeConfig(), *,
              model=None, kv_weights=None, context_transform=None, judge=None) -> SetCheck:
    """Sample ``pset`` (with ``model``/``kv_weights``/``context_transform``: the erased model; default
    the world's), score it, and judge it with ``judge`` (default the world's own, the base model)."""
    images = diffusion.sample(model or world.model, pset.prompts, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG,
                              seed=pset.seed,
                              kv_weights=kv_weights, context_transform=context_transform)
    s = scorer.score(world.probe, images)
    truth = s["identity"] == pset.identities if kind == "name" else s["style"] == pset.styles
    contexts, table, labels = judge_inputs(judge or world, pset, kind, cands)
    t0 = time.perf_counter()
    j = classify((judge or world).denoiser, images, contexts, table, labels, config, keep=(0,))
    return SetCheck(images, j, truth, time.perf_counter() - t0)

