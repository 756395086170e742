"""Nodes to check an erasure: ``MACE Before/After Grid`` and ``MACE Concept Probe``.

* The grid samples every prompt (target, synonym, preserved) with the original and the erased
  model, same seed per row (``sample_images``: prompt i uses seed + i for both models), and lays
  the images out as one IMAGE: rows = prompts (labelled with group and text), columns
  "original" | "erased".
* The probe measures how much cross-attention the concept's own tokens still receive: each
  prompt is encoded, a seeded random latent is noised to each timestep and the original model
  runs once with its own K/V weights and once with the erased model's K/V weights substituted
  (the rest of the network is the original's). The mass on the concept tokens (end tokens
  excluded) is averaged over layers, heads, pixels and timesteps; the ratio erased / original
  below 1 means the erased weights route less attention to the concept.
"""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

import comfy.model_management
from .comfy_compat import io

from ..mace_ops.alignment import concept_positions
from ..mace_ops.attention_loss import concept_attention_mass
from ..mace_ops.pipeline import OverrideDenoiser
from ..mace_ops.validation import derive_seed
from .comfy_denoiser import ComfyDenoiser
from .comfy_model import effective_kv_weights
from .comfy_text_encoder import ComfyTextEncoder
from .lora_train_node import one_concept
from .progress import NodeProgress
from .sampling_inputs import sampling_inputs
from .training_images_node import sample_images
from .validation import check_inputs, require_clip_vae

GROUPS = ("target", "synonym", "preserved")
PAD, HEADER, LABEL = 4, 18, 14


def prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _fit(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _to_uint8(image: torch.Tensor) -> Image.Image:
    image = image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(*image.shape[:-1], 3)
    return Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy(), "RGB")


def compose_grid(rows: list[tuple[str, str]], before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """One IMAGE (1, H, W, 3): header "original" | "erased", then per row a label band and the two images."""
    h, w = int(before.shape[1]), int(before.shape[2])
    width = 2 * w + 3 * PAD
    height = HEADER + len(rows) * (LABEL + h + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for col, title in enumerate(("original", "erased")):
        draw.text((PAD + col * (w + PAD), 3), _fit(draw, font, title, w), fill="black", font=font)
    y = HEADER
    for i, (group, prompt) in enumerate(rows):
        draw.text((PAD, y + 1), _fit(draw, font, f"{group}: {prompt}", width - 2 * PAD), fill="black", font=font)
        y += LABEL
        canvas.paste(_to_uint8(before[i]), (PAD, y))
        canvas.paste(_to_uint8(after[i]), (2 * PAD + w, y))
        y += h + PAD
    data = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return (data.to(torch.float32) / 255.0)[None]


class MaceBeforeAfterGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MaceBeforeAfterGrid",
            display_name="MACE Before/After Grid",
            category="MACE",
            description="Samples target, synonym and preserved prompts with the original and the erased model "
            "(same seed per row) and shows them side by side in one labelled image. Use it for a quick look at an "
            "erasure; for numbers use MACE Erasure Check.",
            inputs=[
                io.Model.Input("original", tooltip="The model before erasure."),
                io.Model.Input("erased", tooltip="The model after erasure."),
                io.Clip.Input("clip", tooltip="The CLIP used for sampling with both models."),
                io.Vae.Input("vae", tooltip="Decodes the images."),
                io.String.Input("target_prompts", multiline=True, default="a painting in the style of van gogh",
                                tooltip="Prompts with the erased concept, one per line."),
                io.String.Input("synonym_prompts", multiline=True, default="",
                                tooltip="Prompts with the concept's synonyms, one per line (may be empty)."),
                io.String.Input("preserved_prompts", multiline=True, default="a painting in the style of monet",
                                tooltip="Prompts that should not change, one per line."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Row i uses seed + i for both models."),
                *sampling_inputs("euler", "normal"),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="One image: original | erased, a labelled row "
                                     "per prompt.")],
        )

    @classmethod
    def execute(cls, original, erased, clip, vae, target_prompts, synonym_prompts, preserved_prompts, seed, steps,
                cfg, width, height, sampler_name, scheduler) -> io.NodeOutput:
        check_inputs(cls, locals())
        require_clip_vae(clip, vae)
        if original is None or erased is None:
            raise ValueError("original/erased: connect both MODELs")
        rows = [(group, p) for group, text in zip(GROUPS, (target_prompts, synonym_prompts, preserved_prompts))
                for p in prompt_lines(text)]
        if not rows:
            raise ValueError("target_prompts, synonym_prompts, preserved_prompts: all empty; "
                             "give at least one prompt (one per line)")
        prompts = [p for _, p in rows]
        steps = int(steps)
        total = 2 * len(prompts) * steps
        bar = NodeProgress(total)
        args = (int(steps), float(cfg), int(seed), int(width), int(height), sampler_name, scheduler, "")
        before = sample_images(original, clip, vae, prompts, *args, progress=lambda d, t: bar(d, 2 * t))
        after = sample_images(erased, clip, vae, prompts, *args, progress=lambda d, t: bar(t + d, 2 * t))
        return io.NodeOutput(compose_grid(rows, before, after))


def parse_timesteps(text: str, limit: int) -> list[int]:
    try:
        values = [int(float(v)) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"timesteps: expected comma separated integers like '200,300,400', got {text!r}") from None
    if not values:
        raise ValueError("timesteps: empty; give e.g. '200,300,400'")
    bad = [v for v in values if not 0 <= v < limit]
    if bad:
        raise ValueError(f"timesteps: {bad} outside [0, {limit})")
    return values


def probe_concept(original, erased, clip, concept: str, prompts_text: str, timesteps: str, seed: int,
                  latent_size: int, progress=None):
    """(report, mean ratio erased/original) of the concept tokens' cross-attention mass."""
    phrases = one_concept(concept, "concept").phrases
    prompts = prompt_lines(prompts_text)
    if not prompts:
        raise ValueError("prompts: empty; give prompts containing the concept, one per line")
    encoder = ComfyTextEncoder(clip)
    phrase_ids = [encoder.tokenize(p) for p in phrases]
    encoded = encoder.encode(prompts)
    used, skipped = [], []
    for prompt, enc in zip(prompts, encoded):
        pos = sorted({i for ids in phrase_ids if ids
                      for i in concept_positions(enc.ids, enc.length, ids, encoder.end_id, False)})
        (used if pos else skipped).append((prompt, enc, pos))
    if not used:
        raise ValueError(f"prompts: none contains the concept ({', '.join(phrases)}); "
                         "write prompts that name the concept or a synonym")
    erased_weights = effective_kv_weights(erased)
    side = max(1, int(latent_size) // 8)
    denoiser = ComfyDenoiser(original)
    try:
        missing = sorted(set(denoiser.kv_keys) - set(erased_weights))
        if missing:
            raise ValueError(f"erased: not the same architecture as original (no {missing[0]})")
        steps = parse_timesteps(timesteps, denoiser.num_train_timesteps)
        override = OverrideDenoiser(denoiser, {k: erased_weights[k] for k in denoiser.kv_keys})
        device = denoiser.device
        total, done = len(used) * len(steps), 0
        results = []
        for pi, (prompt, enc, pos) in enumerate(used):
            context = enc.features[None].to(device)
            positions = torch.zeros(1, context.shape[1], dtype=torch.bool)
            positions[0, pos] = True
            masses = {"original": [], "erased": []}
            for ti, t in enumerate(steps):
                gen = torch.Generator().manual_seed(derive_seed(seed, 1000 * pi + ti))
                x0 = torch.randn(1, 4, side, side, generator=gen).to(device)
                noise = torch.randn(1, 4, side, side, generator=gen).to(device)
                tt = torch.full((1,), int(t), dtype=torch.long, device=device)
                x_t = denoiser.add_noise(x0, noise, tt)
                for name, den in (("original", denoiser), ("erased", override)):
                    probes = []
                    den.forward_with_attention(x_t, tt, context, probes.append)
                    masses[name].append(concept_attention_mass(probes, positions))
                done += 1
                if progress is not None:
                    progress(done, total)
                else:
                    comfy.model_management.throw_exception_if_processing_interrupted()
            a = sum(masses["original"]) / len(steps)
            b = sum(masses["erased"]) / len(steps)
            results.append((prompt, a, b, b / a if a > 0 else float("nan")))
    finally:
        denoiser.release()
    ratios = [r for *_, r in results if r == r]
    mean_ratio = sum(ratios) / len(ratios) if ratios else float("nan")
    lines = [f"MACE concept probe: {', '.join(phrases)} at t = {', '.join(map(str, steps))} "
             f"({side}x{side} latents, seed {int(seed)})"]
    for prompt, a, b, r in results:
        lines.append(f"{prompt!r}: original {a:.4f}, erased {b:.4f}, ratio {r:.3f}")
    for prompt, *_ in skipped:
        lines.append(f"{prompt!r}: skipped (no concept phrase in the prompt)")
    dropped = sum(1 for *_, r in results if r < 1.0)
    lines.append(f"Summary: mean ratio erased/original {mean_ratio:.3f}; attention dropped in {dropped} of "
                 f"{len(results)} prompt(s); {len(skipped)} skipped.")
    return "\n".join(lines), float(mean_ratio)


class MaceConceptProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MaceConceptProbe",
            display_name="MACE Concept Probe",
            category="MACE",
            description="Measures how much cross-attention the concept's tokens get with the erased K/V weights "
            "compared with the original ones (ratio < 1: the concept is attended less), without sampling or a VAE. "
            "Use it as a seconds-long sanity check of a K/V erasure (CFR, LoRA, fusion); it does not see ACE or "
            "text-gate erasures, which leave the K/V weights alone.",
            inputs=[
                io.Model.Input("original", tooltip="The model before erasure."),
                io.Model.Input("erased", tooltip="The model after erasure (same architecture)."),
                io.Clip.Input("clip", tooltip="The CLIP used for sampling with these models."),
                io.String.Input("concept", default="van gogh, vincent van gogh",
                                tooltip="One concept; synonyms separated by commas (each phrase is counted)."),
                io.String.Input("prompts", multiline=True,
                                default="a painting in the style of van gogh\n"
                                        "a portrait by vincent van gogh\nstarry night by van gogh",
                                tooltip="Prompts containing the concept, one per line; others are skipped."),
                io.String.Input("timesteps", default="200,300,400",
                                tooltip="Comma separated diffusion timesteps (0..999) the mass is averaged over."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Fixes the random latents and noise (same seed, same report)."),
                io.Int.Input("latent_size", default=64, min=8, max=1024, step=8,
                             tooltip="Pixel size of the random latent (64 -> 8x8 latents, cheap)."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="Per prompt: the concept's attention mass "
                                      "before and after, and the ratio."),
                     io.Float.Output(display_name="ratio", tooltip="Mean ratio erased/original (< 1: attended less).")],
        )

    @classmethod
    def execute(cls, original, erased, clip, concept, prompts, timesteps, seed, latent_size) -> io.NodeOutput:
        check_inputs(cls, locals())
        if original is None or erased is None:
            raise ValueError("original/erased: connect both MODELs")
        total = max(1, len(prompt_lines(prompts)) * max(1, len(str(timesteps).split(","))))
        report, ratio = probe_concept(original, erased, clip, concept, prompts, timesteps, int(seed),
                                      int(latent_size), NodeProgress(total))
        return io.NodeOutput(report, ratio)
