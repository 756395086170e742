"""Node ``MACE Gated Erasure (ACE)``: the ACE-style gated null-out (``mace_ops.ace``) as an attn2 patch.

The gate is fitted with the connected CLIP (the pack's ComfyUI text-encoder adapter) and
calibrated on the preserve prompts plus the pack's general captions (``prior_input.PRIOR_CAPTIONS``,
1,000): its threshold is the ``quantile``, over those prompts, of each prompt's largest similarity
(over its tokens) to the concept's features (prompts that name the concept are left out), so a
prompt without the concept leaves the gate closed and the model's output as it was; and at least
the shared floor set by ``open_rate`` on the preserve phrases (each phrase's prompts one group:
at most that share of unseen phrases like them opens any gate, ``mace_ops.ace``).
No weight changes: the clone carries the gate as an attn2 patch (``comfy_gate``). For a stock-LoRA
fallback in the saved file, chain the CFR node too (its deltas become the file's ``.diff`` part).

The captions' encodings are cached per CLIP (and clip skip) like CFR's prior (``prior_input``), so
only the first run encodes them; every encoding is memoised within a run, so a refit re-encodes
only the adversarial prompts.

``adversarial_rounds`` > 0: ACE's adversarial augmentation (``mace_ops.attacks.adversarial_rounds``,
as ``bench.attack``'s ``ace_adv`` in toy world v2). ``attack_images`` latents of each concept are
drawn by the connected model (the KSampler path of MACE Training Images: the concept's templates,
seed + i); then every round attacks each concept with the soft-prompt attack (2 tokens from the
anchor word, Adam step 0.3 of its RMS cosine-decayed over ``attack_steps``, batch 4, attack seed
``seed`` + 100 r + i), white-box against the current gate through ComfyUI's denoiser
(``ComfyDenoiser``, eps output), and refits the gate with every embedding found so far.
"""
from __future__ import annotations

from functools import partial
import json
import time

import torch

from . import presets
from .comfy_compat import advanced, io

from ..mace_ops.ace import GATE_SHAPES, STATE_KEYS, ACEConfig, GatedErasure, fit_gated_erasure
from ..mace_ops.attacks import SoftPromptConfig, soft_prompt_attack
from ..mace_ops.attacks import adversarial_rounds as refit_rounds
from ..mace_ops.concepts import check_disjoint, normalise_phrase, parse_concepts, require_concepts
from ..mace_ops.encoding_cache import CachedTextEncoder
from ..mace_ops.templates import DEFAULT_ANCHORS, templates_for
from ..mace_ops.work import WorkEstimate, announce, encodes_for
from . import prior_input
from .cfr_node import preserve_groups, preserve_phrases
from .comfy_denoiser import ComfyDenoiser
from .comfy_gate import GateRecord, apply_gate, base_fingerprint, check_gate_fits, get_gate
from .comfy_model import effective_kv_weights
from .comfy_text_encoder import ComfyTextEncoder
from .concept_inputs import gate_concept_inputs, quantile_input
from .progress import NodeProgress
from .training_images_node import DEFAULT_CFG, DEFAULT_SCHEDULER, concept_prompts, default_sampler, sample_latents
from .validation import check_inputs

DEFAULTS = ACEConfig()
ATTACK = SoftPromptConfig(tokens=2, steps=40, lr=0.3, batch_size=4, seed=0)  # the toy refit's, batch 4


def _attackable(erasure: GatedErasure, device) -> GatedErasure:
    """The gate with tensors made outside inference mode (a node fits it inside), on ``device``: the
    attack differentiates through it."""
    with torch.inference_mode(False):
        return GatedErasure(*(getattr(erasure, k).detach().to(device).clone() for k in STATE_KEYS),
                            temperature=erasure.temperature, shape=erasure.shape)


class _Progress:
    """One bar over the whole run: units of work done so far (prompts encoded, sampling and attack steps)."""

    def __init__(self, total: int):
        self.bar, self.total, self.done = NodeProgress(max(total, 1)), max(total, 1), 0

    def add(self, units: int) -> None:
        self.done = min(self.done + max(0, units), self.total)
        self.bar(self.done, self.total)

    def finish(self) -> None:
        self.bar(self.total, self.total)


class _Counted:
    """The text encoder with a progress report after every ``encode`` / ``encode_embeddings``."""

    def __init__(self, encoder, progress: _Progress):
        self.encoder, self.progress, self.end_id = encoder, progress, encoder.end_id

    def tokenize(self, text):
        return self.encoder.tokenize(text)

    def encode(self, prompts):
        out = self.encoder.encode(prompts)
        self.progress.add(len(prompts))
        return out

    def word_embeddings(self, text):
        return self.encoder.word_embeddings(text)

    def encode_embeddings(self, templates, embeddings):
        out = self.encoder.encode_embeddings(templates, embeddings)
        self.progress.add(len(templates))
        return out


def gate_concepts(concepts: str, concept_type: str, preserve: str, builtin_preserve: bool):
    """(concepts parsed, their templates, the preserve prompts, their groups) of a gate node's inputs;
    no concepts, or a concept also in ``preserve``, is refused naming the field."""
    parsed = require_concepts(parse_concepts(concepts, "concepts"), "concepts")
    check_disjoint(parsed, parse_concepts(preserve, "preserve", allow_anchor=False))
    templates = templates_for(concept_type)
    keep, groups = preserve_groups(preserve, templates, builtin_preserve)
    return parsed, templates, keep, groups


def gate_info(method: str, parsed, default_anchor: str, concept_type: str, preserve: str, builtin_preserve: bool,
              n_captions: int) -> dict:
    """What a gate node records of its inputs (the erasure's ``info``, saved as the file's metadata)."""
    return {
        "method": method,
        "concepts": [{"phrases": list(c.phrases), "anchor": default_anchor if c.anchor is None else c.anchor}
                     for c in parsed],
        "concept_type": concept_type,
        "preserve": preserve_phrases(preserve),
        "builtin_preserve": builtin_preserve,
        "calibration_captions": n_captions,
    }


NODE_ID = "MaceGatedErasure"
_default = partial(presets.default, NODE_ID)


class MaceGatedErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        c = gate_concept_inputs()
        return io.Schema(
            node_id="MaceGatedErasure",
            display_name="MACE Gated Erasure (ACE)",
            category="MACE",
            description="ACE-style gated erasure: the concept's directions in the text features are nulled out "
            "only where the prompt carries the concept (a gate calibrated on ordinary prompts), as a "
            "cross-attention patch, so prompts without it are untouched; seconds, no images (preset 'robust' adds "
            "the slow adversarial refit). Use it when kept look-alikes must stay exactly as they were or when "
            "many similar names are erased; its file needs this pack to load (MACE Load Erasure), for a plain "
            "LoRA file use MACE Text Gate (compiled).",
            inputs=[
                io.Model.Input("model", tooltip="The model to gate (SD1.x, SD2.x or SDXL family); connect it "
                               "before any other erasure."),
                io.Clip.Input("clip", tooltip="The CLIP used for sampling with this model (same clip skip)."),
                c["concepts"], c["concept_type"], c["anchor"], c["preserve"], c["builtin_preserve"],
                advanced(io.Int.Input("rank", default=_default("rank"), min=1, max=4096,
                                      tooltip="Directions nulled out per concept (top singular vectors); 4-16.")),
                advanced(quantile_input(_default("quantile"))),
                advanced(io.Float.Input("margin", default=_default("margin"), min=-2.0, max=2.0, step=0.01, optional=True,
                                        tooltip="Added to the threshold (cosine units); > 0 opens the gate less "
                                        "often. -0.05 to 0.05.")),
                advanced(io.Float.Input("temperature", default=_default("temperature"), min=1e-6, max=10.0, step=0.001,
                                        optional=True, tooltip="How fast the gate opens above its threshold "
                                        "(cosine units): fully open about 2x this above it; 0.005-0.02. Below the "
                                        "threshold the ramp gate is closed, exactly.")),
                advanced(io.Int.Input("adversarial_rounds", default=_default("adversarial_rounds"), min=0, max=20,
                                      optional=True,
                                      tooltip="ACE's adversarial refit: each round attacks every concept with a "
                                      "soft prompt (optimised token embeddings, white-box against the gate) and "
                                      "refits the gate with what it found. 0 = off (seconds); 1-3. Costs "
                                      "attack_images sampled images per concept plus attack_steps backward passes "
                                      "per concept and round.")),
                advanced(io.Int.Input("attack_steps", default=_default("attack_steps"), min=1, max=10000, optional=True,
                                      tooltip="Adam steps of each soft-prompt attack (batch 4); 20-100.")),
                advanced(io.Int.Input("attack_images", default=_default("attack_images"), min=1, max=64, optional=True,
                                      tooltip="Images of each concept the connected model draws for the attacks "
                                      "(connect the model before any erasure); 4-16.")),
                advanced(io.Int.Input("image_size", default=512, min=64, max=2048, step=64, optional=True,
                                      tooltip="Side of the attack images (512 for SD1.x, 768 SD2.x, 1024 SDXL). "
                                      "Applies under every preset.")),
                advanced(io.Int.Input("sampling_steps", default=_default("sampling_steps"), min=1, max=200, optional=True,
                                      tooltip="Sampler steps per attack image (dpmpp_2m karras, cfg 7.5); 15-30.")),
                advanced(io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, optional=True,
                                      tooltip="Attack image i uses seed + i; attack r of concept i uses seed + "
                                      "100 r + i. Applies under every preset.")),
                advanced(io.Float.Input("open_rate", default=_default("open_rate"), min=0.0, max=1.0, step=0.01,
                                        optional=True,
                                        tooltip="Shared threshold floor: at most this share of phrases like the "
                                        "preserve list (unseen ones) should open any concept's gate; it matters "
                                        "when many concepts are erased (0.01-0.1). Set from the preserve phrases "
                                        "(list many for a tight floor: with G phrases it cannot go below "
                                        "1/(G+1)). 1 = off; use 1 with adversarial_rounds (on the toy world the "
                                        "floor makes the gate easier to undo with an optimised prompt; the robust "
                                        "setting measured there: gate sigmoid, temperature 0.02, open_rate 1, "
                                        "adversarial_rounds 2 = preset 'robust').")),
                advanced(io.Combo.Input("gate", options=list(GATE_SHAPES), default=_default("gate"), optional=True,
                                        tooltip="ramp: closed, exactly, below the threshold (prompts without the "
                                        "concept are untouched). sigmoid: the first gate, centred on the threshold "
                                        "(about 1/2 there); its partial gates add up over many concepts, but with "
                                        "temperature 0.02, open_rate 1 and adversarial_rounds 2 it resisted "
                                        "optimised prompts on the toy world, the ramp did not.")),
                presets.preset_input(NODE_ID),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the gate as an attn2 patch "
                                     "(weights unchanged); MACE Save Erasure writes it as a gate file."),
                     io.String.Output(display_name="summary", tooltip="The gate's thresholds and every setting "
                                      "used.")],
        )

    @classmethod
    def execute(cls, model, clip, concepts, concept_type, anchor, preserve, builtin_preserve, rank, quantile,
                margin=DEFAULTS.margin, temperature=DEFAULTS.temperature, adversarial_rounds=0,
                attack_steps=ATTACK.steps, attack_images=8, image_size=512, sampling_steps=20,
                seed=0, open_rate=DEFAULTS.open_rate, gate=DEFAULTS.gate,
                preset=presets.CUSTOM) -> io.NodeOutput:
        check_inputs(cls, locals())
        tuned = presets.resolve(NODE_ID, preset, dict(locals()))
        rank, quantile, margin, temperature = tuned["rank"], tuned["quantile"], tuned["margin"], tuned["temperature"]
        adversarial_rounds, attack_steps = tuned["adversarial_rounds"], tuned["attack_steps"]
        attack_images, sampling_steps = tuned["attack_images"], tuned["sampling_steps"]
        open_rate, gate = tuned["open_rate"], tuned["gate"]
        settings_line = presets.settings_text(tuned, {"concept_type": concept_type, "anchor": anchor,
                                                      "builtin_preserve": builtin_preserve,
                                                      "image_size": int(image_size), "seed": int(seed)})
        if get_gate(model) is not None:
            raise ValueError("model: already carries an ACE gate; erase every concept in one MACE Gated Erasure "
                             "(ACE) node")
        parsed, templates, keep, groups = gate_concepts(concepts, concept_type, preserve, builtin_preserve)
        default_anchor = normalise_phrase(anchor)
        config = ACEConfig(int(rank), float(quantile), float(margin), float(temperature), float(open_rate), str(gate))
        rounds, n_images, steps = int(adversarial_rounds), int(attack_images), int(sampling_steps)
        announce("MACE Gated Erasure (ACE)", WorkEstimate(
            len(parsed), encodes_for(parsed, len(templates), len(keep), default_anchor), solves=len(parsed),
            images=rounds * n_images * len(parsed), denoise_steps=rounds * n_images * len(parsed) * steps))
        base = effective_kv_weights(model)
        raw = ComfyTextEncoder(clip)
        if rounds:
            raw.require_embeddings()  # a CLIP without continuous embeddings is refused before any work
        anchors = {c.anchor for c in parsed if c.anchor is not None and c.anchor != default_anchor}
        fit_prompts = len(templates) * (1 + len(anchors) + sum(len(c.phrases) for c in parsed)) + len(keep)
        n = len(parsed)
        expected = (fit_prompts + prior_input.PRIOR_CAPTIONS + 3            # first fit (+ the cache's probes)
                    + (n * n_images * steps if rounds else 0)                  # attack images
                    + rounds * n * int(attack_steps)                           # attacks
                    + len(templates) * n * rounds * (rounds + 1) // 2)         # refits: the soft prompts found
        progress = _Progress(expected)
        counted = _Counted(raw, progress)
        t0 = time.perf_counter()
        captions, caption_enc = prior_input.caption_encodings(counted)  # cached per CLIP after the first run
        encoder = CachedTextEncoder(counted, max_prompts=len(captions) + fit_prompts + 64)
        encoder.remember(captions, caption_enc)

        def fit(found):
            return fit_gated_erasure(encoder, parsed, templates, default_anchor, keep + captions, config,
                                     adversarial=found, calibration_groups=groups + [None] * len(captions))

        attack_seconds = 0.0
        if rounds == 0:
            erasure = fit({})
        else:
            sampler = default_sampler()
            latents = []
            for concept in parsed:  # the attacker's images: what the connected model draws for the concept
                prompts = concept_prompts(concept, templates, n_images)
                done_before = progress.done
                drawn = sample_latents(model, clip, prompts, steps, DEFAULT_CFG, int(seed), int(image_size),
                                       int(image_size), sampler, DEFAULT_SCHEDULER, "",
                                       lambda done, _total: progress.add(done_before + done - progress.done))
                latents.append(model.model.process_latent_in(drawn).float())
            t1 = time.perf_counter()
            denoiser = ComfyDenoiser(model, backward=True, prediction="eps")

            def tick():
                progress.add(1)  # an interrupt point too (NodeProgress)
                return False

            def attack(erasure, i, r):
                concept = parsed[i]
                init = concept.anchor or default_anchor or DEFAULT_ANCHORS.get(concept_type) or "object"
                cfg = SoftPromptConfig(ATTACK.tokens, int(attack_steps), ATTACK.lr, ATTACK.batch_size,
                                       int(seed) + 100 * r + i, ATTACK.schedule)
                return soft_prompt_attack(raw, denoiser, latents[i], templates, init, cfg,
                                          context_transform=_attackable(erasure, denoiser.device),
                                          should_stop=tick)

            try:
                erasure, _found = refit_rounds(fit, attack, n, rounds)
            finally:
                denoiser.release()
            attack_seconds = time.perf_counter() - t1
        seconds = time.perf_counter() - t0
        check_gate_fits(erasure, base, "clip")
        info = {**gate_info("ace", parsed, default_anchor, concept_type, preserve, builtin_preserve, len(captions)),
                "ace": dict(config.__dict__)}
        if rounds:
            info["adversarial"] = {"rounds": rounds, "attack_steps": int(attack_steps), "attack_images": n_images,
                                   "image_size": int(image_size), "sampling_steps": steps, "seed": int(seed),
                                   "tokens": ATTACK.tokens, "lr": ATTACK.lr, "batch_size": ATTACK.batch_size}
        out = apply_gate(model, GateRecord(erasure, base_fingerprint(model, base), info))
        progress.finish()
        refit = (f" with {rounds} adversarial round(s) ({n * rounds} soft-prompt attacks of {int(attack_steps)} steps "
                 f"on {n_images} image(s) per concept, {attack_seconds:.1f}s)" if rounds else "")
        summary = (
            f"ACE gate for {len(parsed)} concept(s), rank {int(erasure.bases.shape[2])}, fitted in {seconds:.2f}s{refit} "
            f"on {len(keep) + len(captions)} calibration prompts (thresholds "
            f"{', '.join(f'{t:.3f}' for t in erasure.thresholds.tolist())}). Applied as an attn2 patch; "
            "the stock LoRA loader cannot apply it.\n" + settings_line + "\n" + json.dumps(info["concepts"])
        )
        return io.NodeOutput(out, summary)
