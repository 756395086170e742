"""The toy text-to-image network: causal text encoder + cross-attention UNet.

* ``TextEncoder``: token embedding (dim 64) + learned positions, 2 pre-norm causal transformer
  layers (4 heads, FF 128), final LayerNorm. The final-LayerNorm outputs are the per-token
  features every cross-attention ``to_k``/``to_v`` reads (like SD1's CLIP last hidden state).
* ``UNet``: works on the pixel-unshuffled 16x16x12 "latent" of a 32x32 RGB image. Levels C=32
  at 16x16, 64 at 8x8 and 4x4; sinusoidal time embedding into every ResBlock; 7 ``XAttn``
  cross-attention layers (encoder 8x8 and 4x4, mid, decoder 2x at 4x4 and 2x at 8x8).
  Text reaches the image ONLY through cross-attention.
* ``XAttn`` computes the attention probabilities explicitly so that they can be reported, and
  accepts a per-call ``weight_transform(name, weight)`` for its ``to_k``/``to_v`` weights; the
  names are the state_dict keys, e.g. ``unet.down.1.xattn.to_k.weight``.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import vocab

WeightTransform = Callable[[str, torch.Tensor], torch.Tensor]
# on_attention(layer_name, probs (B, heads, HW, L), height, width, queries (B, heads, HW, d_head))
AttentionCallback = Callable[[str, torch.Tensor, int, int, torch.Tensor], None]


@dataclass
class Hooks:
    """Per-call options threaded through the UNet to every ``XAttn``."""

    weight_transform: Optional[WeightTransform] = None
    on_attention: Optional[AttentionCallback] = None


# ----------------------------------------------------------------------------- text encoder
class TextLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.ff(self.ln2(x))


class TextEncoder(nn.Module):
    def __init__(self, vocab_size: int = vocab.VOCAB_SIZE, length: int = vocab.CONTEXT_LENGTH,
                 dim: int = 64, layers: int = 2, heads: int = 4, ff: int = 128):
        super().__init__()
        self.length = length
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.layers = nn.ModuleList(TextLayer(dim, heads, ff) for _ in range(layers))
        self.ln_final = nn.LayerNorm(dim)
        causal = torch.triu(torch.full((length, length), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) long -> features (B, L, dim)."""
        return self.forward_embeddings(self.tok(ids))

    def forward_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """Input token embeddings (B, L, dim), before positions -> features (B, L, dim)."""
        x = emb + self.pos[: emb.shape[1]]
        mask = self.causal_mask[: emb.shape[1], : emb.shape[1]]
        for layer in self.layers:
            x = layer(x, mask)
        return self.ln_final(x)


# ----------------------------------------------------------------------------- UNet parts
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float().view(-1, 1) * freqs.view(1, -1)
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class XAttn(nn.Module):
    """Cross-attention from image features (queries) to text features (keys/values)."""

    def __init__(self, channels: int, ctx_dim: int = 64, heads: int = 4, head_dim: int = 16,
                 query_positions: int = 0):
        super().__init__()
        inner = heads * head_dim
        # optional learned position embedding on the queries (zero at init), so text can say *where*
        self.query_pos = nn.Parameter(torch.zeros(1, query_positions, channels)) if query_positions else None
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.GroupNorm(8, channels)
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(ctx_dim, inner, bias=False)
        self.to_v = nn.Linear(ctx_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, channels)
        self.name = "xattn"  # set to the module path by T2I

    @property
    def k_name(self) -> str:
        return f"{self.name}.to_k.weight"

    @property
    def v_name(self) -> str:
        return f"{self.name}.to_v.weight"

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, hooks: Optional[Hooks] = None) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        wk, wv = self.to_k.weight, self.to_v.weight
        if hooks is not None and hooks.weight_transform is not None:
            wk = hooks.weight_transform(self.k_name, wk)
            wv = hooks.weight_transform(self.v_name, wv)
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.query_pos is not None:
            h = h + self.query_pos
        q = self.to_q(h).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        k = F.linear(ctx, wk).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        v = F.linear(ctx, wv).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        if hooks is not None and hooks.on_attention is not None:
            hooks.on_attention(self.name, probs, hgt, wid, q)
        out = (probs @ v).transpose(1, 2).reshape(b, hgt * wid, -1)
        out = self.to_out(out).transpose(1, 2).view(b, c, hgt, wid)
        return x + out


class Block(nn.Module):
    """ResBlock, optionally followed by cross-attention."""

    def __init__(self, cin: int, cout: int, tdim: int, xattn: bool, ctx_dim: int = 64, positions: int = 0):
        super().__init__()
        self.res = ResBlock(cin, cout, tdim)
        self.xattn = XAttn(cout, ctx_dim, query_positions=positions) if xattn else None

    def forward(self, x, temb, ctx, hooks=None):
        x = self.res(x, temb)
        if self.xattn is not None:
            x = self.xattn(x, ctx, hooks)
        return x


class UNet(nn.Module):
    def __init__(self, in_ch: int = 12, c: int = 32, ctx_dim: int = 64, tdim: int = 128,
                 query_positions: bool = False):
        super().__init__()
        c2 = 2 * c
        p8, p4 = (64, 16) if query_positions else (0, 0)  # 8x8 and 4x4 feature maps (16x16 latent)
        self.tdim = tdim
        self.time_mlp = nn.Sequential(nn.Linear(c, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv2d(in_ch, c, 3, padding=1)
        self.down = nn.ModuleList([
            Block(c, c, tdim, False, ctx_dim),      # 16x16
            Block(c, c2, tdim, True, ctx_dim, p8),      # 8x8
            Block(c2, c2, tdim, True, ctx_dim, p4),     # 4x4
        ])
        self.downsample = nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1),
                                         nn.Conv2d(c2, c2, 3, stride=2, padding=1)])
        self.mid = Block(c2, c2, tdim, True, ctx_dim, p4)
        self.up = nn.ModuleList([
            Block(c2 + c2, c2, tdim, True, ctx_dim, p4),  # 4x4 (+ skip down.2)
            Block(c2, c2, tdim, True, ctx_dim, p4),       # 4x4
            Block(c2 + c2, c2, tdim, True, ctx_dim, p8),  # 8x8 (+ skip down.1)
            Block(c2, c2, tdim, True, ctx_dim, p8),       # 8x8
            Block(c + c, c, tdim, False, ctx_dim),    # 16x16 (+ skip down.0)
        ])
        self.upsample = nn.ModuleList([nn.Conv2d(c2, c2, 3, padding=1), nn.Conv2d(c2, c, 3, padding=1)])
        self.norm_out = nn.GroupNorm(8, c)
        self.conv_out = nn.Conv2d(c, in_ch, 3, padding=1)
        self.time_dim = c

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, hooks: Optional[Hooks] = None):
        temb = self.time_mlp(timestep_embedding(t, self.time_dim))
        h = self.conv_in(x)
        s0 = self.down[0](h, temb, ctx, hooks)
        s1 = self.down[1](self.downsample[0](s0), temb, ctx, hooks)
        s2 = self.down[2](self.downsample[1](s1), temb, ctx, hooks)
        h = self.mid(s2, temb, ctx, hooks)
        h = self.up[0](torch.cat([h, s2], 1), temb, ctx, hooks)
        h = self.up[1](h, temb, ctx, hooks)
        h = self.upsample[0](F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.up[2](torch.cat([h, s1], 1), temb, ctx, hooks)
        h = self.up[3](h, temb, ctx, hooks)
        h = self.upsample[1](F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.up[4](torch.cat([h, s0], 1), temb, ctx, hooks)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- full model
class T2I(nn.Module):
    """Text encoder + UNet on pixel-unshuffled images. ``forward`` predicts eps.

    ``vocabulary`` is the world's vocab module (tokenizer, context length); the defaults build
    toy world v1. Other worlds pass their own text encoder, UNet and vocabulary.
    """

    def __init__(self, text: Optional[TextEncoder] = None, unet: Optional[UNet] = None, vocabulary=vocab):
        super().__init__()
        self.vocab_module = vocabulary.__name__  # a name, so the model deep-copies
        self.text = text if text is not None else TextEncoder()
        self.unet = unet if unet is not None else UNet()
        for name, mod in self.named_modules():
            if isinstance(mod, XAttn):
                mod.name = name

    @property
    def vocab(self):
        """The world's vocab module (tokenizer, ids, context length)."""
        return importlib.import_module(self.vocab_module)

    def xattn_layers(self) -> list[XAttn]:
        return [m for m in self.modules() if isinstance(m, XAttn)]

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text(ids)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, hooks: Optional[Hooks] = None):
        """x: (B, 3, 32, 32) noisy image, t: (B,) int timesteps, ctx: (B, L, 64) -> eps (B, 3, 32, 32)."""
        z = F.pixel_unshuffle(x, 2)
        return F.pixel_shuffle(self.unet(z, t, ctx, hooks), 2)


def kv_weight_names(model: T2I) -> list[str]:
    """The 14 to_k/to_v weight names (state_dict keys), in layer order."""
    names = []
    for m in model.xattn_layers():
        names += [m.k_name, m.v_name]
    return names
