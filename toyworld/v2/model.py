"""The toy world v2 network: v1's architecture, widened for 600 words and 200 identities.

* Text encoder: token embedding (dim 128) + learned positions over a 24-token window, 2 pre-norm
  causal transformer layers (4 heads, FF 256), final LayerNorm — its outputs are what every
  cross-attention ``to_k``/``to_v`` reads (SD1's CLIP last hidden state, width 128).
* UNet: v1's (pixel-unshuffled 16x16x12 "latent", C=32/64/64, 7 cross-attention layers with
  separate to_q/to_k/to_v/to_out, text only through cross-attention), context width 128, plus a
  learned position embedding on every cross-attention's queries: an identity is also *where* the
  object is, and without it the queries had no way to tell places apart (trained without it, the
  model drew every name as a blob averaged over the five places).
"""
from __future__ import annotations

from ..v1.model import T2I, TextEncoder, UNet, kv_weight_names
from . import vocab

TEXT_DIM = 128
UNET_CHANNELS = 32


def build_model() -> T2I:
    """A freshly initialised v2 model (seed with ``torch.manual_seed`` before calling)."""
    text = TextEncoder(vocab_size=vocab.VOCAB_SIZE, length=vocab.CONTEXT_LENGTH, dim=TEXT_DIM, layers=2,
                       heads=4, ff=2 * TEXT_DIM)
    unet = UNet(c=UNET_CHANNELS, ctx_dim=TEXT_DIM, query_positions=True)
    return T2I(text, unet, vocabulary=vocab)


__all__ = ["build_model", "kv_weight_names", "T2I"]
