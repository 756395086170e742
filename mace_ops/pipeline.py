"""The whole MACE pipeline for a concept list: CFR -> one LoRA per concept -> closed-form fusion.

``run_mass_erasure`` is model agnostic: it takes a TextEncoder, a CrossAttentionDenoiser, the
original K/V weights and a ``training_data(concept) -> (latents, masks or None)`` callable.
Every concept's LoRA is saved to ``lora_dir`` as soon as it is trained; a later run with the
same base model, concept and settings finds that file and skips the training, so an
interrupted 100-concept run resumes where it stopped. Memory stays flat in the number of
concepts: CFR and fusion stream one concept at a time through d x d sums, and only one LoRA is
held in memory at a time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .cfr import CFRConfig, refine_cross_attention
from .concepts import Concept, parse_concepts, require_concepts
from .erasure_file import weights_fingerprint
from .fusion import fuse_loras
from .interfaces import AttentionProbe, CrossAttentionDenoiser, KVWeights, TextEncoder
from .lora_file import load_concept_lora, save_concept_lora
from .lora_train import LoraTrainConfig, train_concept_lora
from .scope import apply_scope

Progress = Callable[[int, int], None]
TrainingData = Callable[[Concept], tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass(frozen=True)
class PipelineSettings:
    concept_type: str
    default_anchor: str = ""
    cfr: CFRConfig = CFRConfig()
    lora: LoraTrainConfig = LoraTrainConfig()
    fusion_lambda: float = 1.0
    fusion_preserve_scale: float = 1.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MassErasureResult:
    weights: KVWeights  # final K/V weights
    deltas: KVWeights  # final - original
    trained: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    lora_files: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        s = self.seconds
        return (
            f"MACE erased {len(self.lora_files)} concept(s): CFR {s.get('cfr', 0):.1f}s, "
            f"LoRA training {s.get('lora', 0):.1f}s ({len(self.trained)} trained, {len(self.reused)} reused from "
            f"earlier runs), fusion {s.get('fusion', 0):.1f}s."
        )


class OverrideDenoiser:
    """A denoiser whose K/V weights are replaced by ``weights`` (e.g. the CFR result) on every call."""

    def __init__(self, inner: CrossAttentionDenoiser, weights: KVWeights):
        self.inner, self.weights = inner, weights
        self.num_train_timesteps = inner.num_train_timesteps

    def kv_weights(self) -> KVWeights:
        return self.weights

    def add_noise(self, x0, noise, t):
        return self.inner.add_noise(x0, noise, t)

    def forward_with_attention(self, x_t, t, context, on_attention: Callable[[AttentionProbe], None],
                               weight_transform=None):
        def transform(name: str, w: torch.Tensor) -> torch.Tensor:
            base = self.weights[name].to(device=w.device, dtype=w.dtype) if name in self.weights else w
            return weight_transform(name, base) if weight_transform is not None else base

        return self.inner.forward_with_attention(x_t, t, context, on_attention, transform)


def load_concept_list(text: str = "", path: str = "") -> list[Concept]:
    """Concepts from multi-line text or a .txt/.csv file (same format; errors name file and line)."""
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"concept_file: {path} not found")
        with open(path, encoding="utf-8") as f:
            return require_concepts(parse_concepts(f.read(), os.path.basename(path)), os.path.basename(path))
    return require_concepts(parse_concepts(text, "concepts"), "concepts")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "concept"


def settings_key(concept: Concept, settings: PipelineSettings, base_fingerprint: str) -> str:
    payload = {"concept": list(concept.phrases), "lora": settings.lora.settings(),
               "type": settings.concept_type, "base": base_fingerprint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _reusable(path: str, key: str) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        return load_concept_lora(path).info.get("resume_key") == key
    except ValueError:
        return False


def run_mass_erasure(
    encoder: TextEncoder,
    denoiser: CrossAttentionDenoiser,
    original: KVWeights,
    concepts: Sequence[Concept],
    templates: Sequence[str],
    settings: PipelineSettings,
    lora_dir: str,
    training_data: TrainingData,
    preserve_prompts: Sequence[str] = (),
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] = print,
    erase_from=None,
    preserve_phrases: Sequence[str] = (),
) -> MassErasureResult:
    if erase_from:
        concepts, extra = apply_scope(concepts, erase_from, templates, settings.default_anchor, preserve_phrases)
        preserve_prompts = list(preserve_prompts) + extra
    n = len(concepts)
    steps = settings.lora.steps
    total = 1 + n * steps + 1  # CFR, every training step, fusion
    done = 0

    def tick(k: int = 1) -> None:
        nonlocal done
        done += k
        if progress:
            progress(done, total)

    result = MassErasureResult({}, {})
    t0 = time.perf_counter()
    cfr = refine_cross_attention(encoder, original, concepts, templates, settings.default_anchor,
                                 preserve_prompts, settings.cfr)
    result.seconds["cfr"] = time.perf_counter() - t0
    tick()
    refined = cfr.weights
    base_fp = weights_fingerprint(refined)
    trainer = OverrideDenoiser(denoiser, refined)
    os.makedirs(lora_dir, exist_ok=True)

    t1 = time.perf_counter()
    for i, concept in enumerate(concepts):
        key = settings_key(concept, settings, base_fp)
        path = os.path.join(lora_dir, f"{i + 1:03d}-{slug(concept.name)}-{key[:8]}.safetensors")
        result.lora_files.append(path)
        if _reusable(path, key):
            result.reused.append(concept.name)
            log(f"[mace] {concept.name}: reusing {os.path.basename(path)}")
            tick(steps)
            continue
        latents, masks = training_data(concept)
        base_done = done

        def step_progress(step: int, _total: int, base_done=base_done) -> None:
            nonlocal done
            done = base_done + step
            if progress:
                progress(done, total)

        trained = train_concept_lora(trainer, encoder, concept, templates, latents, masks, settings.lora,
                                     step_progress, should_stop)
        info = {**trained.info(), "resume_key": key, "concept_type": settings.concept_type}
        save_concept_lora(path, trained.lora, base_fp, info)
        result.trained.append(concept.name)
        log(f"[mace] {concept.name}: loss {trained.losses[0]:.3f} -> {trained.losses[-1]:.3f} "
            f"in {trained.seconds:.1f}s")
    result.seconds["lora"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    stream = ((c, load_concept_lora(p).factors) for c, p in zip(concepts, result.lora_files))
    fused = fuse_loras(encoder, refined, original, stream, templates, preserve_prompts,
                       settings.fusion_lambda, settings.fusion_preserve_scale, total=n)
    result.seconds["fusion"] = time.perf_counter() - t2
    tick()
    result.weights = fused.weights
    result.deltas = {k: (fused.weights[k].double() - original[k].double().to(fused.weights[k].device)).float()
                     for k in original}
    return result
