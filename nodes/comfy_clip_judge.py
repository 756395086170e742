"""Adapter: ComfyUI's CLIP_VISION and the checkpoint's CLIP text tower as ``mace_ops.clip_judge`` encoders.

**Text side.** The tower whose pooled output ComfyUI returns: SD1.x ``clip_l`` (CLIP ViT-L/14's text
tower), SD2.x ``clip_h`` (OpenCLIP ViT-H/14), SDXL ``clip_g`` (OpenCLIP ViT-bigG/14). Every prompt is
encoded with ``clip.encode_from_tokens(tokens, return_pooled="unprojected")`` (the final-layer
end-token state, whatever the clip-skip setting) and then put through the tower's own
``transformer.text_projection``. In ComfyUI 0.3.64 ``return_pooled=True`` is *not* the projected
output everywhere: ``SD1CheckpointClipModel`` (SD1.x, also what the stock CLIP loader builds for a
lone clip_l file) returns the unprojected state, and SD1.x checkpoints have no slot for the
projection (``supported_models.SD15.process_clip_state_dict`` renames a ``transformer.text_projection``
key into ``text_model.``, where nothing loads it; the loader silences that missing key), so that
weight is whatever ``torch.empty`` gave. SD2.x and SDXL checkpoints carry theirs (ComfyUI projects
their pooled output itself). Refused: a projection whose width is not the vision model's (the
message names the vision model of the tower's CLIP), and one that is all zeros or not finite (not
loaded). A non-zero SD1.x projection is used but flagged: it is real only when ``clip`` came from
a text-encoder file that has it; the table's mean best cosine is the check.

**Image side.** The latents are decoded (``decode_latents``, a batch at a time) and encoded with
``clip_vision.encode_image(images, crop=True)`` (ComfyUI's CLIP preprocessing: resize the short
side, centre crop, CLIP mean/std); its ``image_embeds`` are the projected ones. Refused: image
encoders without a CLIP projection (DINOv2, SigLIP, a vision model without ``projection_dim``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

import comfy.model_management

from .comfy_compat import plain_weight
from .training_images_node import decode_latents

FIELD = "clip_vision"
TOWER_NAMES = {"clip_l": "CLIP ViT-L/14's text tower (SD1.x)", "clip_h": "OpenCLIP ViT-H/14's text tower (SD2.x)",
               "clip_g": "OpenCLIP ViT-bigG/14's text tower (SDXL)"}
MATCHING_VISION = {
    "clip_l": "the CLIP ViT-L/14 vision model (OpenAI clip-vit-large-patch14, 224 px; 768-wide embeddings)",
    "clip_h": "the OpenCLIP ViT-H/14 vision model (CLIP-ViT-H-14-laion2B-s32B-b79K; 1024-wide embeddings)",
    "clip_g": "the OpenCLIP ViT-bigG/14 vision model (CLIP-ViT-bigG-14-laion2B-39B-b160k; 1280-wide embeddings)",
}


def pooled_tower(clip):
    """(name, tower) of the text encoder whose pooled output ``encode_from_tokens`` returns."""
    cm = getattr(clip, "cond_stage_model", None)
    name = getattr(cm, "clip", None)
    if isinstance(name, str) and getattr(cm, name, None) is not None:   # SD1ClipModel and subclasses (SD2, refiner)
        return name, getattr(cm, name)
    if getattr(cm, "clip_g", None) is not None:                          # SDXL: pooled from bigG
        return "clip_g", cm.clip_g
    raise ValueError(f"{FIELD}: the CLIP judge needs a CLIP text tower (SD1.x, SD2.x, SDXL); this CLIP "
                     f"({type(cm).__name__}) has none it knows; disconnect clip_vision")


def _linear(module):
    return module if isinstance(module, torch.nn.Linear) else None


def _unloaded(weight: torch.Tensor) -> bool:
    w = plain_weight(weight).detach()
    return (not bool(torch.isfinite(w).all())) or not bool(w.ne(0).any())


class ClipJudgeEncoders:
    """The two encoders, checked against each other when built (before any sampling)."""

    def __init__(self, clip, clip_vision, check_interrupt: Callable[[], None] | None =
                 comfy.model_management.throw_exception_if_processing_interrupted):
        self.clip, self.clip_vision, self.check_interrupt = clip, clip_vision, check_interrupt
        vision = getattr(clip_vision, "model", None)
        if vision is None or not callable(getattr(clip_vision, "encode_image", None)):
            raise ValueError(f"{FIELD}: not a CLIP vision model; connect the output of the stock Load CLIP Vision node")
        vproj = _linear(getattr(vision, "visual_projection", None))
        self.tower_name, tower = pooled_tower(clip)
        want = MATCHING_VISION.get(self.tower_name, f"the vision model of the CLIP whose text tower is {self.tower_name}")
        if vproj is None:
            raise ValueError(f"{FIELD}: this image encoder ({type(vision).__name__}) has no CLIP image projection "
                             f"(DINOv2, SigLIP and vision models without projection_dim have none), so it shares no "
                             f"space with a text tower; connect {want}")
        tproj = _linear(getattr(getattr(tower, "transformer", None), "text_projection", None))
        if tproj is None:
            raise ValueError(f"{FIELD}: this checkpoint's text tower ({self.tower_name}) has no text projection; "
                             "the CLIP judge needs one; disconnect clip_vision")
        self.width, vwidth = int(tproj.weight.shape[0]), int(vproj.weight.shape[0])
        if self.width != vwidth:
            raise ValueError(f"{FIELD}: this vision model's image embeddings are {vwidth} wide, but the checkpoint's "
                             f"text tower ({TOWER_NAMES.get(self.tower_name, self.tower_name)}) projects to "
                             f"{self.width}: they are not one CLIP. Connect {want}, or disconnect clip_vision")
        if _unloaded(vproj.weight):
            raise ValueError(f"{FIELD}: the vision model's projection (visual_projection) is not loaded (all zeros or "
                             f"not finite); load a CLIP vision file that includes it ({want})")
        # ComfyUI's own contract: towers it projects by default carry their projection (SD2.x clip_h, SDXL clip_g)
        self.projected_by_comfy = bool((getattr(tower, "options_default", None) or (None, None, False))[2])
        if _unloaded(tproj.weight):
            raise ValueError(
                f"{FIELD}: the text tower's projection ({self.tower_name}.transformer.text_projection) is not loaded "
                "(all zeros or not finite). SD1.x checkpoints do not carry it, so their CLIP shares no space with "
                "any image model. Connect as clip the same text encoder loaded from a file that includes its "
                "text_projection (stock Load CLIP, type stable_diffusion), or disconnect clip_vision.")
        self.projection = tproj
        self.image_size = int(getattr(clip_vision, "image_size", 224))

    @property
    def note(self) -> str | None:
        """What the table says about the projection when ComfyUI itself does not use it."""
        if self.projected_by_comfy:
            return None
        return (f"text projection: {self.tower_name}'s, which ComfyUI does not use for this model; SD1.x checkpoints "
                "do not carry it, so these numbers hold only if clip came from a text-encoder file that has it")

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for text in texts:
            if self.check_interrupt is not None:
                self.check_interrupt()
            tokens = self.clip.tokenize(text, disable_weights=True)
            _cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled="unprojected")
            if pooled is None:
                raise ValueError(f"{FIELD}: the text encoder gave no pooled output; disconnect clip_vision")
            out.append(self.projection(pooled[:1].float()).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.width)

    def image_encoder(self, vae, latents: torch.Tensor) -> Callable[[Sequence[int]], torch.Tensor]:
        """``encode(indices)``: latents ``indices`` (KSampler's space) decoded and embedded."""
        @torch.no_grad()
        def encode(indices: Sequence[int]) -> torch.Tensor:
            if self.check_interrupt is not None:
                self.check_interrupt()
            images = decode_latents(vae, latents[list(indices)])
            return self.clip_vision.encode_image(images, crop=True)["image_embeds"].float().cpu()
        return encode
