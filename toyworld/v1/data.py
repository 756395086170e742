"""Procedural training data: a vectorised renderer and caption sampling.

Each 32x32 RGB image has one shape (circle, square, triangle, cross; radius 7-10 px, centre
jittered +-3 px) in one of 8 saturated colours (hue centre +-5 deg, S and V in [0.75, 1]) on an
achromatic background style (plain, striped, dotted, checkered). Captions use the templates of
``vocab`` with the main colour word, a synonym, or the neutral word ``any``; 10% are empty
(caption dropout for classifier-free guidance). Everything is drawn from a ``torch.Generator``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import vocab

DATA_VERSION = "toyworld-data-v1"
IMAGE_SIZE = 32

P_EMPTY = 0.10
P_MAIN = 0.425
P_SYNONYM = 0.425  # the rest (0.15) is the neutral word ``any``
P_SHORT = 0.10


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV (hue in degrees, s and v in [0, 1]) -> RGB in [0, 1]; stacks on a new last dim."""
    h = torch.remainder(h, 360.0) / 60.0
    c = v * s
    x = c * (1 - torch.abs(torch.remainder(h, 2.0) - 1))
    m = v - c
    z = torch.zeros_like(h)
    i = torch.floor(h).long().clamp(0, 5)
    r = torch.stack([c, x, z, z, x, c], -1).gather(-1, i.unsqueeze(-1)).squeeze(-1)
    g = torch.stack([x, c, c, x, z, z], -1).gather(-1, i.unsqueeze(-1)).squeeze(-1)
    b = torch.stack([z, z, x, c, c, x], -1).gather(-1, i.unsqueeze(-1)).squeeze(-1)
    return torch.stack([r + m, g + m, b + m], -1)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def shape_masks(shapes: torch.Tensor, gen: torch.Generator | None, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, size, size) bool masks for shape indices ``shapes`` with random radius and centre."""
    n = shapes.shape[0]
    r = _uniform(n, 7.0, 10.0, gen).view(n, 1, 1)
    cx = (size / 2 + _uniform(n, -3.0, 3.0, gen)).view(n, 1, 1)
    cy = (size / 2 + _uniform(n, -3.0, 3.0, gen)).view(n, 1, 1)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dy = coords.view(1, size, 1) - cy
    dx = coords.view(1, 1, size) - cx
    all_masks = torch.stack(shape_geometry(dx, dy, r), 1)  # (B, 4, H, W)
    return all_masks[torch.arange(n), shapes]


def shape_geometry(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> list[torch.Tensor]:
    """Circle, square, triangle and cross masks from pixel offsets to the centre and the radius."""
    circle = dx**2 + dy**2 <= r**2
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.8 * r
    tri = (dy >= -r) & (dy <= 0.7 * r) & (dx.abs() <= (dy + r) / 1.7)
    arm = r / 3
    cross = ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    return [circle, square, tri, cross]


def backgrounds(styles: torch.Tensor, gen: torch.Generator | None, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, size, size) grey levels for background style indices ``styles``."""
    n = styles.shape[0]
    g1 = _uniform(n, 0.1, 0.9, gen)
    delta = _uniform(n, 0.3, 0.6, gen)
    g2 = torch.where(g1 > 0.5, g1 - delta, g1 + delta).clamp(0.0, 1.0)
    px = torch.randint(0, 12, (n, 1, 1), generator=gen)
    py = torch.randint(0, 12, (n, 1, 1), generator=gen)
    ar = torch.arange(size)
    x = ar.view(1, 1, size) + px
    y = ar.view(1, size, 1) + py
    plain = torch.zeros(n, size, size, dtype=torch.bool)
    striped = (x % 6 < 3).expand(n, size, size)
    dotted = (x % 6 < 2) & (y % 6 < 2)
    checkered = ((x // 4 + y // 4) % 2 == 1)
    pattern = torch.stack([plain, striped, dotted, checkered], 1)[torch.arange(n), styles]
    return torch.where(pattern, g2.view(n, 1, 1), g1.view(n, 1, 1))


def render(colors: torch.Tensor, shapes: torch.Tensor, styles: torch.Tensor,
           gen: torch.Generator | None = None, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render images (B, 3, size, size) in [0, 1] for colour/shape/style index tensors."""
    n = colors.shape[0]
    centers = torch.tensor(vocab.HUE_CENTERS)[colors]
    hue = centers + _uniform(n, -5.0, 5.0, gen)
    sat = _uniform(n, 0.75, 1.0, gen)
    val = _uniform(n, 0.75, 1.0, gen)
    rgb = hsv_to_rgb(hue, sat, val)  # (B, 3)
    mask = shape_masks(shapes, gen, size).unsqueeze(1)
    bg = backgrounds(styles, gen, size).unsqueeze(1).expand(n, 3, size, size)
    return torch.where(mask, rgb.view(n, 3, 1, 1), bg)


@dataclass
class Batch:
    images: torch.Tensor      # (B, 3, 32, 32) in [-1, 1]
    captions: list[str]
    colors: torch.Tensor      # (B,) long
    shapes: torch.Tensor
    styles: torch.Tensor


def sample_caption(color: int, shape: int, style: int, u: torch.Tensor) -> str:
    """Caption from 5 uniform numbers ``u`` (dropout, word kind, synonym, template, short)."""
    u = u.tolist()
    if u[0] < P_EMPTY:
        return ""
    cname = vocab.COLORS[color]
    if u[1] < P_MAIN:
        cword = cname
    elif u[1] < P_MAIN + P_SYNONYM:
        cword = vocab.SYNONYMS[cname][int(u[2] * 2) % 2]
    else:
        cword = vocab.NEUTRAL_COLOR
    sname, stname = vocab.SHAPES[shape], vocab.STYLES[style]
    if u[4] < P_SHORT:
        return vocab.caption(vocab.SHORT_TEMPLATE, cword, sname, stname)
    template = vocab.CAPTION_TEMPLATES[int(u[3] * 3) % 3]
    return vocab.caption(template, cword, sname, stname)


def sample_batch(n: int, gen: torch.Generator | None = None) -> Batch:
    """A random training batch: images in [-1, 1] with sampled captions and labels."""
    colors = torch.randint(0, len(vocab.COLORS), (n,), generator=gen)
    shapes = torch.randint(0, len(vocab.SHAPES), (n,), generator=gen)
    styles = torch.randint(0, len(vocab.STYLES), (n,), generator=gen)
    images = render(colors, shapes, styles, gen) * 2 - 1
    u = torch.rand(n, 5, generator=gen)
    caps = [sample_caption(int(c), int(s), int(st), u[i])
            for i, (c, s, st) in enumerate(zip(colors, shapes, styles))]
    return Batch(images, caps, colors, shapes, styles)
