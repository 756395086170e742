"""Node ``MACE Text Gate (compiled)``: the ACE gate compiled into the CLIP's MLP (``mace_ops.text_gate``).

For each text encoder the conditioning reads (SDXL: CLIP-L and bigG), the MLP of the layer clip
skip reads gets two hidden units per concept in place of its least important ones: a ramp that is
closed, up to < 1e-4 of its output, unless a token's input is within the calibrated threshold of the
concept's prototype, and then writes the anchor's residual in place of the concept's at that token.
Shapes are unchanged, so the edit is four tensors' diffs per encoder: ``MACE Save Erasure`` writes
them as a file the stock LoraLoader applies to the CLIP (no pack needed to use it).

Calibration as the ACE node's: the preserve prompts (each phrase's templates one group) plus the
pack's 1,000 general captions (their residuals at the MLP's input cached per CLIP and layer, as the
ACE node's caption encodings are: ``prior_input.caption_encodings``); threshold = max(the ``quantile`` of each prompt's peak cosine, the
shared floor set by ``open_rate``). On toy world v2 (``bench.gate_compile``): H 0.916 +- 0.013 at 100
erased names, with the retained names and the captions' outputs as they were (README).
"""
from __future__ import annotations

import json
import time

from . import presets
from .comfy_compat import advanced, io

from ..mace_ops.concepts import normalise_phrase
from ..mace_ops.work import WorkEstimate, announce
from ..mace_ops.encoding_cache import CachedTextEncoder
from ..mace_ops.prior import general_captions
from ..mace_ops.templates import DEFAULT_ANCHORS
from ..mace_ops.text_gate import TextGateConfig, calibrate_text_gate, check_capacity, compile_text_gate
from . import prior_input
from .ace_node import _Counted, _Progress, gate_concepts, gate_info
from .comfy_text_site import apply_text_gate, get_text_gate, mlp_sites
from .concept_inputs import gate_concept_inputs, quantile_input
from .validation import check_inputs

DEFAULTS = TextGateConfig()


class MaceTextGate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        c = gate_concept_inputs(anchor_tooltip="What the concept becomes (e.g. 'art', 'a person'); empty = 'art' "
                                "for styles, 'a person' for people, the empty word for objects.")
        return io.Schema(
            node_id="MaceTextGate",
            display_name="MACE Text Gate (compiled)",
            category="MACE",
            description="The ACE gate compiled into the text encoder's weights: two MLP units per concept, in the "
            "layer clip skip reads, make a token that carries the concept leave that layer as the anchor's would, "
            "while other prompts pass unchanged (no images; it encodes about 1,000 calibration prompts). Use it to "
            "erase many names while keeping look-alikes, as a CLIP edit that MACE Save Erasure writes and the stock "
            "LoraLoader applies without this pack.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP used for sampling (set clip skip before this node)."),
                c["concepts"], c["concept_type"], c["anchor"], c["preserve"], c["builtin_preserve"],
                advanced(quantile_input(DEFAULTS.quantile, " at the MLP's input")),
                advanced(io.Float.Input("open_rate", default=DEFAULTS.open_rate, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Shared threshold floor: at most this share of phrases like the preserve list "
                               "(unseen ones) should open any concept's gate; it matters when many concepts are "
                               "erased (0.01-0.1). 1 = off.")),
                advanced(io.Float.Input("width", default=DEFAULTS.width, min=1e-4, max=1.0, step=0.001, optional=True,
                                        tooltip="Cosine above the threshold at which a gate is fully open (it is "
                                        "closed at and below the threshold); 0.005-0.05.")),
            ],
            outputs=[io.Clip.Output(display_name="clip", tooltip="The CLIP with the gate in its MLP weights; encode "
                                    "prompts with it and give it to MACE Save Erasure."),
                     io.String.Output(display_name="summary", tooltip="The thresholds per encoder and every setting "
                                      "used.")],
        )

    @classmethod
    def execute(cls, clip, concepts, concept_type, anchor, preserve, builtin_preserve, quantile,
                open_rate=DEFAULTS.open_rate, width=DEFAULTS.width) -> io.NodeOutput:
        check_inputs(cls, locals())
        if clip is None:
            raise ValueError("clip: no CLIP connected; connect the CLIP output of your checkpoint loader")
        if get_text_gate(clip) is not None:
            raise ValueError("clip: already carries a compiled text gate; erase every concept in one MACE Text Gate "
                             "node (or start from the CLIP without it)")
        parsed, templates, keep, groups = gate_concepts(concepts, concept_type, preserve, builtin_preserve)
        default_anchor = normalise_phrase(anchor) or DEFAULT_ANCHORS.get(concept_type, "")
        config = TextGateConfig(float(quantile), float(open_rate), float(width))
        captions = general_captions(prior_input.PRIOR_CAPTIONS)   # the list caption_encodings encodes
        calibration = keep + captions
        anchors = {default_anchor if c.anchor is None else c.anchor for c in parsed}
        per_site = (len(calibration) + 3 + 2 * len(templates) * (len(anchors) + sum(len(c.phrases) for c in parsed)))
        t0 = time.perf_counter()
        sites = mlp_sites(clip)
        for site in sites:                       # before any encoding
            check_capacity(site, len(parsed))
        announce("MACE Text Gate", WorkEstimate(len(parsed), per_site * len(sites), solves=len(sites)))
        progress = _Progress(per_site * len(sites))
        deltas, base, lines = {}, {}, []
        for site in sites:
            counted = _Counted(site.inputs, progress)
            _, caption_enc = prior_input.caption_encodings(counted, keep_moment=False)  # cached per CLIP and layer
            site.inputs = CachedTextEncoder(counted, max_prompts=len(calibration) + 64)
            site.inputs.remember(captions, caption_enc)
            site.outputs = _Counted(site.outputs, progress)
            gate = calibrate_text_gate(site, parsed, templates, default_anchor, calibration,
                                       groups + [None] * len(captions), config)
            compiled = compile_text_gate(site, gate, calibration, config.width)
            deltas.update(site.deltas(compiled))
            base.update(site.base())
            lines.append(f"{site.name} ({site.activation}): thresholds "
                         f"{', '.join(f'{t:.3f}' for t in gate.thresholds.tolist())}; largest |fc1 weight| "
                         f"{float(compiled['fc1.weight'].abs().max()):.3g} (fp16 holds up to 65,504)")
        seconds = time.perf_counter() - t0
        info = {**gate_info("text_gate", parsed, default_anchor, concept_type, preserve, builtin_preserve,
                            len(captions)),
                "layers": [s.name for s in sites], "text_gate": dict(config.__dict__)}
        out = apply_text_gate(clip, deltas, base, info)
        progress.finish()
        summary = (f"Text gate compiled for {len(parsed)} concept(s) in {seconds:.2f}s on {len(calibration)} "
                   f"calibration prompts: {2 * len(parsed)} MLP units replaced per encoder.\n" + "\n".join(lines)
                   + "\n" + presets.settings_text(None, {"concept_type": concept_type, "anchor": default_anchor,
                                                          "builtin_preserve": builtin_preserve,
                                                          "quantile": float(quantile), "open_rate": float(open_rate),
                                                          "width": float(width)})
                   + "\n" + json.dumps(info["concepts"]))
        return io.NodeOutput(out, summary)
