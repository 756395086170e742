"""Run MACE erasures in the toy world: the same mace_ops code the ComfyUI nodes run.

* ``cfr_erase``: CFR only, with the toy templates, the neutral anchor ``any`` and the other
  colours as preserve prompts.
* ``mace_erase``: the full pipeline (CFR -> one LoRA per concept -> closed-form fusion), or with
  ``fuse=False`` CFR plus the LoRA deltas simply added (the "CFR + LoRA" row of the benchmark).
  LoRA training images are sampled from the toy model itself for the concept's prompts, as MACE
  generates its training images with the model being edited; masks are optional ("none": whole
  image, "attention": derived from the model's own cross-attention on the concept tokens).
The base model is never modified; results are new K/V weight dicts.
"""
from __future__ import annotations

import dataclasses
import tempfile


from mace_ops.cfr import CFRConfig, CFRResult, refine_cross_attention
from mace_ops.concepts import Concept, parse_concepts, require_concepts
from mace_ops.fusion import DEFAULT_PRESERVE_TO
from mace_ops.lora_file import load_concept_lora
from mace_ops.lora_train import LoraTrainConfig, attention_masks
from mace_ops.pipeline import MassErasureResult, PipelineSettings, run_mass_erasure
from . import diffusion, vocab
from .templates import ANCHOR_WORD, ERASE_TEMPLATES, colour_of, preserve_prompts

DEFAULT_LAMBDA = 0.1
DEFAULT_PRESERVE_SCALE = 1.0
DEFAULT_LORA = LoraTrainConfig(steps=50, lr=3e-3, rank=1, seed=2024, sampler="cfis", use_masks=False,
                               include_end_tokens=False)


def erased_words(concepts_text: str) -> list[str]:
    return [p for c in parse_concepts(concepts_text) for p in c.phrases]


def _concepts_and_preserve(concepts_text: str, preserve_scale: float):
    concepts = require_concepts(parse_concepts(concepts_text))
    words = [p for c in concepts for p in c.phrases]
    return concepts, (preserve_prompts(words) if preserve_scale > 0 else [])


def cfr_erase(world, concepts_text: str, *, lamb: float = DEFAULT_LAMBDA,
              preserve_scale: float = DEFAULT_PRESERVE_SCALE, anchor: str = ANCHOR_WORD,
              concept_tokens: bool = True) -> CFRResult:
    """CFR alone; ``concept_tokens`` also maps the concept's own tokens (CFR-only erasure)."""
    concepts, keep = _concepts_and_preserve(concepts_text, preserve_scale)
    return refine_cross_attention(world.text_encoder, world.kv_weights(), concepts, ERASE_TEMPLATES, anchor,
                                  keep, CFRConfig(lamb, preserve_scale, concept_tokens))


def training_data(world, n_images: int = 8, seed: int = 0, mask_mode: str = "none", kv_weights=None):
    """``concept -> (images, masks or None)``: images the base model draws for the concept."""
    if mask_mode not in ("none", "attention"):
        raise ValueError(f"mask_mode: {mask_mode!r}; choose 'none' or 'attention'")

    def make(concept: Concept):
        prompts = [ERASE_TEMPLATES[(7 * i) % len(ERASE_TEMPLATES)].format(concept.phrases[i % len(concept.phrases)])
                   for i in range(n_images)]
        images = diffusion.sample(world.model, prompts, seed=seed)
        if mask_mode == "none":
            return images, None
        masks = attention_masks(world.denoiser, world.text_encoder, concept, ERASE_TEMPLATES, images, seed=seed)
        return images, masks

    return make


def mace_erase(world, concepts_text: str, *, lamb: float = DEFAULT_LAMBDA,
               preserve_scale: float = DEFAULT_PRESERVE_SCALE, lora: LoraTrainConfig = DEFAULT_LORA,
               fusion_lambda: float = 1e-3, fusion_preserve_scale: float = DEFAULT_PRESERVE_SCALE,
               mask_mode: str = "none", fuse: bool = True, lora_dir: str | None = None,
               concept_tokens: bool = False, fusion_preserve_to: str = DEFAULT_PRESERVE_TO,
               progress=None) -> MassErasureResult:
    concepts, keep = _concepts_and_preserve(concepts_text, preserve_scale)
    lora = dataclasses.replace(lora, use_masks=mask_mode != "none")
    settings = PipelineSettings("toy", ANCHOR_WORD, CFRConfig(lamb, preserve_scale, concept_tokens), lora,
                                fusion_lambda, fusion_preserve_scale, fusion_preserve_to=fusion_preserve_to)
    data = training_data(world, mask_mode=mask_mode)
    with tempfile.TemporaryDirectory() as tmp:
        folder = lora_dir or tmp
        result = run_mass_erasure(world.text_encoder, world.denoiser, world.kv_weights(), concepts, ERASE_TEMPLATES,
                                  settings, folder, data, keep, progress, log=lambda s: None)
        if not fuse:  # CFR + plain sum of the LoRA deltas, for comparison with fusion
            cfr = refine_cross_attention(world.text_encoder, world.kv_weights(), concepts, ERASE_TEMPLATES,
                                         ANCHOR_WORD, keep, settings.cfr)
            weights = {k: v.clone() for k, v in cfr.weights.items()}
            for path in result.lora_files:
                for k, d in load_concept_lora(path).deltas().items():
                    weights[k] += d.to(weights[k])
            base = world.kv_weights()
            result.weights = weights
            result.deltas = {k: weights[k] - base[k] for k in base}
    return result


# Scope restriction (erase_from) in the toy world: the colour word goes before the shape in the
# first two caption forms ("a red circle in ...") and after it in the third ("a circle that is
# red on ..."), so the shape context is given both ways and the templates hold the rest.
SCOPE_TEMPLATES: tuple[str, ...] = tuple(
    t for st in vocab.STYLES for t in (f"a {{}} in {st} style", f"{st} style picture of a {{}}",
                                       f"a {{}} on {st} background"))


def shape_contexts(shape: str) -> list[str]:
    """The erase_from contexts of a shape: ``["circle", "circle that is {}"]``."""
    return [shape, f"{shape} that is {{}}"]


def scoped_cfr_erase(world, concepts_text: str, shape: str, *, lamb: float = DEFAULT_LAMBDA,
                     preserve_scale: float = DEFAULT_PRESERVE_SCALE, anchor: str = ANCHOR_WORD,
                     concept_tokens: bool = True) -> CFRResult:
    """CFR with ``erase_from`` = one shape: the colour is erased from that shape only. The preserve
    phrases are the other colours and the other shapes (both caption forms); mace_ops crosses them
    with the concept and the shape (``red square``, ``square that is red``, ``blue circle``)."""
    concepts = require_concepts(parse_concepts(concepts_text))
    words = [p for c in concepts for p in c.phrases]
    gone = {colour_of(w) for w in words}
    keep_phrases = [c for c in vocab.COLORS if c not in gone]
    for s in vocab.SHAPES:
        if s != shape:
            keep_phrases += shape_contexts(s)
    return refine_cross_attention(world.text_encoder, world.kv_weights(), concepts, SCOPE_TEMPLATES, anchor,
                                  (), CFRConfig(lamb, preserve_scale, concept_tokens),
                                  erase_from=shape_contexts(shape), preserve_phrases=keep_phrases)
