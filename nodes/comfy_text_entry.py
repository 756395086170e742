"""Adapter: where the prompt enters each model family -- the weights CFR edits and the text they read.

CFR replaces the conditioning c by M c wherever the model reads it, as one edit W' = W M of every
weight that reads c (mace_ops.cfr). Which weights those are depends on the family:

* UNets (SD1.x, SD2.x, SDXL family): every cross-attention ``attn2.to_k`` / ``to_v`` reads the CLIP
  features; SDXL's pooled embedding enters ``label_emb.0.0`` (its first 1280 columns).
* FLUX.1 dev / schnell (``supported_models.Flux`` and subclasses): T5-XXL's features enter through
  one linear layer, ``txt_in`` (context_in_dim -> hidden); nothing else reads them (the double blocks
  read ``txt_in``'s output). CLIP-L's pooled embedding enters ``vector_in.in_layer`` (all columns).
  No norm sits in front of ``txt_in``: M is fitted in T5's output space, which ``txt_in`` reads.
* SD3 / SD3.5 (``supported_models.SD3``): the conditioning is CLIP-L|CLIP-G's 77 positions (padded
  to 4096 wide) followed by T5's positions; all of them enter through ``context_embedder``
  (4096 -> hidden). The pooled CLIP-L|CLIP-G embedding (2048) enters ``y_embedder.mlp.0``.

Every other family is refused by :func:`text_entry`, naming it (``comfy_model.kv_keys``'s message).
"""
from __future__ import annotations

from dataclasses import dataclass

from .comfy_model import PREFIX, POOLED_KEY, kv_keys, model_family, pooled_text_width
from .comfy_text_encoder import ComfyTextEncoder

TEXT_ENTRY_FAMILIES = "FLUX.1 (dev, schnell) and SD3/SD3.5"
TEXT_ENTRY_NODES = "MACE Refine Cross-Attention (CFR), MACE Save Erasure and MACE Load Erasure"


@dataclass(frozen=True)
class TextEntry:
    family: str                 # ComfyUI's config class name ("Flux", "FluxSchnell", "SD3", "SD15", ...)
    keys: tuple[str, ...]       # the weights reading the conditioning (state-dict keys, "diffusion_model.")
    pooled_key: str | None      # the weight reading the pooled embedding (its first pooled_width columns)
    pooled_width: int | None
    encoder: str                # "clip" (UNets), "t5" (FLUX: T5's tokens), "sd3" (CLIP window, then T5's)

    @property
    def unet(self) -> bool:
        return self.encoder == "clip"

    def where(self) -> str:
        """The edited weights in words, for summaries."""
        if self.unet:
            return f"{len(self.keys)} K/V weights"
        return ", ".join(k[len(PREFIX):-len(".weight")] for k in self.keys)

    def text_encoder(self, clip, **kw):
        """The ``TextEncoder`` giving exactly the features these weights read."""
        if self.encoder == "t5":
            return ComfyTextEncoder(clip, key="t5xxl", **kw)
        if self.encoder == "sd3":
            from .comfy_sd3_encoder import SD3TextEncoder
            return SD3TextEncoder(clip, **kw)
        return ComfyTextEncoder(clip, **kw)


def _dit_family(model) -> str | None:
    """"flux" / "sd3" for the families with a text-entry projection, else None."""
    import comfy.supported_models as sm

    config = getattr(getattr(model, "model", None), "model_config", None)
    if isinstance(config, sm.Flux):  # Flux, FluxSchnell, FluxInpaint (Chroma is no subclass: no vector_in)
        return "flux"
    if isinstance(config, sm.SD3):
        return "sd3"
    return None


def _width(model, key: str) -> int:
    return int(model.model_state_dict(PREFIX)[key].shape[1])


def text_entry(model, field: str = "model") -> TextEntry:
    """The family's text entry; ValueError naming the family when it has none MACE edits."""
    if not hasattr(model, "model_state_dict"):
        raise ValueError(f"{field}: expected a MODEL (from a checkpoint loader), got {type(model).__name__}")
    family, dit = model_family(model), _dit_family(model)
    if dit == "flux":
        key, pooled = PREFIX + "txt_in.weight", PREFIX + "vector_in.in_layer.weight"
        return TextEntry(family, (key,), pooled, _width(model, pooled), "t5")
    if dit == "sd3":
        key, pooled = PREFIX + "context_embedder.weight", PREFIX + "y_embedder.mlp.0.weight"
        state = model.model_state_dict(PREFIX)
        if key not in state:
            raise ValueError(f"{field}: this SD3 model has no context_embedder; it reads no text to edit")
        return TextEntry(family, (key,), pooled if pooled in state else None,
                         _width(model, pooled) if pooled in state else None, "sd3")
    keys = tuple(kv_keys(model, field))
    width = pooled_text_width(model)
    return TextEntry(family, keys, POOLED_KEY if width else None, width, "clip")


def entry_keys(model, field: str = "model") -> list[str]:
    """Every weight an erasure file may change on this model (text entry + pooled entry)."""
    entry = text_entry(model, field)
    return sorted(set(entry.keys) | ({entry.pooled_key} if entry.pooled_key else set()))


def refusal_hint(model) -> str:
    """What to use instead, for a node that needs cross-attention and got a FLUX / SD3 model ('' otherwise)."""
    dit = _dit_family(model)
    if dit is None:
        return ""
    where = "txt_in" if dit == "flux" else "context_embedder"
    return (f". For {model_family(model)}, use {TEXT_ENTRY_NODES}: they erase through its text-entry projection "
            f"({where})")


def dit_text_encoder(clip) -> str | None:
    """"FLUX.1" / "SD3" when ``clip`` is that family's text encoder (ComfyUI's FluxClipModel / SD3ClipModel)."""
    name = type(getattr(clip, "cond_stage_model", None)).__name__
    return "FLUX.1" if name.startswith("FluxClipModel") else "SD3" if name.startswith("SD3ClipModel") else None
