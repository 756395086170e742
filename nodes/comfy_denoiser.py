"""Adapter: a ComfyUI MODEL (``ModelPatcher``) as a ``mace_ops`` ``CrossAttentionDenoiser``, for LoRA
training and the attacks, without touching the shared model.

* **Weights.** ``kv_weights()``: the attn2 K/V weights as the model computes them now (original +
  patches on it, e.g. a CFR edit), float32, keyed ``diffusion_model.<...>.attn2.to_k.weight``.
* **A private patcher.** Everything runs on ``model.clone()`` (a dynamic-VRAM model demoted first,
  ``comfy_compat.static_patcher``). Weight wrappers (``add_weight_wrapper``) give K/V
  ``w -> weight_transform(key, w)`` (the trainer's ``W + up @ down``) during a forward with a
  transform; with ``backward=True`` (full backprop) every other inference-tensor weight is
  detached per call, so autograd never saves a shared parameter; only the LoRA factors get grads.
  Each attn2 block gets a *replace* patch that computes ``P = softmax(q kᵀ / sqrt(d_head))`` in
  float32, reports ``AttentionProbe(layer, P, height, width, q, to_k key)`` and returns ``P v``.
* **Noise and timesteps.** t in 0..T−1 (T = the model's sigma table), σ_t = ``sigmas[t]``;

      x_t = noise_scaling(σ_t, ε, x0)  (= x0 + σ_t ε for eps/v),  UNet input x_t / sqrt(σ_t² + 1)
          = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε,   ᾱ_t = 1 / (1 + σ_t²)

  the reference's DDPM ``add_noise``. ``forward_with_attention`` returns ComfyUI's denoised
  estimate (float32), or with ``prediction="eps"`` the noise it implies, (x_t − denoised) / σ_t
  (what the attacks' ``||ε̂ − ε||²`` compares). A UNet that needs ``y`` gets zeros.
* **Devices.** Each forward ``load_models_gpu([clone], force_full_load=True)``; ``release()``
  unloads the clone and removes its wrappers from the shared modules.

Gradients are the caller's (``mace_ops.lora_train`` runs the forward under
``torch.inference_mode(False)`` and ``enable_grad()``); attention probabilities are float32 whatever
the model's dtype. Why each piece is done this way (inference tensors, copies, memory):
docs/code-notes.md#nodescomfy_denoiserpy.
"""
from __future__ import annotations

import logging
import re
from typing import Callable

import torch

import comfy.model_management

from ..mace_ops.interfaces import AttentionProbe
from .comfy_compat import static_patcher
from .comfy_model import PREFIX, effective_kv_weights, kv_keys

_BLOCK = re.compile(
    r"^diffusion_model\.(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?\d+\."
    r"transformer_blocks\.(\d+)\.attn2\.to_k\.weight$"
)
_BLOCK_NAMES = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


def attn2_blocks(keys) -> dict[tuple[str, int, int], str]:
    """``{(block, number, transformer_index): "diffusion_model.<...>.attn2"}`` for the to_k keys."""
    out = {}
    for key in keys:
        m = _BLOCK.match(key)
        if m is None:
            continue
        name = _BLOCK_NAMES[m.group(1)]
        number = 0 if name == "middle" else int(m.group(2))
        out[(name, number, int(m.group(3)))] = key[: -len(".to_k.weight")]
    return out


def _plain(w: torch.Tensor) -> torch.Tensor:
    """w's values, detached from the model's parameters, as a normal (non-inference) tensor.

    ComfyUI hands wrappers a per-call copy of the weight (``cast_bias_weight`` copies whenever a
    layer has weight functions), so this is usually free: the detach is a view, and the clone
    only happens when the copy was made inside inference mode.
    """
    w = w.detach()
    if w.is_inference() and not torch.is_inference_mode_enabled():
        return w.clone()
    return w


class _State:
    """What the patches read during one forward (kept apart from the patcher: no ref cycles)."""

    def __init__(self, names: dict[tuple[str, int, int], str]):
        self.names = names
        self.transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None
        self.on_attention: Callable[[AttentionProbe], None] | None = None
        self.latent_hw: tuple[int, int] | None = None
        self.reported = 0


def _kv_wrapper(state: _State, key: str):
    def wrap(w: torch.Tensor) -> torch.Tensor:
        w = _plain(w)
        return w if state.transform is None else state.transform(key, w)

    return wrap


def _feature_size(n: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of a feature map with n positions, from the latent size and a power-of-2 downsampling."""
    if latent_hw is not None:
        h, w = latent_hw
        for _ in range(8):
            if h * w == n:
                return h, w
            h, w = (h + 1) // 2, (w + 1) // 2
    side = int(round(n**0.5))
    if side * side == n:
        return side, side
    raise ValueError(f"cross-attention over {n} positions: cannot tell the feature map's height and width")


def _attn2_patch(state: _State):
    def attn2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = int(extra_options["n_heads"])
        d_head = int(extra_options["dim_head"])
        b, n, _ = q.shape
        if k.shape[0] != b:
            k = k.expand(b, -1, -1)
            v = v.expand(b, -1, -1)
        qh = q.float().reshape(b, n, heads, d_head).transpose(1, 2)
        kh = k.float().reshape(b, k.shape[1], heads, d_head).transpose(1, 2)
        vh = v.float().reshape(b, v.shape[1], heads, d_head).transpose(1, 2)
        probs = torch.softmax((qh @ kh.transpose(-1, -2)) * (d_head**-0.5), dim=-1)  # (B, heads, HW, L)
        if state.on_attention is not None:
            shape = extra_options.get("activations_shape")
            if shape is not None and len(shape) == 4 and shape[2] * shape[3] == n:
                height, width = int(shape[2]), int(shape[3])
            else:
                height, width = _feature_size(n, state.latent_hw)
            block = extra_options.get("block")
            index = int(extra_options.get("block_index", 0))
            key = (block[0], int(block[1]), index) if block is not None else None
            layer = state.names.get(key)
            query = q.reshape(b, n, heads, d_head).transpose(1, 2)  # a view, in the model's dtype
            state.on_attention(AttentionProbe(layer or f"attn2.{key}", probs, height, width, query,
                                              None if layer is None else f"{layer}.to_k.weight"))
            state.reported += 1
        out = (probs @ vh).transpose(1, 2).reshape(b, n, heads * d_head)
        return out.to(q.dtype)

    return attn2


class ComfyDenoiser:
    """``CrossAttentionDenoiser`` over a ComfyUI MODEL; the given model is never modified."""

    def __init__(self, model, backward: bool = True, prediction: str = "denoised"):
        if model is None:
            raise ValueError("model: no MODEL connected")
        if prediction not in ("denoised", "eps"):
            raise ValueError(f"prediction: unknown {prediction!r}; choose 'denoised' or 'eps'")
        self.prediction = prediction
        self.source = model
        keys = kv_keys(model)
        blocks = attn2_blocks(keys)
        if not blocks:
            raise ValueError(
                "model: no UNet cross-attention blocks (input/middle/output_blocks ... attn2) found; "
                "MACE LoRA training supports SD1.x, SD2.x and SDXL-style UNets"
            )
        self.kv_keys = keys
        self.state = _State(blocks)
        patcher = static_patcher(model)  # a legacy clone; never the dynamic-VRAM patcher itself
        for (name, number, index) in blocks:
            patcher.set_model_attn2_replace(_attn2_patch(self.state), name, number, index)
        kv = set(keys)
        self._own = []
        for n, m in patcher.model.named_modules():
            if not n.startswith(PREFIX) or not hasattr(m, "weight_function"):
                continue
            for part in ("weight", "bias"):
                if getattr(m, part, None) is None:
                    continue
                key = f"{n}.{part}"
                if key in kv:
                    fn = _kv_wrapper(self.state, key)
                    self._own.append(fn)
                elif backward and getattr(m, part).is_inference():
                    fn = _plain  # autograd cannot save an inference tensor for backward
                else:
                    continue  # no per-call copy: nothing of it is saved for backward
                patcher.add_weight_wrapper(key, fn)
        self.patcher = patcher
        self.model_sampling = patcher.get_model_object("model_sampling")
        table = getattr(self.model_sampling, "sigmas", None)
        usable = isinstance(table, torch.Tensor) and table.ndim == 1 and len(table) > 1
        self._sigmas = table.detach().float().cpu() if usable else None
        self.num_train_timesteps = len(self._sigmas) if self._sigmas is not None else 1000
        base = patcher.model
        self._adm = int(getattr(base, "adm_channels", 0) or 0)
        if self._adm and getattr(base.diffusion_model, "num_classes", None) is not None:
            logging.info("MACE: this UNet takes a pooled/size vector (y); LoRA training feeds it zeros")
        else:
            self._adm = 0
        self.device = patcher.load_device
        self._kv_cache = None
        self._ran = False

    # ------------------------------------------------------------------ CrossAttentionDenoiser

    def kv_weights(self) -> dict[str, torch.Tensor]:
        if self._kv_cache is None:
            self._kv_cache = {k: w.to(self.device) for k, w in effective_kv_weights(self.source).items()}
        return dict(self._kv_cache)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t for integer timesteps t (B,), float32, on t's device."""
        if self._sigmas is not None:
            idx = t.detach().long().cpu()
            if int(idx.min()) < 0 or int(idx.max()) >= self.num_train_timesteps:
                raise ValueError(f"timesteps must be in [0, {self.num_train_timesteps}), got {idx.tolist()}")
            return self._sigmas[idx].to(t.device)
        return self.model_sampling.sigma(t.float()).float().to(t.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(t).to(device=x0.device, dtype=x0.dtype)
        return self.model_sampling.noise_scaling(sigma, noise.to(x0.dtype), x0)

    def load(self) -> None:
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        if not self._ran:  # as the sampler does before apply_model: the BaseModel knows its patcher
            self._ran = True
            getattr(self.patcher, "pre_run", lambda: None)()

    def forward_with_attention(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        on_attention: Callable[[AttentionProbe], None],
        weight_transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        self.load()
        b = x_t.shape[0]
        if context.shape[0] != b:
            raise ValueError(f"context batch {context.shape[0]} != latent batch {b}")
        sigma = self.sigma(t.to(x_t.device)).to(x_t.device)
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        options["sigmas"] = sigma
        options["cond_or_uncond"] = [0]
        extra = {}
        if self._adm:
            extra["y"] = torch.zeros(b, self._adm, device=x_t.device, dtype=x_t.dtype)
        st = self.state
        st.transform, st.on_attention, st.reported = weight_transform, on_attention, 0
        st.latent_hw = (int(x_t.shape[-2]), int(x_t.shape[-1]))
        try:
            out = self.patcher.model.apply_model(x_t, sigma, c_crossattn=context, transformer_options=options, **extra)
        finally:
            reported = st.reported
            st.transform = st.on_attention = None
        if on_attention is not None and reported == 0:
            raise RuntimeError("the model ran without its cross-attention patches (another patch replaced attn2?)")
        if self.prediction == "eps":
            out = (x_t - out) / sigma.to(out.dtype).reshape(-1, *([1] * (out.ndim - 1)))
        return out

    # ------------------------------------------------------------------ cleanup

    def release(self) -> None:
        """Unload the private clone and take its wrappers off the shared modules (idempotent)."""
        mm = comfy.model_management
        for i in range(len(mm.current_loaded_models) - 1, -1, -1):
            loaded = mm.current_loaded_models[i]
            if loaded.model is self.patcher:
                loaded.model_unload()
                mm.current_loaded_models.pop(i)
        if self._ran:
            self._ran = False
            getattr(self.patcher, "cleanup", lambda: None)()
        own = set(map(id, self._own)) | {id(_plain)}
        for n, m in self.patcher.model.named_modules():
            if not n.startswith(PREFIX):
                continue
            for attr in ("weight_function", "bias_function"):
                funcs = m.__dict__.get(attr)
                if funcs:
                    kept = [f for f in funcs if id(f) not in own]
                    if len(kept) != len(funcs):
                        setattr(m, attr, kept)

    def __enter__(self) -> "ComfyDenoiser":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
