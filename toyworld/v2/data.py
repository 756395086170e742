"""Procedural training data of toy world v2: a vectorised renderer and caption sampling.

An image (32x32 RGB) shows one identity: a shape (circle, square, triangle, cross, bar; radius
5.5-7 px) in a saturated colour (hue centre +-5 deg, S and V in [0.75, 1]) at one of five places
(middle or a quadrant, centre jittered +-1.5 px), on the background of an art style: a pattern
(plain, horizontal or vertical stripes, dots, checker) in one of four grey tones (+-0.04), the
pattern's second grey 0.25 darker. Backgrounds are achromatic, so a saturated pixel always belongs
to the identity. Captions: a name or nickname (or ``someone``), optionally a style word or its
synonym (or ``art``), in the templates of ``vocab``; 35% describe the look by attribute words
instead ("a red circle at the topleft"); 10% are empty (caption dropout for CFG).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..v1.data import hsv_to_rgb, shape_geometry
from . import vocab

DATA_VERSION = "toyworld-data-v2"
IMAGE_SIZE = 32
POSITION_CENTERS: tuple[tuple[float, float], ...] = ((16.0, 16.0), (10.0, 10.0), (22.0, 10.0), (10.0, 22.0),
                                                     (22.0, 22.0))  # (x, y) per vocab.POSITIONS
P_EMPTY, P_ATTRIBUTES = 0.10, 0.35
P_NAME_MAIN, P_NAME_NICK = 0.55, 0.33           # the rest: "someone"
P_STYLE_NONE, P_STYLE_MAIN, P_STYLE_SYN = 0.30, 0.50, 0.14   # the rest: "art"


def _uniform(n: int, lo: float, hi: float, gen) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def shape_masks(shapes: torch.Tensor, positions: torch.Tensor, gen, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, size, size) bool masks for shape and position indices, random radius and jitter."""
    n = shapes.shape[0]
    r = _uniform(n, 5.5, 7.0, gen).view(n, 1, 1)
    centers = torch.tensor(POSITION_CENTERS)[positions]
    cx = (centers[:, 0] + _uniform(n, -1.5, 1.5, gen)).view(n, 1, 1)
    cy = (centers[:, 1] + _uniform(n, -1.5, 1.5, gen)).view(n, 1, 1)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dy = coords.view(1, size, 1) - cy
    dx = coords.view(1, 1, size) - cx
    bar = (dx.abs() <= r) & (dy.abs() <= 0.4 * r)
    return torch.stack(shape_geometry(dx, dy, r) + [bar], 1)[torch.arange(n), shapes]


def backgrounds(styles: torch.Tensor, gen, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, size, size) grey levels of the art styles ``styles`` (indices into vocab.STYLES)."""
    n = styles.shape[0]
    look = torch.tensor(vocab.STYLE_LOOK)[styles]
    pattern, tone = look[:, 0], look[:, 1]
    g1 = torch.tensor(vocab.TONES)[tone] + _uniform(n, -0.04, 0.04, gen)
    g2 = g1 - 0.25  # always darker: no two (tone, pattern) pairs look alike under a phase shift
    px = torch.randint(0, 12, (n, 1, 1), generator=gen)
    py = torch.randint(0, 12, (n, 1, 1), generator=gen)
    ar = torch.arange(size)
    x, y = ar.view(1, 1, size) + px, ar.view(1, size, 1) + py
    plain = torch.zeros(n, size, size, dtype=torch.bool)
    hstripes = (y % 6 < 3).expand(n, size, size)
    vstripes = (x % 6 < 3).expand(n, size, size)
    dots = (x % 6 < 2) & (y % 6 < 2)
    checker = (x // 4 + y // 4) % 2 == 1
    mask = torch.stack([plain, hstripes, vstripes, dots, checker], 1)[torch.arange(n), pattern]
    return torch.where(mask, g2.view(n, 1, 1), g1.view(n, 1, 1))


def render(identities: torch.Tensor, styles: torch.Tensor, gen=None, size: int = IMAGE_SIZE,
           return_mask: bool = False):
    """Images (B, 3, size, size) in [0, 1] of identity and style indices (and the object masks)."""
    n = identities.shape[0]
    look = torch.tensor(vocab.APPEARANCE)[identities]
    colors, shapes, positions = look[:, 0], look[:, 1], look[:, 2]
    hue = torch.tensor(vocab.HUE_CENTERS)[colors] + _uniform(n, -5.0, 5.0, gen)
    rgb = hsv_to_rgb(hue, _uniform(n, 0.75, 1.0, gen), _uniform(n, 0.75, 1.0, gen))
    mask = shape_masks(shapes, positions, gen, size).unsqueeze(1)
    bg = backgrounds(styles, gen, size).unsqueeze(1).expand(n, 3, size, size)
    images = torch.where(mask, rgb.view(n, 3, 1, 1), bg)
    return (images, mask) if return_mask else images


@dataclass
class Batch:
    images: torch.Tensor      # (B, 3, 32, 32) in [-1, 1]
    captions: list[str]
    identities: torch.Tensor  # (B,) long, index into vocab.NAMES
    styles: torch.Tensor      # (B,) long, index into vocab.STYLES
    masks: torch.Tensor       # (B, 1, 32, 32) bool, the object's pixels


def _pick(options, u: float):
    return options[min(int(u * len(options)), len(options) - 1)]


def sample_caption(identity: int, style: int, u: list[float]) -> str:
    """A caption from 7 uniform numbers (dropout, kind, name word, style word, template, pick, pick)."""
    if u[0] < P_EMPTY:
        return ""
    name = vocab.NAMES[identity]
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
        c, s, p = vocab.APPEARANCE[identity]
        tpl = vocab.ATTRIBUTE_TEMPLATES[0 if st is None else 1]
        return tpl.format(c=vocab.COLORS[c], s=vocab.SHAPES[s], p=vocab.POSITIONS[p], st=st)
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
