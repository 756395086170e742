"""Node ``MACE Refine Cross-Attention (CFR)``: closed-form erasure of concepts from the weights that read the text
(UNets: the cross-attention K/V weights; FLUX.1 / SD3: the text-entry projection, ``comfy_text_entry``)."""
from __future__ import annotations

from functools import partial
import json

from . import presets
from .comfy_compat import advanced, io

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


NODE_ID = "MaceRefineCrossAttention"
DEFAULT_EDIT_POOLED = presets.default(NODE_ID, "edit_pooled")  # bench.pooled (see nodes/presets.py)
RELATIVE_TOOLTIP = ("Count lambda in units of the text encoder's mean token energy, so one value means the same "
                    "on SD1.x, SDXL and the toy worlds (their features differ in scale by 100x or more). Off: raw "
                    "units as in the paper's code, whose SD1.x object configs used 10-1000. Workflows saved "
                    "before this input ran with it off.")
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
        c = concept_inputs(preserve_tooltip="Concepts to keep unchanged, one per line (e.g. other artists, the "
                           "look-alikes you care about); each adds its prompts to the preserve set. Empty is fine "
                           "(the built-in prompts and the caption prior still preserve).",
                           builtin_tooltip="Also preserve a built-in set of 20 everyday prompts. Leave on unless "
                           "you list a large preserve set yourself.")
        _default = partial(presets.default, NODE_ID)
        return io.Schema(
            node_id="MaceRefineCrossAttention",
            display_name="MACE Refine Cross-Attention (CFR)",
            category="MACE",
            description="Erases concepts (art styles, people, objects, nudity) in closed form, in seconds and "
            "without images: the prompt words that carry a concept stop carrying it (UNets: the cross-attention "
            "K/V weights; FLUX.1 and SD3/3.5: the projection their text enters through) while the preserved "
            "prompts keep their outputs. Use it to erase one or a few concepts (the robust default), then save "
            "the result with MACE Save Erasure; for a long list of names use MACE Mass Erase.",
            inputs=[
                io.Model.Input("model", tooltip="The model to erase from: SD1.x, SD2.x, SDXL family, FLUX.1 or "
                               "SD3/3.5 (other families are refused with their name)."),
                io.Clip.Input("clip", tooltip="The CLIP used for sampling with this model (same clip skip)."),
                c["concepts"], c["concept_type"], c["anchor"], c["preserve"],
                advanced(io.Float.Input("lambda_", display_name="lambda", default=_default("lambda_"), min=0.0, max=1e6,
                                        step=0.1, tooltip="Pull toward the original weights (ridge); larger = "
                                        "gentler edit, smaller = stronger erasure that moves other concepts too. "
                                        "With relative_lambda on (default) in mean token energies: 0.1 measured "
                                        "best over both toy worlds, 0.1-1 sensible; off: the paper's raw units.")),
                advanced(io.Float.Input("preserve_scale", default=_default("preserve_scale"), min=0.0, max=1e6, step=0.1,
                                        tooltip="Weight of the preserve prompts relative to the erase prompts; "
                                        "raise it (1-10) when kept concepts change, lower it (0.1-1) when the "
                                        "erasure is too weak.")),
                c["builtin_preserve"],
                advanced(io.Boolean.Input("erase_concept_tokens", default=_default("erase_concept_tokens"), optional=True,
                                          tooltip="Also remap the concept's own tokens (needed when CFR is used "
                                          "alone). Turn off before MACE LoRA training + fusion, which handle those "
                                          "tokens (preset 'paper').")),
                advanced(io.String.Input("erase_from", default="", optional=True,
                                         tooltip="Scope: erase the concepts only in this context (e.g. 'car': red "
                                         "cars lose red, red apples and blue cars stay). Comma separated contexts; "
                                         "'{}' marks where the concept goes ('car painted {}'). The preserve "
                                         "concepts are crossed with it ('apple' keeps red apples, 'blue' keeps blue "
                                         "cars). Empty = everywhere. Applies under every preset.")),
                advanced(io.Float.Input("prior_weight", default=_default("prior_weight"), min=0.0, max=1e6, step=0.1,
                                        optional=True, tooltip=TOOLTIP)),
                advanced(io.Boolean.Input("edit_pooled", default=_default("edit_pooled"), optional=True,
                                          tooltip=POOLED_TOOLTIP)),
                presets.preset_input(NODE_ID),
                # after the preset, so that workflows saved before it keep their widgets' order
                advanced(io.Boolean.Input("relative_lambda", default=_default("relative_lambda"), optional=True,
                                          tooltip=RELATIVE_TOOLTIP)),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The erased model (a clone with the edit as "
                                     "weight patches); connect it to a sampler or MACE Save Erasure."),
                     io.String.Output(display_name="summary", tooltip="What was erased and every setting used.")],
        )

    @classmethod
    def execute(cls, model, clip, concepts, concept_type, anchor, preserve, lambda_, preserve_scale,
                builtin_preserve, erase_concept_tokens=True, erase_from="",
                prior_weight=DEFAULT_PRIOR_WEIGHT, edit_pooled=DEFAULT_EDIT_POOLED,
                relative_lambda=False, preset=presets.CUSTOM) -> io.NodeOutput:
        check_inputs(cls, locals())
        tuned = presets.resolve(NODE_ID, preset, {"lambda_": lambda_, "preserve_scale": preserve_scale,
                                                  "erase_concept_tokens": erase_concept_tokens,
                                                  "prior_weight": prior_weight, "edit_pooled": edit_pooled,
                                                  "relative_lambda": relative_lambda})
        lambda_, preserve_scale = tuned["lambda_"], tuned["preserve_scale"]
        relative_lambda = bool(tuned["relative_lambda"])
        erase_concept_tokens, prior_weight = tuned["erase_concept_tokens"], tuned["prior_weight"]
        edit_pooled = tuned["edit_pooled"]
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
            CFRConfig(lambda_, preserve_scale, erase_concept_tokens, relative_lambda), NodeProgress(len(parsed) + 1),
            erase_from=erase_from or None, preserve_phrases=preserve_phrases(preserve),
            prior=prior_for(encoder, float(prior_weight)),
        )
        info = {
            "method": "cfr",
            "concepts": [{"phrases": list(c.phrases), "anchor": default_anchor if c.anchor is None else c.anchor}
                         for c in parsed],
            "concept_type": concept_type,
            "lambda": lambda_,
            "relative_lambda": relative_lambda,
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
                                      CFRConfig(lambda_, preserve_scale, relative_lambda=relative_lambda),
                                      parse_erase_from(erase_from))
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
            f"condition {max(result.condition.values()):.3g}).{note}\n"
            + presets.settings_text(tuned, {"concept_type": concept_type, "anchor": default_anchor,
                                            "preserve": info["preserve"], "builtin_preserve": builtin_preserve,
                                            "erase_from": erase_from})
            + "\n" + json.dumps(info["concepts"])  # last line: the concepts as JSON
        )
        return io.NodeOutput(out, summary)
