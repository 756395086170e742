"""Erasure methods run in toy world v2, through the same mace_ops code the ComfyUI nodes run.

A ``Task`` says what is erased and what a user would list to keep: ``kind`` "name" (anchor
``someone``) or "style" (anchor ``art``), the erased concepts (main word only — nicknames and
style synonyms stay held out, they measure generality) and a preserve list. The preserve list
is the user's "keep these" input; the benchmark evaluates specificity on a *different* set of
names/styles that no method ever sees.

Methods (each returns new K/V weights; the world's model is never modified):
* ``cfr``: MACE stage 1 alone, concept tokens included (the CFR-only erasure of the nodes).
* ``uce``: a UCE-style closed form (Gandikota et al., 2024, from the paper's description): the
  same ridge objective, but over the bare concept phrase ("{}") instead of MACE's templated
  prompts — ``argmin sum ||W c_i - W0 c*_i||^2 + sum ||W c_j - W0 c_j||^2 + lamb ||W - W0||^2``
  with c_i the phrase's token features, c*_i the anchor's, c_j the preserved phrases'.
* ``ace``: ACE-style gated low-rank null-out of the concept directions (``mace_ops.ace``); not a
  weight edit: it returns a ``GatedErasure`` (a context transform).
* ``full``: MACE — CFR (surrounding tokens) -> one LoRA per concept (attention loss, CFIS) ->
  closed-form fusion; ``cfr_lora`` is the same run with the LoRA deltas added instead of fused.
  ``mace_setting("reference")`` is the paper's stage 2/3; ``mace_setting("recommended")`` the
  pack's (``RECOMMENDED``: the CFR stage also maps the concept tokens, the caption prior joins
  every stage, each LoRA's input factor stays off the preserve set's top directions (null space,
  99% of the energy), and fusion keeps the preserve prompts at the CFR weights), chosen by ``bench/mace_variants.py`` and ``bench/mass_quality.py`` on the shipped world.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from typing import Sequence

from mace_ops.ace import ACEConfig, GatedErasure, fit_gated_erasure
from mace_ops.cfr import CFRConfig, refine_cross_attention
from mace_ops.concepts import Concept, parse_concepts, require_concepts
from mace_ops.fusion import preserve_to_for
from mace_ops.lora_file import load_concept_lora
from mace_ops.lora_train import DEFAULT_NULL_SPACE, LoraTrainConfig
from mace_ops.pipeline import PipelineSettings, run_mass_erasure
from mace_ops.prior import PriorCache
from mace_ops.templates import phrase_groups

from ..v1 import diffusion
from . import vocab

DEFAULT_LAMBDA = 0.1
DEFAULT_PRESERVE_SCALE = 1.0
DEFAULT_LORA = LoraTrainConfig(steps=50, lr=3e-3, rank=1, seed=2024, sampler="cfis", use_masks=False,
                               include_end_tokens=False)
DEFAULT_FUSION_LAMBDA = 1e-3
# The pack's recommended stage 2/3 (``full``) against the paper's (``full_ref``): what differs.
RECOMMENDED = {"lora_preserve": 0.0, "lora_null_space": DEFAULT_NULL_SPACE, "prior_weight": 1.0,
               "fusion_positions": "all", "cfr_concept_tokens": True,
               "fusion_preserve_to": "auto"}  # as the nodes: with null-space LoRAs, current for every type
REFERENCE = {"lora_preserve": 0.0, "lora_null_space": 0.0, "prior_weight": 0.0, "fusion_positions": "all",
             "cfr_concept_tokens": False, "fusion_preserve_to": "original"}
ANCHORS = {"name": vocab.NEUTRAL_NAME, "style": vocab.NEUTRAL_STYLE}
_FIXED_STYLES = (vocab.STYLES[0], vocab.STYLES[-1])


def erase_templates(kind: str) -> tuple[str, ...]:
    """The templated prompts ('{}' = concept) MACE's stages use: 34 for names, 22 for styles."""
    if kind == "name":
        return (tuple(t.replace("{n}", "{}") for t in vocab.NAME_TEMPLATES)
                + tuple(t.replace("{n}", "{}").replace("{st}", st) for t in vocab.NAME_STYLE_TEMPLATES
                        for st in _FIXED_STYLES))
    if kind == "style":
        return (tuple(t.replace("{st}", "{}") for t in vocab.STYLE_TEMPLATES)
                + tuple(t.replace("{n}", vocab.NEUTRAL_NAME).replace("{st}", "{}") for t in vocab.NAME_STYLE_TEMPLATES))
    raise ValueError(f"kind: {kind!r}; choose 'name' or 'style'")


@dataclass(frozen=True)
class Task:
    kind: str
    erase: tuple[str, ...]
    preserve: tuple[str, ...] = ()

    @property
    def anchor(self) -> str:
        return ANCHORS[self.kind]

    @property
    def templates(self) -> tuple[str, ...]:
        return erase_templates(self.kind)

    def concepts(self) -> list[Concept]:
        return require_concepts(parse_concepts("\n".join(self.erase)))

    def preserve_prompts(self, templated: bool = True) -> list[str]:
        """The preserve list in the erase templates (plus the anchor's own prompts)."""
        return self.preserve_groups(templated)[0]

    def preserve_groups(self, templated: bool = True) -> tuple[list[str], list[str]]:
        """(preserve prompts, the word each was filled with): ``mace_ops.ace``'s calibration groups."""
        return phrase_groups(list(self.preserve) + [self.anchor], self.templates if templated else ("{}",))


def prior_captions(world_vocab=vocab) -> list[str]:
    """The toy world's general caption prior (the analogue of the pack's everyday captions): every
    attribute caption ("a red circle at the middle", half with a style word) and the anchors'
    own templates. No name or nickname appears in it. Another world (v3) brings its own
    (``world_vocab.prior_captions``); the methods below take the world's from its model."""
    if world_vocab is not vocab:
        return world_vocab.prior_captions()
    caps = []
    for k, (c, sh, p) in enumerate((c, sh, p) for c in vocab.COLORS for sh in vocab.SHAPES for p in vocab.POSITIONS):
        caps.append(vocab.ATTRIBUTE_TEMPLATES[0].format(c=c, s=sh, p=p))
        caps.append(vocab.ATTRIBUTE_TEMPLATES[1].format(c=c, s=sh, p=p, st=vocab.STYLES[k % vocab.N_STYLES]))
    caps += [t.format(n=vocab.NEUTRAL_NAME) for t in vocab.NAME_TEMPLATES]
    caps += [t.format(st=vocab.NEUTRAL_STYLE) for t in vocab.STYLE_TEMPLATES]
    return caps


_PRIOR = PriorCache()


def prior_for(world, weight: float):
    """(moment, weight) for mace_ops' ``prior`` arguments, or None when weight is 0."""
    return (_PRIOR.moment(world.text_encoder, prior_captions(world.model.vocab)), weight) if weight > 0 else None


def cfr_erase(world, task: Task, *, lamb: float = DEFAULT_LAMBDA, preserve_scale: float = DEFAULT_PRESERVE_SCALE,
              concept_tokens: bool = True, prior_weight: float = 0.0, extra_pairs=None,
              relative_lambda: bool = False):
    return refine_cross_attention(world.text_encoder, world.kv_weights(), task.concepts(), task.templates,
                                  task.anchor, task.preserve_prompts(),
                                  CFRConfig(lamb, preserve_scale, concept_tokens, relative_lambda),
                                  prior=prior_for(world, prior_weight), extra_pairs=extra_pairs)


def uce_erase(world, task: Task, *, lamb: float = DEFAULT_LAMBDA, preserve_scale: float = DEFAULT_PRESERVE_SCALE,
              relative_lambda: bool = False):
    return refine_cross_attention(world.text_encoder, world.kv_weights(), task.concepts(), ("{}",), task.anchor,
                                  task.preserve_prompts(templated=False),
                                  CFRConfig(lamb, preserve_scale, True, relative_lambda))


def ace_erase(world, task: Task, *, config: ACEConfig = ACEConfig(), adversarial=None) -> GatedErasure:
    """ACE-style gated erasure (``mace_ops.ace``); the gate is calibrated on the preserve prompts and
    the toy caption prior (``prior_captions``), its shared floor on the preserve words as groups.
    ``adversarial``: concept index -> soft prompts."""
    prompts, groups = task.preserve_groups()
    captions = prior_captions(world.model.vocab)
    return fit_gated_erasure(world.text_encoder, task.concepts(), task.templates, task.anchor, prompts + captions,
                             config, adversarial, groups + [None] * len(captions))


def training_images(world, task: Task, n_images: int = 8, seed: int = 0):
    """``concept -> (images, None)``: what the base model draws for the concept's prompts."""
    templates = task.templates

    def make(concept: Concept):
        prompts = [templates[(7 * i) % len(templates)].replace("{}", concept.phrases[i % len(concept.phrases)])
                   for i in range(n_images)]
        return diffusion.sample(world.model, prompts, seed=seed), None

    return make


@dataclass
class MaceRun:
    fused: dict          # full MACE K/V weights
    summed: dict         # CFR + LoRA deltas added (no fusion)
    seconds: dict        # cfr / lora / fusion wall time
    lora_seconds_per_concept: float


def mace_setting(name: str, **overrides) -> dict:
    """``mace_erase`` keyword arguments for "recommended" or "reference" (+ overrides)."""
    base = dict(RECOMMENDED if name == "recommended" else REFERENCE, **overrides)
    lora = replace(DEFAULT_LORA, preserve=base.pop("lora_preserve"), null_space=base.pop("lora_null_space"))
    lora = replace(lora, **base.pop("lora", {}))
    return {"lora": lora, **base}


def mace_erase(world, task: Task, *, lamb: float = DEFAULT_LAMBDA, preserve_scale: float = DEFAULT_PRESERVE_SCALE,
               lora: LoraTrainConfig = DEFAULT_LORA, fusion_lambda: float = DEFAULT_FUSION_LAMBDA,
               fusion_preserve_scale: float = DEFAULT_PRESERVE_SCALE, fusion_positions: str = "all",
               prior_weight: float = 0.0, cfr_concept_tokens: bool = False, fusion_preserve_to: str = "original",
               lora_dir: str | None = None, relative_lambda: bool = False,
               log=lambda s: None) -> MaceRun:
    concepts = task.concepts()
    fusion_preserve_to = preserve_to_for(task.kind, fusion_preserve_to, lora.null_space > 0)
    settings = PipelineSettings(task.kind, task.anchor,
                                CFRConfig(lamb, preserve_scale, cfr_concept_tokens, relative_lambda),
                                replace(lora),
                                fusion_lambda, fusion_preserve_scale, fusion_positions, prior_weight,
                                fusion_preserve_to)
    prior = prior_for(world, prior_weight)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_mass_erasure(world.text_encoder, world.denoiser, world.kv_weights(), concepts, task.templates,
                                  settings, lora_dir or tmp, training_images(world, task), task.preserve_prompts(),
                                  None, log=log, prior_moment=prior[0] if prior else None)
        t0 = time.perf_counter()
        cfr = refine_cross_attention(world.text_encoder, world.kv_weights(), concepts, task.templates, task.anchor,
                                     task.preserve_prompts(), settings.cfr, prior=prior)
        summed = {k: v.clone() for k, v in cfr.weights.items()}
        for path in result.lora_files:
            for k, d in load_concept_lora(path).deltas().items():
                summed[k] += d.to(summed[k])
        log(f"cfr+lora sum {time.perf_counter() - t0:.1f}s")
    return MaceRun(result.weights, summed, dict(result.seconds), result.seconds.get("lora", 0.0) / len(concepts))


def preserve_and_retained(kind: str) -> tuple[Sequence[str], Sequence[str], int]:
    """The benchmark's split: (preserve list given to methods, retained set for Acc_s, max erasable)."""
    if kind == "name":
        return vocab.NAMES[100:150], vocab.NAMES[150:200], 100
    return vocab.STYLES[10:15], vocab.STYLES[15:20], 10


SPLITS = ("evaluation", "validation")


def split_names(split: str, preserve: tuple[str, ...], retained: tuple[str, ...]) -> tuple[tuple, tuple]:
    """(preserve list, retained set) of ``split``: the benchmark's own, or the validation split that
    halves its preserve list (the first half preserved, the second scored) so settings are chosen
    without the retained set."""
    if split == "evaluation":
        return preserve, retained
    half = len(preserve) // 2
    return preserve[:half], preserve[half:]


# The pack's K/V stages, run on a world whose text encoder may be edited (its features are what CFR / fusion see):
KV_STAGES = {
    "none": "the text-encoder edit alone",
    "cfr_prior": "then CFR + caption prior (erase.cfr_erase, prior_weight 1)",
    "full": "then full MACE, the pack's recommended settings (erase.mace_erase)",
}


def kv_stage(world, task: Task, stage: str):
    """K/V weights of the pack's ``stage`` fitted on ``world`` (the edited one), or None for "none"."""
    if stage == "none":
        return None
    if stage == "cfr_prior":
        return cfr_erase(world, task, prior_weight=1.0).weights
    return mace_erase(world, task, **mace_setting("recommended")).fused
