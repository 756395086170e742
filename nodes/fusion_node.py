"""Node ``MACE Fuse LoRAs``: merge per-concept MACE LoRAs into the K/V weights in one closed-form solve."""
from __future__ import annotations

import os

from .comfy_compat import advanced, io

from ..mace_ops.concepts import Concept, check_disjoint, parse_concepts
from ..mace_ops.fusion import PRESERVE_TO, fuse_loras, preserve_to_for
from ..mace_ops.lora_file import check_lora_fits, load_concept_lora, read_lora_info
from ..mace_ops.templates import TEMPLATES, templates_for
from .cfr_node import preserve_prompts
from .comfy_model import apply_erasure, effective_kv_weights, get_record
from .comfy_text_encoder import ComfyTextEncoder
from .paths import resolve_lora_files
from .prior_input import DEFAULT_PRIOR_WEIGHT, TOOLTIP, prior_for
from .progress import NodeProgress
from .validation import check_inputs


def trained_in_null_space(info: dict) -> bool:
    """Whether a LoRA file records training in the preserve set's null space (``settings.null_space`` > 0)."""
    settings = info.get("settings")
    return isinstance(settings, dict) and float(settings.get("null_space") or 0) > 0


def original_weights(model, current):
    """The weights before any MACE stage: current minus the MACE deltas the model carries."""
    record = get_record(model)
    if record is None:
        return current
    return {k: (w - record.deltas[k]) if k in record.deltas else w for k, w in current.items()}


PRESERVE_TO_TOOLTIP = (
    "Where fusion keeps the preserved prompts (preserve list, built-in prompts, general prior): current = at "
    "the incoming model's weights (after CFR), so fusion only adds the LoRAs and cannot undo CFR; original = at "
    "the unedited base model, the paper's form; auto = current when every LoRA was trained in the preserve "
    "set's null space (Mass Erase's default) or for styles, original otherwise (measured in the toy world: "
    "null-space LoRAs fused at the original weights undo CFR; without the null space, current erased styles "
    "better and lost the retained names at 100 names).")


class MaceFuseLoras(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MaceFuseLoras",
            display_name="MACE Fuse LoRAs",
            category="MACE",
            description="Merges many per-concept MACE LoRAs into the cross-attention K/V weights in one closed-form "
            "solve, so the concepts do not interfere and the preserved prompts keep their outputs. Use it as MACE's "
            "stage 3 after MACE Train Concept LoRA (one LoRA per concept), on the model after CFR; MACE Mass Erase "
            "does this for you.",
            inputs=[
                io.Model.Input("model", tooltip="Usually the output of MACE Refine Cross-Attention (CFR)."),
                io.Clip.Input("clip", tooltip="The CLIP used for sampling with this model (same clip skip)."),
                io.String.Input("lora_files", multiline=True, default="mace_lora/",
                                tooltip="One LoRA file name (from the loras folders) or folder per line."),
                io.Combo.Input("concept_type", options=sorted(TEMPLATES), default="style",
                               tooltip="Templates for LoRAs whose file does not record a concept type."),
                io.String.Input("preserve", multiline=True, default="",
                                tooltip="Concepts to keep unchanged, one per line (as given to CFR)."),
                advanced(io.Float.Input("lambda_", display_name="lambda", default=1.0, min=0.0, max=1e6, step=0.1,
                                        tooltip="Pull toward the incoming weights (ridge); larger = weaker LoRAs. "
                                        "Raw units: 0.1-1 for a few LoRAs, grows with their number.")),
                advanced(io.Float.Input("preserve_scale", default=1.0, min=0.0, max=1e6, step=0.1,
                                        tooltip="Weight of the preserve prompts relative to the LoRAs' targets; "
                                        "raise it (1-10) when kept concepts change.")),
                io.Boolean.Input("builtin_preserve", default=True,
                                 tooltip="Also preserve a built-in set of 20 everyday prompts (leave on)."),
                advanced(io.Float.Input("prior_weight", default=DEFAULT_PRIOR_WEIGHT, min=0.0, max=1e6, step=0.1,
                                        optional=True, tooltip=TOOLTIP)),
                advanced(io.Combo.Input("preserve_to", options=["auto", *PRESERVE_TO], default="auto", optional=True,
                                        tooltip=PRESERVE_TO_TOOLTIP)),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the fused edit as weight "
                                     "patches; connect it to a sampler or MACE Save Erasure."),
                     io.String.Output(display_name="summary", tooltip="What was fused and the settings used.")],
        )

    @classmethod
    def execute(cls, model, clip, lora_files, concept_type, preserve, lambda_, preserve_scale,
                builtin_preserve, prior_weight=DEFAULT_PRIOR_WEIGHT,
                preserve_to="auto") -> io.NodeOutput:
        check_inputs(cls, locals())
        paths = resolve_lora_files(lora_files)
        current = effective_kv_weights(model)
        original = original_weights(model, current)
        encoder = ComfyTextEncoder(clip)
        kinds: dict[tuple, str] = {}
        null_space = all(trained_in_null_space(read_lora_info(path)) for path in paths)  # headers only
        preserve_to = preserve_to_for(concept_type, preserve_to, null_space)

        def stream():  # one LoRA in memory at a time
            for i, path in enumerate(paths, start=1):
                lora = load_concept_lora(path)
                check_lora_fits(lora, current, os.path.basename(path), original)  # keys, shapes, base model
                phrases = lora.phrases(os.path.basename(path))  # a plain string is one phrase, not its letters
                concept = Concept(phrases, None, i)
                check_disjoint([concept], preserved, f"LoRA {os.path.basename(path)} (concept)")
                kinds[phrases] = lora.info.get("concept_type", concept_type)
                yield concept, lora.factors

        def templates(concept: Concept):
            kind = kinds[concept.phrases]
            return templates_for("person" if kind == "nudity" else kind)

        preserved = parse_concepts(preserve, "preserve", False)
        keep = preserve_prompts(preserve, templates_for(concept_type), builtin_preserve)
        result = fuse_loras(encoder, current, original, stream(), templates, keep, lambda_, preserve_scale,
                            NodeProgress(len(paths) + 1), total=len(paths),
                            prior=prior_for(encoder, float(prior_weight)), preserve_to=preserve_to)
        info = {"method": "fusion", "loras": [os.path.basename(p) for p in paths], "lambda": lambda_,
                "preserve_scale": preserve_scale, "prior_weight": float(prior_weight), "preserve_to": preserve_to,
                "null_space_loras": null_space,
                "preserve": [p for c in parse_concepts(preserve, "preserve", False) for p in c.phrases]}
        out = apply_erasure(model, result.deltas, current, info)
        summary = (f"fused {result.n_concepts} LoRA(s) into {len(result.deltas)} K/V weights in {result.seconds:.2f}s "
                   f"(condition {max(result.condition.values()):.3g}; preserve prompts kept at the {preserve_to} weights)")
        return io.NodeOutput(out, summary)
