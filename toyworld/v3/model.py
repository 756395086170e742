"""The toy world v3 network: v2's UNet reading a wider, pre-trained and frozen text encoder.

* Text encoder: token embedding (dim 384) + learned positions over a 24-token window, 1 pre-norm
  causal transformer layer (6 heads, FF 768: one layer, as the projections dominate the CPU cost), final LayerNorm; pre-trained on the profile
  objective of ``text`` and frozen before the UNet trains (as SD's CLIP).
* UNet: v2's (16x16x12 latent, C=32/64/64, 7 cross-attention layers, query position embeddings),
  context width 384. The glyph's 4x4 cells line up with the UNet's 4x4 feature map.
"""
from __future__ import annotations

from ..v1.model import T2I, TextEncoder, UNet, kv_weight_names
from . import vocab

TEXT_DIM = 384
UNET_CHANNELS = 32


def build_model() -> T2I:
    """A freshly initialised v3 model (seed with ``torch.manual_seed`` before calling)."""
    text = TextEncoder(vocab_size=vocab.VOCAB_SIZE, length=vocab.CONTEXT_LENGTH, dim=TEXT_DIM, layers=1,
                       heads=6, ff=2 * TEXT_DIM)
    unet = UNet(c=UNET_CHANNELS, ctx_dim=TEXT_DIM, query_positions=True)
    return T2I(text, unet, vocabulary=vocab)


__all__ = ["build_model", "kv_weight_names", "T2I"]
