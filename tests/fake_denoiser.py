"""A tiny random-weight CrossAttentionDenoiser for LoRA-training tests (no ComfyUI, no downloads).

Latents (B, 4, 8, 8) go through a conv, three cross-attention layers (8x8, 4x4, 8x8) that read
text features of width 32 (``fakes.FakeTextEncoder``), and a conv back to 4 channels. Attention
probabilities are an explicit softmax, reported per layer through ``on_attention``; the K/V
weights pass through ``weight_transform`` on every call, never modified. Later layers' queries
depend on earlier layers' values, so a V-LoRA can change later attention, as in a UNet.
``add_noise`` uses a cosine schedule over 1000 steps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mace_ops.interfaces import AttentionProbe

LAYERS = (("block.0", 16), ("block.1", 24), ("block.2", 16))


def _alpha_bar(T: int = 1000, s: float = 0.008) -> torch.Tensor:
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(((steps / T) + s) / (1 + s) * math.pi / 2) ** 2
    return torch.cumprod(1 - (1 - f[1:] / f[:-1]).clamp(max=0.999), 0).float()


class FakeDenoiser(torch.nn.Module):
    num_train_timesteps = 1000

    def __init__(self, ctx_dim: int = 32, channels: int = 4, heads: int = 2, head_dim: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def param(*shape, fan_in):
            return torch.nn.Parameter(torch.randn(*shape, generator=g) / fan_in**0.5)

        self.heads, self.head_dim, inner = heads, head_dim, heads * head_dim
        self.conv_in = param(16, channels, 3, 3, fan_in=channels * 9)
        self.t_proj = param(16, 16, fan_in=16)
        self.down = param(24, 16, 1, 1, fan_in=16)
        self.up = param(16, 24, 1, 1, fan_in=24)
        self.conv_out = param(channels, 16, 3, 3, fan_in=16 * 9)
        self.attn = torch.nn.ParameterDict()
        for i, (_, c) in enumerate(LAYERS):
            self.attn[f"q{i}"] = param(inner, c, fan_in=c / 2.0)
            self.attn[f"k{i}"] = param(inner, ctx_dim, fan_in=ctx_dim)
            self.attn[f"v{i}"] = param(inner, ctx_dim, fan_in=ctx_dim)
            self.attn[f"o{i}"] = param(c, inner, fan_in=inner)
        self.register_buffer("alpha_bar", _alpha_bar(self.num_train_timesteps))

    def _kv(self) -> dict[str, torch.nn.Parameter]:
        out = {}
        for i, (name, _) in enumerate(LAYERS):
            out[f"{name}.attn2.to_k.weight"] = self.attn[f"k{i}"]
            out[f"{name}.attn2.to_v.weight"] = self.attn[f"v{i}"]
        return out

    def kv_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self._kv().items()}

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar.to(x0.device)[t.long()].view(-1, 1, 1, 1).to(x0.dtype)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def _attention(self, i, h, context, on_attention, weight_transform):
        name = LAYERS[i][0]
        b, c, hh, ww = h.shape
        wk, wv = self.attn[f"k{i}"], self.attn[f"v{i}"]
        if weight_transform is not None:
            wk = weight_transform(f"{name}.attn2.to_k.weight", wk)
            wv = weight_transform(f"{name}.attn2.to_v.weight", wv)
        x = F.layer_norm(h.flatten(2).transpose(1, 2), (c,))
        split = lambda y: y.reshape(b, y.shape[1], self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q = split(x @ self.attn[f"q{i}"].T)
        k, v = split(context @ wk.T), split(context @ wv.T)
        probs = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5, dim=-1)
        if on_attention is not None:
            on_attention(AttentionProbe(name, probs, hh, ww, q, f"{name}.attn2.to_k.weight"))
        out = (probs @ v).transpose(1, 2).reshape(b, hh * ww, -1) @ self.attn[f"o{i}"].T
        return h + out.transpose(1, 2).reshape(b, c, hh, ww)

    def forward_with_attention(self, x_t, t, context, on_attention, weight_transform=None):
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8, dtype=torch.float32) / 8)
        angles = t.float()[:, None] * freqs[None]
        temb = torch.cat([angles.sin(), angles.cos()], 1) @ self.t_proj.T
        h = F.conv2d(x_t, self.conv_in, padding=1) + temb[:, :, None, None]
        h = self._attention(0, h, context, on_attention, weight_transform)
        d = F.conv2d(F.avg_pool2d(h, 2), self.down)
        d = self._attention(1, d, context, on_attention, weight_transform)
        u = F.conv2d(F.interpolate(d, scale_factor=2, mode="nearest"), self.up) + h
        u = self._attention(2, u, context, on_attention, weight_transform)
        return F.conv2d(F.silu(u), self.conv_out, padding=1)


def concept_mass(den, enc, concept, transform, include_end, latents, masks=None, templates=None, t=300):
    """Mean attention probability on ``concept``'s positions (inside ``masks`` when given), over
    prompts (templates filled with the concept) x latents, at timestep t with seeded noise."""
    from mace_ops.alignment import concept_positions
    from mace_ops.attention_loss import concept_attention_mass
    from mace_ops.templates import OBJECT_TEMPLATES, fill

    templates = OBJECT_TEMPLATES[:10] if templates is None else templates
    encoded = enc.encode([fill(tpl, concept) for tpl in templates])
    ids = enc.tokenize(concept)
    ctx = torch.stack([e.features for e in encoded])
    pos = torch.zeros(len(encoded), enc.window, dtype=torch.bool)
    for j, e in enumerate(encoded):
        pos[j, concept_positions(e.ids, e.length, ids, enc.end_id, include_end)] = True
    values = []
    for n in range(latents.shape[0]):
        x = latents[n : n + 1].expand(len(encoded), -1, -1, -1)
        tt = torch.full((len(encoded),), t)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(n))
        probes = []
        with torch.no_grad():
            den.forward_with_attention(den.add_noise(x, noise, tt), tt, ctx, probes.append, transform)
        m = None if masks is None else masks[n : n + 1].expand(len(encoded), -1, -1)
        values.append(concept_attention_mass(probes, pos, m))
    return sum(values) / len(values)


def weights_transform(weights):
    """A weight_transform that substitutes whole weights by name."""
    return lambda name, w: weights[name].to(w.dtype) if name in weights else w


def fake_latents_and_masks(n: int = 4, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 4, 8, 8) random latents and (n, 8, 8) masks covering a 4x4 square."""
    latents = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    masks = torch.zeros(n, 8, 8)
    masks[:, 2:6, 1:5] = 1.0
    return latents, masks
