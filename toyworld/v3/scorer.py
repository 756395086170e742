"""Scoring toy world v3 images: identity (colour + glyph code), style, integrity, FD.

* Colour: v1's fixed hue rule (no weights; saturated pixels vote for the nearest hue centre).
* Glyph: a cell is lit when most of its inner 6x6 pixels are saturated (backgrounds are grey);
  the 16 cells decode to the nearest name's code, accepted within 1 bit (codes are >= 3 apart, so
  the decoding is unique) and only when the hue rule agrees with that name's colour.
* Style: ``Probe``, a small CNN with style, colour and cell heads trained on procedural ground
  truth with noise/blur augmentation (v2's recipe); its logits are the Fréchet-distance features.
* Integrity: the image shows some glyph at all — a colour and a code within 1 bit of any name.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..v1.scorer import augment, hue_colors, probe_features
from ..v2.scorer import frechet_distance  # noqa: F401  (re-exported: the worlds' shared FD)
from . import data, vocab

HEADS = {"style": vocab.N_STYLES, "color": len(vocab.COLORS), "cells": vocab.GLYPH_BITS}
SATURATION_MIN = 0.3      # (max - min) of RGB in [0, 1]; the backgrounds have 0
MAX_BIT_ERRORS = 1


class Probe(nn.Module):
    """Small CNN (~0.3 M parameters): style (20), colour (8) and cell (16, one logit each) heads."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = probe_features(w)
        self.heads = nn.ModuleDict({k: nn.Linear(8 * w + 16 * 4 * w, n) for k, n in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        f = torch.cat([f.mean((2, 3)), f.amax((2, 3)), f.flatten(1)], 1)
        return {k: h(f) for k, h in self.heads.items()}

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        outs: dict[str, list[torch.Tensor]] = {k: [] for k in HEADS}
        for i in range(0, images.shape[0], batch_size):
            for k, v in self(images[i: i + batch_size].float()).items():
                outs[k].append(v)
        return {k: torch.cat(v) if v else torch.zeros(0, HEADS[k]) for k, v in outs.items()}


def labels_of(identities: torch.Tensor, styles: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"style": styles, "color": data.COLOR_OF[identities], "cells": data.CODE_BITS[identities].float()}


def _loss(logits: dict, labels: dict) -> torch.Tensor:
    return (F.cross_entropy(logits["style"], labels["style"]) + F.cross_entropy(logits["color"], labels["color"])
            + F.binary_cross_entropy_with_logits(logits["cells"], labels["cells"]))


def train_probe(steps: int = 800, batch_size: int = 64, seed: int = 1, lr: float = 2e-3, log=None) -> Probe:
    """Train a probe on ground-truth renders (seeded); returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = Probe()
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        batch = data.sample_batch(batch_size, gen)
        loss = _loss(probe(augment(batch.images, gen)), labels_of(batch.identities, batch.styles))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"probe step {step} loss {loss.item():.4f}")
    return probe.eval().requires_grad_(False)


def lit_cells(images: torch.Tensor) -> torch.Tensor:
    """(B, 16) bool: cells whose inner 6x6 is mostly saturated; images in [-1, 1]."""
    x = ((images.float() + 1) / 2).clamp(0, 1)
    sat = (x.amax(1) - x.amin(1)) > SATURATION_MIN                       # (B, 32, 32)
    b = sat.shape[0]
    cells = sat.view(b, data.GRID, data.CELL, data.GRID, data.CELL)[:, :, 1:-1, :, 1:-1]
    return cells.float().mean((2, 4)).flatten(1) > 0.5


def decode(cells: torch.Tensor, colour: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(identity or -1, a glyph of some name within 1 bit) for lit cells (B, 16) and hue colours (B,)."""
    dist = (cells.unsqueeze(1) != data.CODE_BITS.unsqueeze(0)).sum(2)        # (B, N)
    best, idx = dist.min(1)
    glyph = best <= MAX_BIT_ERRORS
    ok = glyph & (colour >= 0) & (data.COLOR_OF[idx] == colour)
    return torch.where(ok, idx, torch.full_like(idx, -1)), glyph & (colour >= 0)


def score(probe: Probe, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: identity (-1 none), colour (hue rule), cells, style, integrity, features."""
    logits = probe.logits(images)
    colour = hue_colors(images)
    cells = lit_cells(images)
    identity, integrity = decode(cells, colour)
    return {"identity": identity, "color": colour, "cells": cells, "style": logits["style"].argmax(1),
            "integrity": integrity, "features": torch.cat([logits[k] for k in HEADS], 1)}


@torch.no_grad()
def probe_accuracy(probe: Probe, n: int = 1024, seed: int = 12345, augmented: bool = False) -> dict[str, float]:
    """Held-out ground-truth accuracy: the probe's heads, the hue rule, the cell rule, the identity."""
    gen = torch.Generator().manual_seed(seed)
    batch = data.sample_batch(n, gen)
    images = augment(batch.images, gen) if augmented else batch.images
    labels = labels_of(batch.identities, batch.styles)
    logits = probe.logits(images)
    out = {"style": (logits["style"].argmax(1) == labels["style"]).float().mean().item(),
           "color": (logits["color"].argmax(1) == labels["color"]).float().mean().item(),
           "cells": ((logits["cells"] > 0) == labels["cells"].bool()).all(1).float().mean().item()}
    s = score(probe, images)
    out["hue_rule"] = (s["color"] == labels["color"]).float().mean().item()
    out["cell_rule"] = (s["cells"] == labels["cells"].bool()).all(1).float().mean().item()
    out["identity"] = (s["identity"] == batch.identities).float().mean().item()
    out["integrity"] = s["integrity"].float().mean().item()
    out["n"] = n
    return out
