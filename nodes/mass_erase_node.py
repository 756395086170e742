"""Node ``MACE Mass Erase``: the whole MACE pipeline from a concept list, resumable.

CFR on every concept at once -> for each concept: images from the original model, VAE encode,
a LoRA trained on the CFR model and saved at once (a later run with the same base model,
concept and settings reuses the file, so an interrupted 100-concept run resumes) -> closed-form
fusion of all LoRAs. One progress bar covers the run; the summary says what was done.

``shard`` "i/n" splits the LoRA stage over n ComfyUI instances that share the output folder
(same inputs on each): run i trains its part and outputs the model unchanged; a last run with
shard "fuse" (or empty) fuses every file (``mace_ops.pipeline``, Shards).
"""
from __future__ import annotations

from functools import partial
import logging
import os

import comfy.model_management
from . import presets
from .comfy_compat import advanced, io

from ..mace_ops.cfr import CFRConfig, refine_cross_attention
from ..mace_ops.concepts import check_disjoint, normalise_phrase, parse_concepts
from ..mace_ops.fusion import PRESERVE_TO, preserve_to_for
from ..mace_ops.lora_train import (DEFAULT_LORA_PRESERVE, DEFAULT_NULL_SPACE, DEFAULT_QUERY_SAMPLES, DEFAULTS_BY_TYPE,
                                   OBJECTIVES, PATH_CHOICES, PATH_TOOLTIP, config_for, training_path)
from ..mace_ops.pipeline import PipelineSettings, load_concept_list, parse_shard, run_mass_erasure
from ..mace_ops.scope import parse_erase_from
from ..mace_ops.work import WorkEstimate, announce, encodes_for
from .cfr_node import RELATIVE_TOOLTIP, preserve_phrases, preserve_prompts
from .comfy_denoiser import ComfyDenoiser
from .comfy_model import apply_erasure, effective_kv_weights
from .comfy_text_encoder import ComfyTextEncoder
from .concept_inputs import concept_inputs
from .fusion_node import PRESERVE_TO_TOOLTIP
from .lora_train_node import CONCEPT_TYPES, concept_templates, encode_images
from .paths import run_folder, text_roots
from .prior_input import DEFAULT_PRIOR_WEIGHT, TOOLTIP, prior_for
from .progress import NodeProgress
from .training_images_node import (DEFAULT_CFG, DEFAULT_SCHEDULER, concept_prompts, default_sampler,
                                   sample_images)
from .validation import check_inputs


NODE_ID = "MaceMassErase"
_default = partial(presets.default, NODE_ID)


LORA_OFF = "off"
LORA_CHOICES = (LORA_OFF, *PATH_CHOICES)
OFF_TOOLTIP = ("off = skip the LoRA stage (and fusion): CFR with the caption prior only, no images, seconds -- "
               "the 'recommended' preset's choice, because the stage bought no quality in either toy world "
               "(docs/decisions.md, 'Defaults in two worlds'); preset 'paper' runs it. ")


def _cfr_only(model, clip, parsed, templates, anchor, keep, cfr, prior_weight, erase_from, preserve, concept_type,
              shard, settings_line):
    """Mass Erase with its LoRA stage off: the CFR stage alone (what fusion would start from)."""
    if shard:
        raise ValueError(f"shard: {shard!r} splits the LoRA stage, which lora_training 'off' skips; clear shard "
                         "or choose lora_training 'auto'")
    encoder = ComfyTextEncoder(clip)
    original = effective_kv_weights(model)
    announce("MACE Mass Erase (LoRA stage off)", WorkEstimate(len(parsed), encodes_for(parsed, len(templates),
                                                                                        len(keep), anchor)))
    result = refine_cross_attention(encoder, original, parsed, templates, anchor, keep, cfr,
                                    NodeProgress(len(parsed) + 1), erase_from=erase_from or None,
                                    preserve_phrases=preserve_phrases(preserve),
                                    prior=prior_for(encoder, float(prior_weight)))
    info = {"method": "cfr", "concepts": [list(c.phrases) for c in parsed], "concept_type": concept_type,
            "anchor": anchor, "lora_stage": "off", "lambda": cfr.lamb, "relative_lambda": cfr.relative_lambda,
            "preserve_scale": cfr.preserve_scale, "erase_concept_tokens": cfr.concept_tokens,
            "prior_weight": float(prior_weight)}
    if parse_erase_from(erase_from):
        info["erase_from"] = list(parse_erase_from(erase_from))
    out = apply_erasure(model, dict(result.deltas), original, info)
    summary = (f"Mass Erase, LoRA stage off: CFR erased {len(parsed)} concept(s) in {result.seconds:.2f}s "
               f"({result.stats.n_pairs} token pairs, {result.stats.n_preserve} preserve tokens, condition "
               f"{max(result.condition.values()):.3g}); no images, no LoRAs, no fusion. lora_training 'auto' "
               "(or preset 'paper') runs the LoRA stage.\n" + settings_line)
    logging.info(summary)
    return io.NodeOutput(out, summary, ui={"text": [summary]})


class MaceMassErase(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        c = concept_inputs(concepts_default="",
                           concepts_tooltip="The names (or styles, objects) to erase, one per line, synonyms comma "
                           "separated; 1 to 1,000 lines (or use concept_file). Each line costs one LoRA: minutes "
                           "per concept on a GPU.",
                           type_options=CONCEPT_TYPES, type_default="person",
                           type_tooltip="Chooses the prompt templates and the LoRA defaults: person (names), style, "
                           "object, nudity.",
                           anchor_default="a person",
                           anchor_tooltip="What every concept becomes ('a person' for names, 'art' for styles); "
                           "a line's own '-> anchor' wins.",
                           preserve_tooltip="Concepts to keep unchanged, one per line (look-alikes, other names you "
                           "still want); they join CFR's, the LoRAs' and fusion's preserve set.",
                           builtin_tooltip="Also preserve a built-in set of 20 everyday prompts (leave on).")
        return io.Schema(
            node_id="MaceMassErase",
            display_name="MACE Mass Erase",
            category="MACE",
            description="Runs MACE for a list of concepts: by default (preset 'recommended') the closed-form "
            "refinement (CFR) with the caption prior alone, in seconds, because the LoRA stage bought no quality "
            "in either toy world; preset 'paper' adds one LoRA per concept, trained on images the model draws "
            "itself and kept under loras/mace_mass/<run_name>/ (re-queueing resumes), and their closed-form "
            "fusion. Use it for the paper's pipeline or a long concept file; for many names MACE Gated Erasure "
            "(ACE) measured best.",
            inputs=[
                io.Model.Input("model", tooltip="The model to erase from (SD1.x, SD2.x or SDXL family: the LoRA "
                               "stage needs UNet cross-attention)."),
                io.Clip.Input("clip", tooltip="The CLIP used for sampling with this model (same clip skip)."),
                io.Vae.Input("vae", tooltip="Encodes the images the model draws for each concept's LoRA."),
                c["concepts"],
                advanced(io.String.Input("concept_file", default="",
                                         tooltip="Optional .txt/.csv file in ComfyUI's input (or output) folder, "
                                         "same format; overrides 'concepts'. Names are relative to that folder; "
                                         "absolute paths and '..' are refused. Applies under every preset.")),
                c["concept_type"], c["anchor"], c["preserve"], c["builtin_preserve"],
                io.String.Input("run_name", default="mass_erase",
                                tooltip="Folder name under loras/mace_mass/ for this run's LoRAs; the same name "
                                "(and inputs) resumes a run, a new name starts afresh."),
                advanced(io.Float.Input("cfr_lambda", default=_default("cfr_lambda"), min=0.0, max=1e6, step=0.1,
                                        tooltip="CFR's ridge toward the original weights; larger = gentler. With "
                                        "relative_lambda on (default) in mean token energies (0.1 measured best "
                                        "over both toy worlds); off: the paper's raw units.")),
                advanced(io.Float.Input("preserve_scale", default=_default("preserve_scale"), min=0.0, max=1e6, step=0.1,
                                        tooltip="Weight of the preserve prompts in CFR and fusion; raise it (1-10) "
                                        "when kept names change.")),
                advanced(io.Int.Input("lora_steps", default=_default("lora_steps"), min=0, max=10000,
                                      tooltip="Training steps per LoRA; 0 = the type's default (50; 120 for "
                                      "nudity). 20-200 is the useful range.")),
                advanced(io.Float.Input("lora_lr", default=_default("lora_lr"), min=0.0, max=1.0, step=1e-5,
                                        tooltip="LoRA learning rate; 0 = the type's default (1e-4 names/styles, "
                                        "1e-5 objects/nudity). Stay within 1e-5 to 1e-3.")),
                advanced(io.Int.Input("images_per_concept", default=_default("images_per_concept"), min=1, max=64,
                                      tooltip="Images the model draws per concept for its LoRA (4-16; cost grows "
                                      "with it).")),
                advanced(io.Int.Input("image_size", default=512, min=64, max=2048, step=64,
                                      tooltip="Side of those images: 512 for SD1.x, 768 SD2.x, 1024 SDXL. Applies "
                                      "under every preset.")),
                advanced(io.Int.Input("sampling_steps", default=_default("sampling_steps"), min=1, max=200,
                                      tooltip="Sampler steps per training image (dpmpp_2m karras, cfg 7.5); 15-30.")),
                advanced(io.Int.Input("seed", default=2024, min=0, max=0xFFFFFFFFFFFFFFFF,
                                      tooltip="Fixes the images and the LoRA training draws (same seed, same "
                                      "LoRAs). Applies under every preset.")),
                advanced(io.Float.Input("fusion_lambda", default=_default("fusion_lambda"), min=0.0, max=1e6, step=1e-3,
                                        tooltip="Fusion's ridge toward the incoming weights (1e-4 to 1e-2; "
                                        "larger = weaker LoRAs).")),
                advanced(io.String.Input("erase_from", default="", optional=True,
                                         tooltip="Scope: erase only in this context (e.g. 'car'). CFR remaps the "
                                         "context tokens, each LoRA trains on images/prompts of the concept in the "
                                         "context, and fusion keeps the concept in other contexts and the context's "
                                         "other variants (crossed with 'preserve'). Empty = everywhere. Applies "
                                         "under every preset.")),
                advanced(io.Combo.Input("objective", options=list(OBJECTIVES), default=_default("objective"),
                                        optional=True,
                                        tooltip="LoRA-stage objective: attention = MACE (the concept's words lose "
                                        "their attention mass); trajectory = ANT-style (keep the early denoising "
                                        "steps, reverse the guidance direction for the concept after t'=500; no "
                                        "anchor needed).")),
                advanced(io.Float.Input("lora_preserve", default=_default("lora_preserve"), min=0.0, max=1e6, step=0.5,
                                        optional=True,
                                        tooltip="Keeps each LoRA from changing the K/V of preserved text (preserve "
                                        "list, built-in prompts, general prior). 0 = the paper's LoRA stage (the "
                                        "default: in the toy world a weight of 3-10 kept more but erased much "
                                        "less).")),
                advanced(io.Boolean.Input("erase_concept_tokens", default=_default("erase_concept_tokens"), optional=True,
                                          tooltip="CFR also remaps the concept's own tokens (on = the pack's "
                                          "measured best; off = the paper, which leaves them to the LoRAs).")),
                advanced(io.Float.Input("prior_weight", default=_default("prior_weight"), min=0.0, max=1e6, step=0.1,
                                        optional=True, tooltip=TOOLTIP)),
                advanced(io.Combo.Input("lora_training", options=list(LORA_CHOICES), default=_default("lora_training"),
                                        optional=True, tooltip=OFF_TOOLTIP + PATH_TOOLTIP)),
                advanced(io.Int.Input("query_samples", default=_default("query_samples"), min=0, max=100000,
                                      optional=True,
                                      tooltip="cached_queries: training samples per concept whose queries are "
                                      "recorded (one UNet forward each); 0 = one per LoRA step. 4-50.")),
                advanced(io.String.Input("shard", default="", optional=True,
                                         tooltip="Split the LoRA stage over several ComfyUI instances sharing the "
                                         "output folder: 'i/n' trains part i of n (concepts i, i+n, ...; the model "
                                         "is passed on unchanged); 'fuse' (or empty, which also trains what is "
                                         "missing) fuses every part's files. Same inputs on every instance. Applies "
                                         "under every preset.")),
                advanced(io.Combo.Input("fusion_preserve_to", options=["auto", *PRESERVE_TO],
                                        default=_default("fusion_preserve_to"), optional=True,
                                        tooltip=PRESERVE_TO_TOOLTIP)),
                advanced(io.Float.Input("lora_null_space", default=_default("lora_null_space"), min=0.0, max=0.9999,
                                        step=0.01, optional=True,
                                        tooltip="Keeps each LoRA off the directions of preserved text (preserve "
                                        "list, built-in prompts, general prior) that hold this share of their "
                                        "feature energy, so the LoRAs cannot change those prompts and fusion "
                                        "cannot trade them away. 0 = the paper's LoRA stage; 0.9-0.999 on. With "
                                        "it on, the LoRA cannot change the end/padding tokens either (they are "
                                        "in every preserved prompt).")),
                presets.preset_input(NODE_ID),
                # after the preset, so that workflows saved before it keep their widgets' order
                advanced(io.Boolean.Input("relative_lambda", default=_default("relative_lambda"), optional=True,
                                          tooltip=RELATIVE_TOOLTIP)),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The erased model (CFR + fused LoRAs as weight "
                                     "patches); connect it to a sampler or MACE Save Erasure."),
                     io.String.Output(display_name="summary", tooltip="What was done, where the LoRAs are, and "
                                      "every setting used.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, concepts, concept_file, concept_type, anchor, preserve, builtin_preserve,
                run_name, cfr_lambda, preserve_scale, lora_steps, lora_lr, images_per_concept, image_size,
                sampling_steps, seed, fusion_lambda, erase_from="", objective="attention",
                lora_preserve=DEFAULT_LORA_PRESERVE, prior_weight=DEFAULT_PRIOR_WEIGHT,
                erase_concept_tokens=True, lora_training="auto", query_samples=DEFAULT_QUERY_SAMPLES,
                shard="", fusion_preserve_to="auto", lora_null_space=DEFAULT_NULL_SPACE,
                relative_lambda=False, preset=presets.CUSTOM) -> io.NodeOutput:
        check_inputs(cls, locals())
        given = dict(locals())
        tuned = presets.resolve(NODE_ID, preset, given)
        cfr_lambda, preserve_scale, fusion_lambda = tuned["cfr_lambda"], tuned["preserve_scale"], tuned["fusion_lambda"]
        lora_steps, lora_lr, objective = tuned["lora_steps"], tuned["lora_lr"], tuned["objective"]
        images_per_concept, sampling_steps = tuned["images_per_concept"], tuned["sampling_steps"]
        lora_preserve, lora_null_space = tuned["lora_preserve"], tuned["lora_null_space"]
        erase_concept_tokens, prior_weight = tuned["erase_concept_tokens"], tuned["prior_weight"]
        lora_training, query_samples = tuned["lora_training"], tuned["query_samples"]
        fusion_preserve_to = tuned["fusion_preserve_to"]
        settings_line = presets.settings_text(tuned, {
            "concept_type": concept_type, "anchor": anchor, "builtin_preserve": builtin_preserve,
            "run_name": run_name, "image_size": int(image_size), "seed": int(seed), "erase_from": erase_from,
            "concept_file": concept_file.strip(), "shard": shard})
        fusion_preserve_to = preserve_to_for(concept_type, fusion_preserve_to, lora_null_space > 0)
        settings_line += f"\nfusion_preserve_to {tuned['fusion_preserve_to']!r} ran as {fusion_preserve_to!r}"
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: unknown {objective!r}; choose one of {list(OBJECTIVES)}")
        part, fuse_only = parse_shard(shard)
        parsed = load_concept_list(concepts, concept_file.strip(), text_roots())
        templates = concept_templates(concept_type)
        defaults = DEFAULTS_BY_TYPE[concept_type]
        lora_off = lora_training == LORA_OFF
        lora = config_for(concept_type, steps=int(lora_steps) or defaults.steps, lr=float(lora_lr) or defaults.lr,
                          seed=int(seed), use_masks=False, objective=objective, preserve=float(lora_preserve),
                          path=training_path("auto" if lora_off else lora_training, objective),
                          query_samples=int(query_samples),
                          null_space=float(lora_null_space))
        lora.validate()
        anchor = normalise_phrase(anchor)
        check_disjoint(parsed, parse_concepts(preserve, "preserve", allow_anchor=False))
        cfr = CFRConfig(cfr_lambda, preserve_scale, bool(erase_concept_tokens), bool(tuned["relative_lambda"]))
        settings = PipelineSettings(concept_type, anchor, cfr, lora, fusion_lambda, preserve_scale,
                                    prior_weight=float(prior_weight), fusion_preserve_to=fusion_preserve_to)
        keep = preserve_prompts(preserve, templates, builtin_preserve)
        if lora_off:
            return _cfr_only(model, clip, parsed, templates, anchor, keep, cfr, prior_weight, erase_from, preserve,
                             concept_type, shard, settings_line)
        folder = run_folder(run_name)
        n, images = len(parsed), len(parsed) * int(images_per_concept)
        announce("MACE Mass Erase", WorkEstimate(  # CFR and fusion each encode the prompts; one LoRA per concept
            n, 2 * encodes_for(parsed, len(templates), len(keep), anchor), solves=2, images=images,
            denoise_steps=images * int(sampling_steps), train_steps=n * lora.steps))
        encoder = ComfyTextEncoder(clip)
        original = effective_kv_weights(model)  # an unsupported model family is refused before any work
        prior = prior_for(encoder, float(prior_weight))
        for field, value in (("lora_preserve", lora_preserve), ("lora_null_space", lora_null_space)):
            if value > 0 and not keep and prior is None:
                raise ValueError(f"{field} > 0 needs something to preserve: turn builtin_preserve on, fill "
                                 f"'preserve', raise prior_weight, or set {field} to 0")
        sampler = default_sampler()

        def training_data(concept):
            prompts = concept_prompts(concept, templates, int(images_per_concept))
            images = sample_images(model, clip, vae, prompts, int(sampling_steps), DEFAULT_CFG, int(seed),
                                   int(image_size), int(image_size), sampler, DEFAULT_SCHEDULER, "")
            return encode_images(vae, model, images), None

        data_settings = {"images": int(images_per_concept), "size": int(image_size), "steps": int(sampling_steps),
                         "cfg": DEFAULT_CFG, "sampler": sampler, "scheduler": DEFAULT_SCHEDULER, "seed": int(seed)}
        n_eff = len(parsed) * max(1, len(parse_erase_from(erase_from)))  # scoped concepts
        denoiser = ComfyDenoiser(model, backward=lora.path == "full")
        try:
            result = run_mass_erasure(
                encoder, denoiser, original, parsed, templates, settings, folder, training_data, keep,
                NodeProgress(2 * n_eff + n_eff * lora.steps + 1),
                comfy.model_management.throw_exception_if_processing_interrupted, logging.info, data_settings,
                erase_from=erase_from or None, preserve_phrases=preserve_phrases(preserve),
                prior_moment=prior[0] if prior else None, shard=part, fuse_only=fuse_only)
        finally:
            denoiser.release()
        if not result.fused:  # a shard: its LoRAs are on disk, fusion is the final run's
            summary = result.summary() + f"\nLoRAs in {folder}\n" + settings_line
            logging.info(summary)
            return io.NodeOutput(model, summary, ui={"text": [summary]})
        info = {"method": "mace", "concepts": [list(c.phrases) for c in parsed], "concept_type": concept_type,
                "anchor": anchor, "settings": settings.as_dict(), "loras": [os.path.basename(p) for p in
                                                                           result.lora_files]}
        if parse_erase_from(erase_from):
            info["erase_from"] = list(parse_erase_from(erase_from))
        out = apply_erasure(model, result.deltas, original, info)
        summary = result.summary() + f"\nLoRAs in {folder}\n" + settings_line
        return io.NodeOutput(out, summary, ui={"text": [summary]})
