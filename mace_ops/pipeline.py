"""The whole MACE pipeline for a concept list: CFR -> one LoRA per concept -> closed-form fusion.

``run_mass_erasure`` is model agnostic: it takes a TextEncoder, a CrossAttentionDenoiser, the
original K/V weights and a ``training_data(concept) -> (latents, masks or None)`` callable.
Memory stays flat in the number of concepts: CFR and fusion stream one concept at a time
through d x d sums, and at most one group of LoRAs (``concept_batch``) is held in memory.

Resume. Every concept's LoRA is saved to ``lora_dir`` as soon as it is trained, named
``<concept>-<key>.safetensors``. The key (``resume_inputs``) covers exactly that concept's own
inputs: its phrases and anchor, the concept type (templates), the CFR settings, the preserve
prompts, the LoRA settings and how its training images are made (count, size, sampling steps,
seed: ``data_settings``); the base model is checked separately by its dtype-independent
fingerprint. To make that honest, a LoRA is trained on base + the CFR of *its own* concept (with
the shared preserve set), not on the CFR of the whole list: other concepts and the list order
are not inputs, so adding, removing or reordering concepts retrains only new or changed ones.
The list's CFR is still what fusion starts from. A damaged file in the run folder (truncated,
corrupt, NaN) is named in the log, renamed to ``*.damaged`` and retrained.

Shards. Because every LoRA file is keyed on its own inputs, several machines (ComfyUI
instances) sharing ``lora_dir`` can each train a part: with ``shard = Shard(i, n)`` a run trains
(or reuses) only the concepts at list positions p with p mod n = i and skips fusion; a final run
(no shard, or ``fuse_only=True``, which refuses to train and names any concept whose file is
missing) fuses every file. No scheduler of our own: the user starts the n runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .cfr import CFRConfig, add_concept_pairs, apply_transform, cfr_transform, refine_cross_attention
from .concepts import Concept, parse_concepts, require_concepts
from .covariance import PairStats
from .encoding_cache import cached
from .fingerprint import weights_fingerprint
from .fusion import DEFAULT_PRESERVE_TO, check_preserve_to, fuse_loras
from .interfaces import AttentionProbe, CrossAttentionDenoiser, KVWeights, TextEncoder
from .lora_file import check_lora_fits, load_concept_lora, save_concept_lora
from .lora_train import LoraJob, LoraTrainConfig, train_concept_loras
from .safe_paths import read_text_file
from .scope import apply_scope
from .validation import check_number

Progress = Callable[[int, int], None]
RESUME_VERSION = 2
TrainingData = Callable[[Concept], tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass(frozen=True)
class PipelineSettings:
    concept_type: str
    default_anchor: str = ""
    cfr: CFRConfig = CFRConfig()
    lora: LoraTrainConfig = LoraTrainConfig()
    fusion_lambda: float = 1.0
    fusion_preserve_scale: float = 1.0
    fusion_positions: str = "all"
    prior_weight: float = 0.0  # general caption prior, relative to the preserve list (needs prior_moment)
    fusion_preserve_to: str = DEFAULT_PRESERVE_TO  # "current": fusion keeps preserved prompts at the CFR weights

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Shard:
    """Concepts at list positions p with p mod count == index (index 0-based; shown as 'index+1/count')."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (isinstance(self.count, int) and isinstance(self.index, int)) or self.count < 1 \
                or not 0 <= self.index < self.count:
            raise ValueError(f"shard: {self.index + 1}/{self.count} is not one of 1/{self.count} .. "
                             f"{self.count}/{self.count}" if isinstance(self.count, int) and self.count >= 1
                             else f"shard: the shard count must be >= 1, got {self.count!r}")

    def owns(self, position: int) -> bool:
        return position % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index + 1}/{self.count}"


SHARD_HELP = "give 'i/n' (this run trains part i of n, e.g. 1/2), 'fuse' (fuse every part's files) or leave it empty"


def parse_shard(text: str) -> tuple[Shard | None, bool]:
    """The nodes' shard input -> (shard or None for all, fuse_only). '' and '1/1' mean the whole run."""
    value = (text or "").strip().lower()
    if value in ("", "all"):
        return None, False
    if value == "fuse":
        return None, True
    m = re.fullmatch(r"(\d+)\s*/\s*(\d+)", value)
    if m is None:
        raise ValueError(f"shard: {text!r} is not understood; {SHARD_HELP}")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 1 <= index <= count:
        raise ValueError(f"shard: {text!r} — the part must be 1..n and n >= 1 (e.g. 1/2 and 2/2); {SHARD_HELP}")
    return (None if count == 1 else Shard(index - 1, count)), False


@dataclass
class MassErasureResult:
    weights: KVWeights  # final K/V weights
    deltas: KVWeights  # final - original
    trained: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    lora_files: list[str] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    shard: Shard | None = None
    other_shards: list[str] = field(default_factory=list)  # concepts left to the other shards

    @property
    def fused(self) -> bool:
        """False for a shard run: it trains its part and leaves fusion to the final run."""
        return self.shard is None

    def summary(self) -> str:
        s = self.seconds
        if not self.fused:
            return (f"MACE shard {self.shard}: {len(self.trained)} LoRA(s) trained in {s.get('lora', 0):.1f}s, "
                    f"{len(self.reused)} reused; {len(self.other_shards)} concept(s) belong to the other shards. "
                    "No erasure applied: when every shard is done, run with shard 'fuse' (or empty) to fuse "
                    "all files.")
        return (
            f"MACE erased {len(self.lora_files)} concept(s): CFR {s.get('cfr', 0):.1f}s, "
            f"LoRA training {s.get('lora', 0):.1f}s ({len(self.trained)} trained, {len(self.reused)} reused from "
            f"earlier runs), fusion {s.get('fusion', 0):.1f}s."
            + (f" Damaged file(s) set aside and retrained: {', '.join(self.set_aside)}." if self.set_aside else "")
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


def load_concept_list(text: str = "", path: str = "", roots: Sequence[tuple[str, str]] = ()) -> list[Concept]:
    """Concepts from multi-line text or a .txt/.csv file (same format; errors name file and line).

    ``path`` is resolved only inside ``roots`` ((label, folder) pairs; default: the current
    folder) by ``safe_paths.read_text_file``: no absolute paths, no '..', size capped.
    """
    if path:
        roots = list(roots) or [("the current folder", os.getcwd())]
        name, text = read_text_file(path, roots, "concept_file")
        return require_concepts(parse_concepts(text, name), name)
    return require_concepts(parse_concepts(text, "concepts"), "concepts")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "concept"


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def resume_inputs(concept: Concept, settings: PipelineSettings, templates: Sequence[str],
                  preserve_prompts: Sequence[str], data_settings: Mapping | None = None,
                  prior_digest: str | None = None) -> dict:
    """Everything one concept's LoRA depends on, besides the base model (checked by fingerprint).

    The LoRA is trained on base + the concept's *own* CFR (its pairs, the shared preserve set),
    so neither the other concepts nor the list order are inputs: adding, removing or reordering
    concepts reuses every other concept's LoRA.
    """
    anchor = settings.default_anchor if concept.anchor is None else concept.anchor
    return {
        "version": RESUME_VERSION,
        "phrases": list(concept.phrases),
        "anchor": anchor,
        "concept_type": settings.concept_type,
        "templates": _digest(list(templates)),
        "cfr": dataclasses.asdict(settings.cfr),
        "preserve": _digest(list(preserve_prompts)),
        "lora": settings.lora.settings(),
        "training_data": dict(data_settings or {}),
        **({"prior": prior_digest} if prior_digest and settings.prior_weight > 0 else {}),
    }


def moment_digest(moment: torch.Tensor) -> str:
    """sha256 (16 hex) of a prior moment's float64 bytes: what the resume key records of the prior."""
    return hashlib.sha256(moment.to(torch.float64).contiguous().numpy().tobytes()).hexdigest()[:16]


def settings_key(concept: Concept, settings: PipelineSettings, templates: Sequence[str] = (),
                 preserve_prompts: Sequence[str] = (), data_settings: Mapping | None = None,
                 prior_digest: str | None = None) -> str:
    """The resume key: sha256 of ``resume_inputs`` (16 hex digits)."""
    return _digest(resume_inputs(concept, settings, templates, preserve_prompts, data_settings, prior_digest))[:16]


def lora_file_name(concept: Concept, key: str) -> str:
    return f"{slug(concept.name)}-{key[:12]}.safetensors"


def set_aside(path: str) -> str:
    """Rename a damaged file to ``<name>.damaged[-n]`` (never loaded again, kept for inspection)."""
    target, n = path + ".damaged", 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.damaged-{n}"
    os.replace(path, target)
    return target


def _reusable(path: str, key: str, original: KVWeights, log: Callable[[str], None],
              aside: list[str]) -> bool:
    """True when ``path`` is a readable, finite LoRA with ``key`` for this base model.

    A damaged file (truncated, corrupt, NaN) is named in the log, set aside and retrained."""
    if not os.path.isfile(path):
        return False
    name = os.path.basename(path)
    try:
        lora = load_concept_lora(path)
    except ValueError as err:  # truncated, corrupt, NaN, not a concept LoRA: unusable
        moved = set_aside(path)
        aside.append(os.path.basename(moved))
        log(f"[mace] {err}; set aside as {os.path.basename(moved)} and retrained")
        return False
    try:
        check_lora_fits(lora, original, name, original)
    except ValueError as err:  # made for another base model or architecture: retrained (and replaced)
        log(f"[mace] not reused: {err}")
        return False
    return lora.info.get("resume_key") == key


def own_cfr_weights(encoder: TextEncoder, original: KVWeights, concept: Concept, templates: Sequence[str],
                    settings: PipelineSettings, preserve: PairStats) -> KVWeights:
    """base + the CFR of this concept alone (with the shared preserve set): what its LoRA trains on."""
    anchor = settings.default_anchor if concept.anchor is None else concept.anchor
    own = PairStats(preserve.dim)
    add_concept_pairs(own, encoder, concept, templates, anchor, settings.cfr.concept_tokens)
    own.P, own.n_preserve = preserve.P, preserve.n_preserve
    M, _ = cfr_transform(own, settings.cfr)
    weights, _ = apply_transform(original, {own.dim: M})
    return weights


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
    data_settings: Mapping | None = None,
    erase_from=None,
    preserve_phrases: Sequence[str] = (),
    prior_moment: torch.Tensor | None = None,
    shard: Shard | None = None,
    fuse_only: bool = False,
    concept_batch: int = 8,
) -> MassErasureResult:
    """CFR of the whole list -> one LoRA per concept (reused when its own inputs are unchanged) -> fusion.

    ``progress(done, total)`` and ``should_stop()`` are called at least once per concept while
    encoding (CFR), before every LoRA step and once per concept during fusion, so a caller that
    raises from either stops the run within one concept's encoding or one training step.
    ``data_settings`` describes how ``training_data`` makes its images (count, size, seed, ...):
    it is part of every resume key. ``erase_from`` restricts every stage to the concepts in that
    context (``scope.apply_scope``); ``preserve_phrases`` are the user's preserve list for it.
    ``prior_moment`` (``prior.PriorCache``) is the general caption prior, weighted by
    ``settings.prior_weight`` in CFR, the LoRAs' preservation term and fusion. ``shard`` and
    ``fuse_only``: see the module docstring (a shard of count 1 is the whole run). On the
    cached-query path up to ``concept_batch`` LoRAs train together (``train_concept_loras``; equal
    to training them in turn within float tolerance) and are saved when their group is done.
    """
    check_number(concept_batch, "concept_batch", 1, None, integer=True)
    if shard is not None and fuse_only:
        raise ValueError("shard: a shard run trains its part and a fuse-only run trains nothing; choose one")
    shard = None if shard is None or shard.count == 1 else shard
    settings.cfr.validate()
    settings.lora.validate()
    encoder = cached(encoder)  # CFR, own-CFR, LoRA training and fusion encode the same prompts
    check_number(settings.fusion_lambda, "fusion_lambda", 0.0, 1e12)
    check_number(settings.fusion_preserve_scale, "preserve_scale", 0.0, 1e12)
    check_number(settings.prior_weight, "prior_weight", 0.0, 1e6)
    check_preserve_to(settings.fusion_preserve_to)  # before any training, not after it
    if settings.prior_weight > 0 and prior_moment is None:
        raise ValueError("prior_weight > 0 needs the general prior (prior_moment); set prior_weight to 0")
    prior = (prior_moment, settings.prior_weight) if settings.prior_weight > 0 else None
    prior_digest = moment_digest(prior_moment) if prior else None  # once, not per concept
    if erase_from:
        concepts, extra = apply_scope(concepts, erase_from, templates, settings.default_anchor, preserve_phrases)
        preserve_prompts = list(preserve_prompts) + extra
    n = len(concepts)
    steps = settings.lora.steps
    total = n + n * steps + n + 1  # CFR encoding per concept, every training step, fusion per concept, solve
    done = 0

    def report(value: int) -> None:
        nonlocal done
        done = value
        if should_stop is not None and should_stop():
            raise InterruptedError("mass erasure stopped")
        if progress:
            progress(done, total)

    result = MassErasureResult({}, {}, shard=shard)
    t0 = time.perf_counter()
    cfr = refine_cross_attention(encoder, original, concepts, templates, settings.default_anchor,
                                 preserve_prompts, settings.cfr, lambda k, _t: report(min(k, n)), prior=prior)
    result.seconds["cfr"] = time.perf_counter() - t0
    report(n)
    refined = cfr.weights
    base_fp = weights_fingerprint(original)
    preserve = PairStats(cfr.stats.dim)
    preserve.P, preserve.n_preserve = cfr.stats.P, cfr.stats.n_preserve
    os.makedirs(lora_dir, exist_ok=True)
    moment = preserve.P / preserve.n_preserve if preserve.n_preserve else None

    t1 = time.perf_counter()
    missing: list[str] = []
    pending: list[tuple[Concept, str, str]] = []  # (concept, key, path) waiting for their group
    group_size = concept_batch if settings.lora.path == "cached_queries" else 1  # full path: one file at a time
    slots = 0  # concepts whose LoRA stage is over (progress)

    def train_group() -> None:
        nonlocal slots
        base, jobs = n + slots * steps, []
        for concept, _key, _path in pending:
            own = own_cfr_weights(encoder, original, concept, templates, settings, preserve)
            report(base)
            latents, masks = training_data(concept)
            jobs.append(LoraJob(OverrideDenoiser(denoiser, own), concept, latents, masks))
        g = len(jobs)
        trained = train_concept_loras(jobs, encoder, templates, settings.lora,
                                      lambda step, _t: report(base + step * g), should_stop, preserve_moment=moment)
        for (concept, key, path), one in zip(pending, trained):
            info = {**one.info(), "resume_key": key, "concept_type": settings.concept_type,
                    "resume_inputs": resume_inputs(concept, settings, templates, preserve_prompts, data_settings,
                                                   prior_digest)}
            save_concept_lora(path, one.lora, base_fp, info)
            result.trained.append(concept.name)
            result.seconds["lora_train"] = result.seconds.get("lora_train", 0.0) + one.seconds
            log(f"[mace] {concept.name}: loss {one.losses[0]:.3f} -> {one.losses[-1]:.3f} in {one.seconds:.1f}s"
                + (f" (trained with {g - 1} other concept(s))" if g > 1 else ""))
        slots += g
        pending.clear()

    for i, concept in enumerate(concepts):
        key = settings_key(concept, settings, templates, preserve_prompts, data_settings, prior_digest)
        path = os.path.join(lora_dir, lora_file_name(concept, key))
        result.lora_files.append(path)
        if shard is not None and not shard.owns(i):
            result.other_shards.append(concept.name)
        elif _reusable(path, key, original, log, result.set_aside):
            result.reused.append(concept.name)
            log(f"[mace] {concept.name}: reusing {os.path.basename(path)}")
        elif fuse_only:
            missing.append(concept.name)
        else:
            pending.append((concept, key, path))
            if len(pending) == group_size:
                train_group()
            continue
        slots += 1
        report(n + slots * steps)
    if pending:
        train_group()
    result.seconds["lora"] = time.perf_counter() - t1
    if missing:
        raise ValueError(f"shard 'fuse': no finished LoRA for {len(missing)} concept(s) in {lora_dir}: "
                         f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; run every shard with the "
                         "same inputs first (or leave shard empty to train what is missing)")
    if shard is not None:
        report(total)
        return result

    t2 = time.perf_counter()
    fuse_base = n + n * steps
    stream = ((c, load_concept_lora(p).factors) for c, p in zip(concepts, result.lora_files))
    fused = fuse_loras(encoder, refined, original, stream, templates, preserve_prompts,
                       settings.fusion_lambda, settings.fusion_preserve_scale,
                       lambda k, _t: report(fuse_base + min(k, n)), total=n, positions=settings.fusion_positions,
                       preserve_stats=preserve,  # CFR's preserve set, prior included: not encoded again
                       preserve_to=settings.fusion_preserve_to)
    result.seconds["fusion"] = time.perf_counter() - t2
    report(total)
    result.weights = fused.weights
    result.deltas = {k: (fused.weights[k].double() - original[k].double().to(fused.weights[k].device)).float()
                     for k in original}
    return result
