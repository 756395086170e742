"""Procedural training data of toy world v3: the glyph renderer and caption sampling.

An image (32x32 RGB) shows one identity: its 16-bit glyph as a 4x4 grid of 8x8-pixel cells, each
lit cell a 6x6 square (a 1-pixel gap all round) in the name's colour (hue centre +-5 deg, S and V in
[0.75, 1]), on the background of an art style exactly as in v2 (pattern x grey tone, achromatic),
which shows in the gaps and the unlit cells. Captions: a name or nickname (or ``someone``),
optionally a style word or its synonym (or ``art``), in v2's templates; 15% name only the colour
("a photo of a red person"); 10% are empty (caption dropout for CFG).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..v1.data import hsv_to_rgb
from ..v2.data import P_STYLE_MAIN, P_STYLE_NONE, P_STYLE_SYN, _pick, _uniform, backgrounds
from . import vocab

DATA_VERSION = "toyworld-data-v3"
IMAGE_SIZE, CELL, GRID = 32, 8, 4
P_EMPTY, P_ATTRIBUTES = 0.10, 0.15
P_NAME_MAIN, P_NAME_NICK = 0.55, 0.33           # the rest: "someone"

CODE_BITS = torch.tensor([vocab.code_bits(i) for i in range(vocab.N_NAMES)], dtype=torch.bool)  # (N, 16)
COLOR_OF = torch.tensor(vocab.COLOR_OF, dtype=torch.long)


def cell_masks(bits: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, size, size) bool: the lit cells' 6x6 squares for glyph bits (B, 16)."""
    ar = torch.arange(size)
    inner = ((ar % CELL) >= 1) & ((ar % CELL) <= CELL - 2)                       # (size,)
    cell = (ar // CELL).view(size, 1) * GRID + (ar // CELL).view(1, size)       # (size, size) cell index
    return bits[:, cell] & (inner.view(size, 1) & inner.view(1, size))


def render(identities: torch.Tensor, styles: torch.Tensor, gen=None, size: int = IMAGE_SIZE,
           return_mask: bool = False):
    """Images (B, 3, size, size) in [0, 1] of identity and style indices (and the glyph masks)."""
    n = identities.shape[0]
    hue = torch.tensor(vocab.HUE_CENTERS)[COLOR_OF[identities]] + _uniform(n, -5.0, 5.0, gen)
    rgb = hsv_to_rgb(hue, _uniform(n, 0.75, 1.0, gen), _uniform(n, 0.75, 1.0, gen))
    mask = cell_masks(CODE_BITS[identities], size).unsqueeze(1)
    bg = backgrounds(styles, gen, size).unsqueeze(1).expand(n, 3, size, size)
    images = torch.where(mask, rgb.view(n, 3, 1, 1), bg)
    return (images, mask) if return_mask else images


@dataclass
class Batch:
    images: torch.Tensor      # (B, 3, 32, 32) in [-1, 1]
    captions: list[str]
    identities: torch.Tensor  # (B,) long, index into vocab.NAMES
    styles: torch.Tensor      # (B,) long, index into vocab.STYLES
    masks: torch.Tensor       # (B, 1, 32, 32) bool, the glyph's pixels


def sample_caption(identity: int, style: int, u: list[float]) -> str:
    """A caption from 7 uniform numbers (dropout, kind, name word, style word, template, pick, pick)."""
    if u[0] < P_EMPTY:
        return ""
    st_main = vocab.STYLES[style]
    if u[3] < P_STYLE_NONE:
        st = None
    elif u[3] < P_STYLE_NONE + P_STYLE_MAIN:
        st = st_main
    elif u[3] < P_STYLE_NONE + P_STYLE_MAIN + P_STYLE_SYN:
        st = vocab.STYLE_SYNONYMS[st_main][0]
    else:
        st = vocab.NEUTRAL_STYLE
    if u[1] < P_ATTRIBUTES:
        c = vocab.COLORS[vocab.COLOR_OF[identity]]
        return vocab.ATTRIBUTE_TEMPLATES[0].format(c=c) if st is None else vocab.ATTRIBUTE_TEMPLATES[1].format(c=c, st=st)
    name = vocab.NAMES[identity]
    if u[2] < P_NAME_MAIN:
        n = name
    elif u[2] < P_NAME_MAIN + P_NAME_NICK:
        n = _pick(vocab.NICKNAMES[name], u[5])
    else:
        n = vocab.NEUTRAL_NAME
    if st is None:
        return _pick(vocab.NAME_TEMPLATES, u[4]).format(n=n)
    if n == vocab.NEUTRAL_NAME and u[6] < 0.5:
        return _pick(vocab.STYLE_TEMPLATES, u[4]).format(st=st)
    return _pick(vocab.NAME_STYLE_TEMPLATES, u[4]).format(n=n, st=st)


def sample_batch(n: int, gen: torch.Generator | None = None) -> Batch:
    """A random training batch: images in [-1, 1] with sampled captions and labels."""
    identities = torch.randint(0, vocab.N_NAMES, (n,), generator=gen)
    styles = torch.randint(0, vocab.N_STYLES, (n,), generator=gen)
    images, masks = render(identities, styles, gen, return_mask=True)
    u = torch.rand(n, 7, generator=gen).tolist()
    caps = [sample_caption(int(i), int(s), u[k]) for k, (i, s) in enumerate(zip(identities, styles))]
    return Batch(images * 2 - 1, caps, identities, styles, masks)
