"""Node ``MACE Gated Erasure (ACE)``: the ACE-style gated null-out (``mace_ops.ace``) as an attn2 patch.

The gate is fitted with the connected CLIP (the pack's ComfyUI text-encoder adapter) and
calibrated on the preserve prompts plus the pack's general captions (``prior_input.PRIOR_CAPTIONS``,
1,000): its threshold is the ``quantile`` of the similarity of those prompts' token features to the
concept's, so a prompt without the concept leaves the gate closed and the model's output as it was.
No weight changes: the clone carries the gate as an attn2 patch (``comfy_gate``). For a stock-LoRA
fallback in the saved file, chain the CFR node too (its deltas become the file's ``.diff`` part).
"""
from __future__ import annotations

import json
import time

from .comfy_compat import io

from ..mace_ops.ace import ACEConfig, fit_gated_erasure
from ..mace_ops.concepts import check_disjoint, normalise_phrase, parse_concepts, require_concepts
from ..mace_ops.prior import general_captions
from ..mace_ops.templates import TEMPLATES, templates_for
from . import prior_input
from .cfr_node import preserve_phrases, preserve_prompts
from .comfy_gate import GateRecord, apply_gate, base_fingerprint, check_gate_fits, get_gate
from .comfy_model import effective_kv_weights
from .comfy_text_encoder import ComfyTextEncoder
from .progress import NodeProgress
from .validation import check_inputs

DEFAULTS = ACEConfig()


class _Counted:
    """The text encoder with a progress report after every ``encode`` (prompts done / expected)."""

    def __init__(self, encoder, progress: NodeProgress, total: int):
        self.encoder, self.progress, self.total, self.done = encoder, progress, max(total, 1), 0

    def tokenize(self, text):
        return self.encoder.tokenize(text)

    def encode(self, prompts):
        out = self.encoder.encode(prompts)
        self.done = min(self.done + len(prompts), self.total)
        self.progress(self.done, self.total)
        return out


class MaceGatedErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MaceGatedErasure",
            display_name="MACE Gated Erasure (ACE)",
            category="MACE",
            description="ACE-style gated erasure: the concept's directions in the text features are nulled out "
            "only where the prompt carries the concept (a gate), as a cross-attention patch; prompts without it "
            "are untouched. Seconds, no images. The stock LoRA loader cannot apply the gate (see README).",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", tooltip="The CLIP used for sampling with this model (same clip skip)."),
                io.String.Input("concepts", multiline=True, default="van gogh, vincent van gogh",
                                tooltip="One concept per line; synonyms on one line separated by commas; "
                                "optional per-line anchor after '->' (e.g. 'ship -> ground')."),
                io.Combo.Input("concept_type", options=sorted(TEMPLATES), default="style",
                               tooltip="Chooses the prompt templates the erasure is built from."),
                io.String.Input("anchor", default="", tooltip="What the concept becomes (e.g. 'art', 'a person'); "
                                "empty = neutral."),
                io.String.Input("preserve", multiline=True, default="",
                                tooltip="Concepts to keep unchanged, one per line; they also calibrate the gate."),
                io.Boolean.Input("builtin_preserve", default=True,
                                 tooltip="Also calibrate the gate on a built-in set of 20 everyday prompts."),
                io.Int.Input("rank", default=DEFAULTS.rank, min=1, max=4096,
                             tooltip="Directions nulled out per concept (top singular vectors)."),
                io.Float.Input("quantile", default=DEFAULTS.quantile, min=0.5, max=1.0, step=0.0005,
                               tooltip="Gate threshold: this quantile of the similarity of ordinary prompts' "
                               "tokens to the concept (higher = opens less often on other prompts)."),
                io.Float.Input("margin", default=DEFAULTS.margin, min=-2.0, max=2.0, step=0.01, optional=True,
                               tooltip="Added to the threshold (cosine units); > 0 opens the gate less often."),
                io.Float.Input("temperature", default=DEFAULTS.temperature, min=1e-6, max=10.0, step=0.005,
                               optional=True, tooltip="Softness of the gate (cosine units)."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, model, clip, concepts, concept_type, anchor, preserve, builtin_preserve, rank, quantile,
                margin=DEFAULTS.margin, temperature=DEFAULTS.temperature) -> io.NodeOutput:
        check_inputs(cls, locals())
        if get_gate(model) is not None:
            raise ValueError("model: already carries an ACE gate; erase every concept in one MACE Gated Erasure "
                             "(ACE) node")
        parsed = require_concepts(parse_concepts(concepts, "concepts"), "concepts")
        check_disjoint(parsed, parse_concepts(preserve, "preserve", allow_anchor=False))
        templates = templates_for(concept_type)
        calibration = (preserve_prompts(preserve, templates, builtin_preserve)
                       + general_captions(prior_input.PRIOR_CAPTIONS))
        default_anchor = normalise_phrase(anchor)
        config = ACEConfig(int(rank), float(quantile), float(margin), float(temperature))
        base = effective_kv_weights(model)
        anchors = {c.anchor for c in parsed if c.anchor is not None and c.anchor != default_anchor}
        expected = len(templates) * (1 + len(anchors) + sum(len(c.phrases) for c in parsed)) + len(calibration)
        progress = NodeProgress(expected)
        t0 = time.perf_counter()
        erasure = fit_gated_erasure(_Counted(ComfyTextEncoder(clip), progress, expected), parsed, templates,
                                    default_anchor, calibration, config)
        seconds = time.perf_counter() - t0
        check_gate_fits(erasure, base, "clip")
        info = {
            "method": "ace",
            "concepts": [{"phrases": list(c.phrases), "anchor": default_anchor if c.anchor is None else c.anchor}
                         for c in parsed],
            "concept_type": concept_type,
            "preserve": preserve_phrases(preserve),
            "builtin_preserve": builtin_preserve,
            "calibration_captions": prior_input.PRIOR_CAPTIONS,
            "ace": dict(config.__dict__),
        }
        out = apply_gate(model, GateRecord(erasure, base_fingerprint(model, base), info))
        progress(expected, expected)
        summary = (
            f"ACE gate for {len(parsed)} concept(s), rank {int(erasure.bases.shape[2])}, fitted in {seconds:.2f}s "
            f"on {len(calibration)} calibration prompts (thresholds "
            f"{', '.join(f'{t:.3f}' for t in erasure.thresholds.tolist())}). Applied as an attn2 patch; "
            "the stock LoRA loader cannot apply it.\n" + json.dumps(info["concepts"])
        )
        return io.NodeOutput(out, summary)
