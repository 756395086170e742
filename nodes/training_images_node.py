"""Node ``MACE Training Images``: the concept's training images, sampled by the model itself.

MACE trains each concept's LoRA on a handful of images of the concept made by the model being
erased. This node fills the concept's prompt templates (image i uses template i and synonym i,
cycling) and samples them with ComfyUI's own sampler (``comfy.sample.sample``, the KSampler
path: same noise for a seed as a stock KSampler with seed + i), then decodes with the VAE. No
dataset, downloader or segmenter is needed; masks can come from ``MACE Train Concept LoRA``'s
"from attention" mode. Progress covers all images; every sampling step is an interrupt point.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
from .comfy_compat import io

from ..mace_ops.templates import fill
from ..mace_ops.validation import derive_seed
from .lora_train_node import CONCEPT_TYPES, concept_templates, one_concept
from .progress import NodeProgress
from .validation import check_inputs, require_clip_vae


DEFAULT_CFG = 7.5
DEFAULT_SCHEDULER = "karras"


def default_sampler() -> str:
    """dpmpp_2m where this ComfyUI has it (the nodes' default), else its first sampler."""
    samplers = comfy.samplers.KSampler.SAMPLERS
    return "dpmpp_2m" if "dpmpp_2m" in samplers else samplers[0]


def concept_prompts(concept, templates, count: int) -> list[str]:
    """Prompt i = template i with synonym i (both cycling)."""
    phrases = concept.phrases
    return [fill(templates[i % len(templates)], phrases[i % len(phrases)]) for i in range(count)]


def training_prompts(concept_text: str, concept_type: str, count: int) -> list[str]:
    return concept_prompts(one_concept(concept_text), concept_templates(concept_type), count)


def sample_latents(model, clip, prompts, steps: int, cfg: float, seed: int, width: int, height: int,
                   sampler_name: str, scheduler: str, negative: str = "", progress=None) -> torch.Tensor:
    """One latent per prompt with ComfyUI's KSampler path (image i uses seed + i), in the VAE's latent
    space as KSampler outputs it (``model.model.process_latent_in`` gives the model's), float32 (N, C, h, w)."""
    negative_cond = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
    out = []
    for i, prompt in enumerate(prompts):
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        latent = torch.zeros([1, 4, height // 8, width // 8])
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        image_seed = derive_seed(seed, i)
        noise = comfy.sample.prepare_noise(latent, image_seed)

        def callback(step, x0, x, total_steps, i=i):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if progress is not None:
                progress(i * steps + min(step + 1, steps), len(prompts) * steps)

        samples = comfy.sample.sample(
            model, noise, steps, cfg, sampler_name, scheduler, positive, negative_cond, latent,
            denoise=1.0, callback=callback, disable_pbar=True, seed=image_seed,
        )
        out.append(samples.to(torch.float32).cpu())
    return torch.cat(out, 0)


def sample_images(model, clip, vae, prompts, steps: int, cfg: float, seed: int, width: int, height: int,
                  sampler_name: str, scheduler: str, negative: str = "", progress=None) -> torch.Tensor:
    """One decoded image per prompt with ComfyUI's KSampler path; image i uses seed + i. IMAGE (N, H, W, C)."""
    latents = sample_latents(model, clip, prompts, steps, cfg, seed, width, height, sampler_name, scheduler,
                             negative, progress)
    return decode_latents(vae, latents)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """IMAGE (N, H, W, C) float32 on the CPU: each of ``latents`` (KSampler's output space) decoded alone."""
    images = []
    for samples in latents:
        decoded = vae.decode(samples[None])
        if decoded.ndim == 5:  # video VAEs return (B, T, H, W, C)
            decoded = decoded.reshape(-1, *decoded.shape[-3:])
        images.append(decoded.to(torch.float32).cpu())
    return torch.cat(images, 0)


class MaceTrainingImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MaceTrainingImages",
            display_name="MACE Training Images",
            category="MACE",
            description="Samples images of one concept with the model itself, from the concept's prompt templates "
            "(image i: template i with synonym i, seed + i). Use it to make the training images for MACE Train "
            "Concept LoRA, with the model before any erasure (MACE Mass Erase does this step itself).",
            inputs=[
                io.Model.Input("model", tooltip="The original model (before CFR), so the images show the concept."),
                io.Clip.Input("clip", tooltip="The CLIP used for sampling with this model."),
                io.Vae.Input("vae", tooltip="Decodes the sampled latents into images."),
                io.String.Input("concept", default="van gogh, vincent van gogh",
                                tooltip="One concept; synonyms on the same line separated by commas."),
                io.Combo.Input("concept_type", options=list(CONCEPT_TYPES), default="style",
                               tooltip="Chooses the prompt templates: object, person, style, nudity."),
                io.Int.Input("count", default=8, min=1, max=256,
                             tooltip="Number of images (the reference uses 8; 4-16)."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampler steps per image (15-30)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance (5-8 for SD1.x/SDXL)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Image i uses seed + i."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8,
                             tooltip="Image width: 512 for SD1.x, 768 SD2.x, 1024 SDXL."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8,
                             tooltip="Image height: 512 for SD1.x, 768 SD2.x, 1024 SDXL."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="dpmpp_2m",
                               tooltip="Sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="karras",
                               tooltip="Noise schedule, as in KSampler."),
                io.String.Input("negative", default="", tooltip="Negative prompt for every image (may be empty)."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The images, one batch."),
                     io.String.Output(display_name="prompts", tooltip="The prompt of each image, one per line.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, concept, concept_type, count, steps, cfg, seed, width, height, sampler_name,
                scheduler, negative) -> io.NodeOutput:
        check_inputs(cls, locals())
        require_clip_vae(clip, vae)
        prompts = training_prompts(concept, concept_type, int(count))
        images = sample_images(model, clip, vae, prompts, int(steps), float(cfg), int(seed), int(width), int(height),
                               sampler_name, scheduler, negative, NodeProgress(len(prompts) * int(steps)))
        return io.NodeOutput(images, "\n".join(prompts))
