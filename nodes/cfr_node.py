"""Node ``MACE Refine Cross-Attention (CFR)``: closed-form erasure of concepts from the weights that read the text
(UNets: the cross-attention K/V weights; FLUX.1 / SD3: the text-entry projection, ``comfy_text_entry``)."""
from __future__ import annotations

import json

from .comfy_compat import io

from ..mace_ops.cfr import CFRConfig, refine_cross_attention
from ..mace_ops.concepts import check_disjoint, normalise_phrase, parse_concepts, require_concepts
from ..mace_ops.scope import parse_erase_from
from ..mace_ops.templates import GENERIC_PRESERVE_PROMPTS, phrase_groups, templates_for
from ..mace_ops.pooled import edit_pooled_projection, pooled_stats
from ..mace_ops.work import WorkEstimate, announce, encodes_for
from .comfy_model import PREFIX, apply_erasure, effective_weights
from .comfy_text_entry import text_entry
from .concept_inputs import concept_inputs
from .prior_input import DEFAULT_PRIOR_WEIGHT, TOOLTIP, prior_for
from .progress import NodeProgress
from .validation import check_inputs


DEFAULT_EDIT_POOLED = False  # bench.pooled: held out, it removes 21 % of the concept's effect at 4x the preserve drift
POOLED_TOOLTIP = ("Also edit the pooled-text columns of the first layer reading the pooled text embedding (SDXL "
                  "family: label_emb.0.0; FLUX.1: vector_in.in_layer, CLIP-L's; SD3/3.5: y_embedder.mlp.0, CLIP-L|G's), "
                  "closed form, so the concept's pooled embedding acts like the anchor's while the preserve prompts' "
                  "keep their effect. Stored in the erasure file (the stock LoRA loader applies it). No effect on "
                  "SD1.x/SD2.x, which read no pooled text, or with erase_from.")


def pooled_edit(model, encoder, parsed, templates, anchor, keep, config, erase_from):
    """(PooledEdit, base weight, "") for a model reading pooled text (SDXL family, FLUX.1, SD3), else
    (None, None, reason)."""
    entry = text_entry(model)
    if entry.pooled_key is None:
        return None, None, "this model reads no pooled text"
    if erase_from:
        return None, None, "not scoped: skipped with erase_from"
    weight = effective_weights(model, [entry.pooled_key])[entry.pooled_key]
    stats = pooled_stats(encoder.encode_pooled, parsed, templates, anchor, keep)
    if stats.dim != entry.pooled_width:
        raise ValueError(f"clip: pooled embedding width {stats.dim}, the model reads {entry.pooled_width}; "
                         "connect the CLIP of this checkpoint")
    return edit_pooled_projection(weight, entry.pooled_key, stats, config), weight, ""


def preserve_phrases(preserve_text: str) -> list[str]:
    return [p for c in parse_concepts(preserve_text, "preserve", allow_anchor=False) for p in c.phrases]


def preserve_prompts(preserve_text: str, templates, builtin: bool) -> list[str]:
    return preserve_groups(preserve_text, templates, builtin)[0]


def preserve_groups(preserve_text: str, templates, builtin: bool) -> tuple[list[str], list]:
    """(preserve prompts, labels): each phrase's templates labelled with the phrase, each built-in
    prompt its own label (``mace_ops.ace``'s calibration groups)."""
    prompts, labels = phrase_groups(preserve_phrases(preserve_text), templates)
    if builtin:
        prompts += list(GENERIC_PRESERVE_PROMPTS)
        labels += [("builtin", i) for i in range(len(GENERIC_PRESERVE_PROMPTS))]
    return prompts, labels


class MaceRefineCrossAttention(io.ComfyNode):
    EDITS_TEXT_ENTRY = True  # FLUX.1 / SD3: the same M on the projection the text enters through (comfy_text_entry)

    @classmethod
    def define_schema(cls) -> io.Schema:
        c = concept_inputs(preserve_tooltip="Concepts to keep unchanged, one per line (e.g. other artists).",
                           builtin_tooltip="Also preserve a built-in set of 20 everyday prompts.")
        return io.Schema(
            node_id="MaceRefineCrossAttention",
            display_name="MACE Refine Cross-Attention (CFR)",
            category="MACE",
            description="Closed-form erasure: the words around a concept (and the end/padding tokens) stop "
            "carrying it, while preserved prompts keep their outputs. Seconds, no images needed. UNets (SD1.x, SD2.x, "
            "SDXL): the cross-attention K/V weights; FLUX.1 and SD3/3.5: the projection their text enters through "
            "(txt_in, context_embedder).",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", tooltip="The CLIP used for sampling with this model (same clip skip)."),
                c["concepts"], c["concept_type"], c["anchor"], c["preserve"],
                io.Float.Input("lambda_", display_name="lambda", default=1.0, min=0.0, max=1e6, step=0.1,
                               tooltip="Pull toward the original weights (ridge); larger = gentler edit."),
                io.Float.Input("preserve_scale", default=1.0, min=0.0, max=1e6, step=0.1,
                               tooltip="Weight of the preserve prompts relative to the erase prompts."),
                c["builtin_preserve"],
                io.Boolean.Input("erase_concept_tokens", default=True, optional=True,
                                 tooltip="Also remap the concept's own tokens (needed when CFR is used alone). "
                                 "Turn off before MACE LoRA training + fusion, which handle those tokens."),
                io.String.Input("erase_from", default="", optional=True,
                                tooltip="Scope: erase the concepts only in this context (e.g. 'car': red cars lose "
                                "red, red apples and blue cars stay). Comma separated contexts; '{}' marks where "
                                "the concept goes ('car painted {}'). The preserve concepts are crossed with it "
                                "('apple' keeps red apples, 'blue' keeps blue cars). Empty = everywhere."),
                io.Float.Input("prior_weight", default=DEFAULT_PRIOR_WEIGHT, min=0.0, max=1e6, step=0.1,
                               optional=True, tooltip=TOOLTIP),
                io.Boolean.Input("edit_pooled", default=DEFAULT_EDIT_POOLED, optional=True, tooltip=POOLED_TOOLTIP),
            ],
            outputs=[io.Model.Output(display_name="model"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, model, clip, concepts, concept_type, anchor, preserve, lambda_, preserve_scale,
                builtin_preserve, erase_concept_tokens=True, erase_from="",
                prior_weight=DEFAULT_PRIOR_WEIGHT, edit_pooled=DEFAULT_EDIT_POOLED) -> io.NodeOutput:
        check_inputs(cls, locals())
        parsed = require_concepts(parse_concepts(concepts, "concepts"), "concepts")
        check_disjoint(parsed, parse_concepts(preserve, "preserve", allow_anchor=False))
        templates = templates_for(concept_type)
        keep = preserve_prompts(preserve, templates, builtin_preserve)
        entry = text_entry(model)
        encoder = entry.text_encoder(clip)
        base = effective_weights(model, entry.keys)
        default_anchor = normalise_phrase(anchor)
        announce("MACE Refine Cross-Attention", WorkEstimate(len(parsed), encodes_for(parsed, len(templates), len(keep),
                                                                                      default_anchor)))
        result = refine_cross_attention(
            encoder, base, parsed, templates, default_anchor, keep,
            CFRConfig(lambda_, preserve_scale, erase_concept_tokens), NodeProgress(len(parsed) + 1),
            erase_from=erase_from or None, preserve_phrases=preserve_phrases(preserve),
            prior=prior_for(encoder, float(prior_weight)),
        )
        info = {
            "method": "cfr",
            "concepts": [{"phrases": list(c.phrases), "anchor": default_anchor if c.anchor is None else c.anchor}
                         for c in parsed],
            "concept_type": concept_type,
            "lambda": lambda_,
            "preserve_scale": preserve_scale,
            "preserve": [p for c in parse_concepts(preserve, "preserve", False) for p in c.phrases],
            "builtin_preserve": builtin_preserve,
            "erase_concept_tokens": erase_concept_tokens,
            "prior_weight": float(prior_weight),
        }
        if not entry.unet:
            info["text_entry"] = [k[len(PREFIX):] for k in entry.keys]
        if parse_erase_from(erase_from):
            info["erase_from"] = list(parse_erase_from(erase_from))
        deltas, note = dict(result.deltas), ""
        if edit_pooled:
            pooled, weight, why = pooled_edit(model, encoder, parsed, templates, default_anchor, keep,
                                      CFRConfig(lambda_, preserve_scale), parse_erase_from(erase_from))
            if pooled is None:
                note = f"\npooled text: not edited ({why})."
            else:
                deltas[pooled.key], base = pooled.delta, {**base, pooled.key: weight}
                note = (f"\npooled text: edited {pooled.key[len(PREFIX):]} (pooled columns; "
                        f"{pooled.n_pairs} pairs, {pooled.n_preserve} preserve prompts, condition {pooled.condition:.3g}).")
        info["edit_pooled"] = entry.pooled_key in deltas
        out = apply_erasure(model, deltas, base, info)
        summary = (
            f"CFR erased {len(parsed)} concept(s) from {entry.where()} in {result.seconds:.2f}s "
            f"({result.stats.n_pairs} token pairs, {result.stats.n_preserve} preserve tokens, "
            f"condition {max(result.condition.values()):.3g}).{note}\n" + json.dumps(info["concepts"])
        )
        return io.NodeOutput(out, summary)
