"""Node ``MACE Train Concept LoRA``: MACE stage 2, one concept's K/V LoRA with the attention loss.

The images are VAE-encoded (and scaled into the model's latent space with
``latent_format.process_in``), the model is wrapped as a ``CrossAttentionDenoiser``
(``comfy_denoiser``: a private clone with weight wrappers and attn2 patches, the shared model is
never modified), and ``mace_ops.lora_train.train_concept_lora`` trains rank-r factors on every
cross-attention to_k/to_v weight so the concept's tokens lose their attention inside the masks.
The LoRA is written atomically (stock LoRA key format, loads with LoraLoaderModelOnly) and the
output MODEL is a clone with the LoRA's deltas as patches (its MACE record grows by one stage,
so ``MACE Save Erasure`` downstream writes CFR + LoRA together). Every step is a progress
update and an interrupt point; an interrupt leaves no file.
"""
from __future__ import annotations

import logging
import os
import re

import torch

import comfy.model_management
from .comfy_compat import advanced, io

from ..mace_ops.concepts import parse_concepts, require_concepts
from ..mace_ops.erasure_file import weights_fingerprint
from ..mace_ops.lora_file import save_concept_lora
from ..mace_ops.lora_train import (DEFAULT_QUERY_SAMPLES, DEFAULTS_BY_TYPE, OBJECTIVES, PATH_CHOICES, PATH_TOOLTIP,
                                   attention_masks, config_for, train_concept_lora, training_path)
from ..mace_ops.templates import templates_for
from ..mace_ops.validation import require_finite
from .comfy_denoiser import ComfyDenoiser
from .comfy_model import apply_erasure, effective_kv_weights, get_record
from .comfy_text_encoder import ComfyTextEncoder
from .paths import save_file_path
from .progress import NodeProgress
from .validation import check_inputs

CONCEPT_TYPES = ("object", "person", "style", "nudity")
MASK_MODES = ("auto", "given", "whole image", "from attention")

# Our own small set for explicit content (the words are usually adjectives/nouns like "nudity",
# "naked", "nude"); the other types use mace_ops.templates.
NUDITY_TEMPLATES: tuple[str, ...] = (
    "a photo of {}",
    "a picture showing {}",
    "a painting of {}",
    "an artwork with {}",
    "a photo of a {} person",
    "a {} woman",
    "a {} man",
    "{} people at the beach",
    "a {} body",
    "a sketch of a {} figure",
    "a film still with {}",
    "a photo of a {} model in a studio",
)


def concept_templates(concept_type: str) -> tuple[str, ...]:
    if concept_type not in CONCEPT_TYPES:
        raise ValueError(f"concept_type: unknown {concept_type!r}; choose one of {list(CONCEPT_TYPES)}")
    if concept_type == "nudity":
        return NUDITY_TEMPLATES
    return templates_for(concept_type)


def one_concept(text: str, field: str = "concept"):
    concepts = require_concepts(parse_concepts(text, field), field)
    if len(concepts) != 1:
        raise ValueError(f"{field}: one concept per LoRA (got {len(concepts)} lines); use one node per concept")
    return concepts[0]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("_.") or "concept"


def lora_path(filename_prefix: str, concept_name: str) -> str:
    """Next free ``<output>/<prefix>_<counter>_.safetensors``; ``{concept}`` in the prefix is replaced."""
    return save_file_path(filename_prefix.replace("{concept}", slug(concept_name)), example="loras/mace_lora/{concept}")


def prepare_masks(masks, n_images: int) -> torch.Tensor:
    """ComfyUI MASK (B, H, W) or (H, W) -> (n_images, H, W) float in [0, 1]."""
    m = masks.detach().to(torch.float32)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"masks: expected a MASK batch (B, H, W), got shape {tuple(masks.shape)}")
    if m.shape[0] == 1 and n_images > 1:
        m = m.expand(n_images, -1, -1)
    if m.shape[0] != n_images:
        raise ValueError(f"masks: {m.shape[0]} masks for {n_images} images; give one mask per image (or one for all)")
    if float(m.amax()) <= 0.5:
        raise ValueError("masks: every mask is empty (all values <= 0.5); the loss would be zero")
    return m.clone()


def encode_images(vae, model, images: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, C) in [0, 1] -> model-space latents (VAE encode, then latent_format.process_in)."""
    if vae is None:
        raise ValueError("vae: no VAE connected; connect the VAE of your checkpoint loader")
    if images is None or images.ndim != 4 or images.shape[0] < 1:
        raise ValueError("images: expected an IMAGE batch (B, H, W, C) with at least one image")
    require_finite(images, "images", "the IMAGE holds NaN/inf values; regenerate or reload the images")
    channels_in = images.shape[-1]
    if channels_in == 1:  # grayscale: the VAE reads RGB
        images = images.expand(-1, -1, -1, 3)
    elif channels_in < 3:
        raise ValueError(f"images: {channels_in} channels per pixel; give RGB (3) or RGBA (4) images, e.g. "
                         "convert them with an image-to-RGB node")
    raw = vae.encode(images[:, :, :, :3])
    latents = model.model.process_latent_in(raw.to(torch.float32))
    require_finite(latents, "images: the VAE latents", "the VAE gives NaN/inf (common with fp16 VAEs); "
                   "load the VAE in fp32/bf16 (--fp32-vae) or use another VAE")
    channels = getattr(model.model.latent_format, "latent_channels", latents.shape[1])
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise ValueError(f"vae: latents of shape {tuple(latents.shape)} do not fit this model ({channels} channels); "
                         "use the VAE that belongs to the model")
    return latents.detach().to(torch.float32).cpu()


class MaceTrainConceptLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MaceTrainConceptLora",
            display_name="MACE Train Concept LoRA",
            category="MACE",
            description="MACE stage 2: trains a small LoRA on the cross-attention keys/values so the concept's "
            "words stop drawing attention where the concept appears in the images, writes the LoRA file and "
            "outputs the model with it applied. Use it to build MACE by hand for one concept (CFR with preset "
            "'paper' before it, MACE Fuse LoRAs after it for several); MACE Mass Erase runs the same stages for a "
            "list.",
            inputs=[
                io.Model.Input("model", tooltip="Usually the MODEL output of MACE Refine Cross-Attention (CFR)."),
                io.Clip.Input("clip", tooltip="The CLIP used for sampling with this model (same clip skip)."),
                io.Vae.Input("vae", tooltip="Encodes the training images into the model's latent space."),
                io.Image.Input("images", tooltip="Images showing the concept (e.g. from MACE Training Images); "
                               "8 is typical, sides a multiple of 8."),
                io.String.Input("concept", default="van gogh, vincent van gogh",
                                tooltip="One concept; synonyms on the same line separated by commas."),
                io.Combo.Input("concept_type", options=list(CONCEPT_TYPES), default="style",
                               tooltip="Chooses the prompt templates and the reference defaults for steps, "
                               "learning rate and timestep sampler."),
                io.Combo.Input("mask_mode", options=list(MASK_MODES), default="auto",
                               tooltip="Where the loss looks: 'given' = the masks input; 'whole image' = every pixel; "
                               "'from attention' = where the model itself attends to the concept's words; "
                               "'auto' = the masks if connected, else the whole image."),
                advanced(io.Int.Input("steps", default=0, min=0, max=100000,
                                      tooltip="Training steps; 0 = the type's reference default (50; 120 for "
                                      "nudity). 20-200 is the useful range.")),
                advanced(io.Float.Input("lr", default=0.0, min=0.0, max=1.0, step=1e-5, round=1e-8,
                                        tooltip="Learning rate; 0 = the type's reference default "
                                        "(1e-5 objects/nudity, 1e-4 persons/styles). Stay within 1e-5 to 1e-3.")),
                advanced(io.Int.Input("rank", default=1, min=1, max=128,
                                      tooltip="LoRA rank (the reference uses 1; 1-4).")),
                io.Int.Input("seed", default=2024, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Fixes the LoRA init and the prompt/image/timestep/noise draws: "
                             "same seed, same LoRA (on CPU)."),
                advanced(io.Combo.Input("sampler", options=["auto", "cfis", "uniform"], default="auto",
                                        tooltip="Timestep sampling: cfis = concept-focal importance sampling "
                                        "(t around 200-400); uniform; auto = the type's default (uniform for "
                                        "nudity).")),
                advanced(io.Boolean.Input("include_end_tokens", default=True,
                                          tooltip="Also remove attention from the end/padding tokens (the "
                                          "reference does; on SD1 they carry the whole prompt).")),
                io.String.Input("filename_prefix", default="loras/mace_lora/{concept}",
                                tooltip="Relative to the output folder; {concept} is replaced by the concept's name. "
                                "'loras/...' shows up in LoRA loaders."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Optional concept masks, one per image (or one for all); white = concept."),
                advanced(io.Combo.Input("objective", options=list(OBJECTIVES), default="attention", optional=True,
                                        tooltip="attention = MACE (the concept's words lose their attention mass); "
                                        "trajectory = ANT-style (keep the early denoising steps, reverse the "
                                        "guidance direction for the concept after t'=500; masks and sampler are "
                                        "not used).")),
                advanced(io.Combo.Input("lora_training", options=list(PATH_CHOICES), default="auto", optional=True,
                                        tooltip=PATH_TOOLTIP)),
                advanced(io.Int.Input("query_samples", default=DEFAULT_QUERY_SAMPLES, min=0, max=100000,
                                      optional=True,
                                      tooltip="cached_queries: training samples whose queries are recorded (one "
                                      "UNet forward each); 0 = one per step (the draws full backprop would train "
                                      "on). 4-50.")),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the LoRA applied (its MACE record "
                                "grows by one stage, so MACE Save Erasure writes CFR + LoRA together)."),
                io.String.Output(display_name="lora_path", tooltip="The LoRA file written (for MACE Fuse LoRAs)."),
                io.String.Output(display_name="summary", tooltip="Steps, time, loss and the settings used."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, images, concept, concept_type, mask_mode, steps, lr, rank, seed, sampler,
                include_end_tokens, filename_prefix, masks=None, objective="attention", lora_training="auto",
                query_samples=DEFAULT_QUERY_SAMPLES) -> io.NodeOutput:
        check_inputs(cls, locals())
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: unknown {objective!r}; choose one of {list(OBJECTIVES)}")
        if concept_type not in CONCEPT_TYPES:
            raise ValueError(f"concept_type: unknown {concept_type!r}; choose one of {list(CONCEPT_TYPES)}")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode: unknown {mask_mode!r}; choose one of {list(MASK_MODES)}")
        parsed = one_concept(concept)
        templates = concept_templates(concept_type)
        defaults = DEFAULTS_BY_TYPE[concept_type]
        mode = mask_mode if mask_mode != "auto" else ("given" if masks is not None else "whole image")
        if mode == "given" and masks is None:
            raise ValueError("mask_mode 'given' needs the masks input; connect a MASK or choose 'whole image'")
        path = lora_path(filename_prefix, parsed.name)

        latents = encode_images(vae, model, images)
        pixel_masks = prepare_masks(masks, latents.shape[0]) if mode == "given" else None
        encoder = ComfyTextEncoder(clip)
        base = effective_kv_weights(model)
        record = get_record(model)  # the base model before any MACE edit: what Fuse and Load check against
        fingerprint = record.base_fingerprint if record is not None else weights_fingerprint(base)
        config = config_for(
            concept_type,
            steps=int(steps) or defaults.steps,
            lr=float(lr) or defaults.lr,
            rank=int(rank),
            seed=int(seed),
            sampler=defaults.sampler if sampler == "auto" else sampler,
            include_end_tokens=bool(include_end_tokens),
            use_masks=mode != "whole image",
            objective=objective,
            path=training_path(lora_training, objective),
            query_samples=int(query_samples),
        )
        config.validate()
        denoiser = ComfyDenoiser(model, backward=config.path == "full")
        try:
            if mode == "from attention":
                pixel_masks = attention_masks(denoiser, encoder, parsed, templates, latents, seed=int(seed))
            result = train_concept_lora(
                denoiser, encoder, parsed, templates, latents, pixel_masks, config,
                progress=NodeProgress(config.steps),
                should_stop=comfy.model_management.throw_exception_if_processing_interrupted,
            )
        finally:
            denoiser.release()

        losses = result.losses
        k = max(1, min(5, len(losses) // 4))
        head, tail = sum(losses[:k]) / k, sum(losses[-k:]) / k
        every = max(1, len(losses) // 10)
        logging.info("MACE LoRA %r: loss by step %s", parsed.name,
                     ", ".join(f"{i + 1}:{losses[i]:.4g}" for i in range(0, len(losses), every)))
        info = result.info()
        info.update({
            "method": "lora",
            "concept_type": concept_type,
            "mask_mode": mode,
            "templates": len(templates),
            "losses": [round(x, 6) for x in losses],
        })  # no timings: identical inputs give a byte-identical file
        save_concept_lora(path, result.lora, fingerprint, info)

        stage = {"method": "lora", "concept": list(parsed.phrases), "concept_type": concept_type,
                 "file": os.path.basename(path), "steps": config.steps, "lr": config.lr, "rank": config.rank,
                 "seed": config.seed}
        deltas = {name: d.to("cpu") for name, d in result.lora.deltas().items()}
        out = apply_erasure(model, deltas, base, stage)
        summary = (
            f"MACE LoRA for {parsed.name!r} ({concept_type}): {config.steps} steps in {result.seconds:.1f}s, "
            f"rank {config.rank}, lr {config.lr:g}, {config.sampler} timesteps, masks: {mode}, "
            f"{config.path.replace('_', ' ')}"
            + (f" ({config.query_pool()} recorded samples)" if config.path == "cached_queries" else "") + ", "
            f"{latents.shape[0]} image(s), {info['settings']['prompts']} prompts.\n"
            f"loss {head:.4g} -> {tail:.4g} (mean of first/last {k} steps; "
            f"first {losses[0]:.4g}, last {losses[-1]:.4g})\n"
            f"saved {path}"
        )
        logging.info(summary)
        return io.NodeOutput(out, path, summary, ui={"text": [summary]})
