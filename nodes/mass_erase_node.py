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

import logging
import os

import comfy.model_management
from .comfy_compat import io

from ..mace_ops.cfr import CFRConfig
from ..mace_ops.concepts import check_disjoint, normalise_phrase, parse_concepts
from ..mace_ops.fusion import PRESERVE_TO, preserve_to_for
from ..mace_ops.lora_train import (DEFAULT_LORA_PRESERVE, DEFAULT_NULL_SPACE, DEFAULT_QUERY_SAMPLES, DEFAULTS_BY_TYPE,
                                   OBJECTIVES, PATH_CHOICES, PATH_TOOLTIP, config_for, training_path)
from ..mace_ops.pipeline import PipelineSettings, load_concept_list, parse_shard, run_mass_erasure
from ..mace_ops.scope import parse_erase_from
from ..mace_ops.work import WorkEstimate, announce, encodes_for
from .cfr_node import preserve_phrases, preserve_prompts
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


class MaceMassErase(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        c = concept_inputs(concepts_default="",
                           concepts_tooltip="One concept per line, synonyms comma separated (or use concept_file).",
                           type_options=CONCEPT_TYPES, type_default="person", type_tooltip=None,
                           anchor_default="a person", anchor_tooltip=None)
        return io.Schema(
            node_id="MaceMassErase",
            display_name="MACE Mass Erase",
            category="MACE",
            description="Runs CFR, one LoRA per concept (images made by the model itself) and closed-form fusion "
            "for a list of concepts. Finished concepts are kept in a folder named after run_name under "
            "loras/mace_mass/ and reused, so "
            "re-queueing an interrupted run resumes it.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                c["concepts"],
                io.String.Input("concept_file", default="",
                                tooltip="Optional .txt/.csv file in ComfyUI's input (or output) folder, same format; overrides 'concepts'. "
                                "Names are relative to that folder; absolute paths and '..' are refused."),
                c["concept_type"], c["anchor"], c["preserve"], c["builtin_preserve"],
                io.String.Input("run_name", default="mass_erase"),
                io.Float.Input("cfr_lambda", default=1.0, min=0.0, max=1e6, step=0.1),
                io.Float.Input("preserve_scale", default=1.0, min=0.0, max=1e6, step=0.1),
                io.Int.Input("lora_steps", default=0, min=0, max=10000, tooltip="0 = default for the concept type."),
                io.Float.Input("lora_lr", default=0.0, min=0.0, max=1.0, step=1e-5,
                               tooltip="0 = default for the concept type."),
                io.Int.Input("images_per_concept", default=8, min=1, max=64),
                io.Int.Input("image_size", default=512, min=64, max=2048, step=64),
                io.Int.Input("sampling_steps", default=20, min=1, max=200),
                io.Int.Input("seed", default=2024, min=0, max=0xFFFFFFFFFFFFFFFF),
                io.Float.Input("fusion_lambda", default=1e-3, min=0.0, max=1e6, step=1e-3),
                io.String.Input("erase_from", default="", optional=True,
                                tooltip="Scope: erase only in this context (e.g. 'car'). CFR remaps the context "
                                "tokens, each LoRA trains on images/prompts of the concept in the context, and "
                                "fusion keeps the concept in other contexts and the context's other variants "
                                "(crossed with 'preserve'). Empty = everywhere."),
                io.Combo.Input("objective", options=list(OBJECTIVES), default="attention", optional=True,
                               tooltip="LoRA-stage objective: attention = MACE (the concept's words lose their "
                               "attention mass); trajectory = ANT-style (keep the early denoising steps, reverse "
                               "the guidance direction for the concept after t'=500; no anchor needed)."),
                io.Float.Input("lora_preserve", default=DEFAULT_LORA_PRESERVE, min=0.0, max=1e6, step=0.5,
                               optional=True,
                               tooltip="Keeps each LoRA from changing the K/V of preserved text (preserve list, "
                               "built-in prompts, general prior). 0 = the paper's LoRA stage (the default: in "
                               "the toy world a weight of 3-10 kept more but erased much less)."),
                io.Boolean.Input("erase_concept_tokens", default=True, optional=True,
                                 tooltip="CFR also remaps the concept's own tokens (on = the pack's measured best; "
                                 "off = the paper, which leaves them to the LoRAs)."),
                io.Float.Input("prior_weight", default=DEFAULT_PRIOR_WEIGHT, min=0.0, max=1e6, step=0.1,
                               optional=True, tooltip=TOOLTIP),
                io.Combo.Input("lora_training", options=list(PATH_CHOICES), default="auto", optional=True,
                               tooltip=PATH_TOOLTIP),
                io.Int.Input("query_samples", default=DEFAULT_QUERY_SAMPLES, min=0, max=100000, optional=True,
                             tooltip="cached_queries: training samples per concept whose queries are recorded "
                             "(one UNet forward each); 0 = one per LoRA step."),
                io.String.Input("shard", default="", optional=True,
                                tooltip="Split the LoRA stage over several ComfyUI instances sharing the output "
                                "folder: 'i/n' trains part i of n (concepts i, i+n, ...; the model is passed on "
                                "unchanged); 'fuse' (or empty, which also trains what is missing) fuses every "
                                "part's files. Same inputs on every instance."),
                io.Combo.Input("fusion_preserve_to", options=["auto", *PRESERVE_TO], default="auto",
                               optional=True, tooltip=PRESERVE_TO_TOOLTIP),
                io.Float.Input("lora_null_space", default=DEFAULT_NULL_SPACE, min=0.0, max=0.9999, step=0.01,
                               optional=True,
                               tooltip="Keeps each LoRA off the directions of preserved text (preserve list, "
                               "built-in prompts, general prior) that hold this share of their feature energy, "
                               "so the LoRAs cannot change those prompts and fusion cannot trade them away. "
                               "0 = the paper's LoRA stage. With it on, the LoRA cannot change the end/padding "
                               "tokens either (they are in every preserved prompt)."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.String.Output(display_name="summary")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, concepts, concept_file, concept_type, anchor, preserve, builtin_preserve,
                run_name, cfr_lambda, preserve_scale, lora_steps, lora_lr, images_per_concept, image_size,
                sampling_steps, seed, fusion_lambda, erase_from="", objective="attention",
                lora_preserve=DEFAULT_LORA_PRESERVE, prior_weight=DEFAULT_PRIOR_WEIGHT,
                erase_concept_tokens=True, lora_training="auto", query_samples=DEFAULT_QUERY_SAMPLES,
                shard="", fusion_preserve_to="auto", lora_null_space=DEFAULT_NULL_SPACE) -> io.NodeOutput:
        check_inputs(cls, locals())
        fusion_preserve_to = preserve_to_for(concept_type, fusion_preserve_to, lora_null_space > 0)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: unknown {objective!r}; choose one of {list(OBJECTIVES)}")
        part, fuse_only = parse_shard(shard)
        parsed = load_concept_list(concepts, concept_file.strip(), text_roots())
        templates = concept_templates(concept_type)
        defaults = DEFAULTS_BY_TYPE[concept_type]
        lora = config_for(concept_type, steps=int(lora_steps) or defaults.steps, lr=float(lora_lr) or defaults.lr,
                          seed=int(seed), use_masks=False, objective=objective, preserve=float(lora_preserve),
                          path=training_path(lora_training, objective), query_samples=int(query_samples),
                          null_space=float(lora_null_space))
        lora.validate()
        anchor = normalise_phrase(anchor)
        check_disjoint(parsed, parse_concepts(preserve, "preserve", allow_anchor=False))
        cfr = CFRConfig(cfr_lambda, preserve_scale, bool(erase_concept_tokens))
        settings = PipelineSettings(concept_type, anchor, cfr, lora, fusion_lambda, preserve_scale,
                                    prior_weight=float(prior_weight), fusion_preserve_to=fusion_preserve_to)
        keep = preserve_prompts(preserve, templates, builtin_preserve)
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
            summary = result.summary() + f"\nLoRAs in {folder}"
            logging.info(summary)
            return io.NodeOutput(model, summary, ui={"text": [summary]})
        info = {"method": "mace", "concepts": [list(c.phrases) for c in parsed], "concept_type": concept_type,
                "anchor": anchor, "settings": settings.as_dict(), "loras": [os.path.basename(p) for p in
                                                                           result.lora_files]}
        if parse_erase_from(erase_from):
            info["erase_from"] = list(parse_erase_from(erase_from))
        out = apply_erasure(model, result.deltas, original, info)
        summary = result.summary() + f"\nLoRAs in {folder}"
        return io.NodeOutput(out, summary, ui={"text": [summary]})
