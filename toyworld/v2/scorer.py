"""Scoring toy world v2 images: identity (colour x shape x position), style, integrity, FD.

* Colour: v1's fixed hue rule (no weights; saturated pixels vote for the nearest hue centre).
* Shape, position, style (and colour as a cross-check): ``Probe``, a small CNN with four heads
  trained on procedural ground truth with noise/blur augmentation (``train_probe``).
* Identity of an image = the name whose appearance is (hue-rule colour, probe shape, probe
  position); -1 when the hue rule finds no object.
* Integrity: the image shows a recognisable object at all (the hue rule finds one and the probe's
  shape head is at least 0.5 sure).
* ``frechet_distance`` between two sets of probe features (the 38 logits of the four heads), a
  small FID analogue for "did the retained prompts' images drift".
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..v1.scorer import augment, hue_colors, probe_features
from . import data, vocab

HEADS = {"color": len(vocab.COLORS), "shape": len(vocab.SHAPES), "position": len(vocab.POSITIONS),
         "style": vocab.N_STYLES}
INTEGRITY_MIN_CONFIDENCE = 0.5


class Probe(nn.Module):
    """Small CNN (~0.3 M parameters) with colour, shape, position and style heads on [-1, 1] images."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = probe_features(w)
        # mean+max pooled features, plus the 4x4 map flattened (position needs where, not only what)
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


def train_probe(steps: int = 800, batch_size: int = 64, seed: int = 1, lr: float = 2e-3, log=None) -> Probe:
    """Train a probe on ground-truth renders (seeded); returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = Probe()
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        batch = data.sample_batch(batch_size, gen)
        labels = labels_of(batch.identities, batch.styles)
        logits = probe(augment(batch.images, gen))
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"probe step {step} loss {loss.item():.4f}")
    return probe.eval().requires_grad_(False)


def labels_of(identities: torch.Tensor, styles: torch.Tensor) -> dict[str, torch.Tensor]:
    look = torch.tensor(vocab.APPEARANCE)[identities]
    return {"color": look[:, 0], "shape": look[:, 1], "position": look[:, 2], "style": styles}


_IDENTITY_TABLE = torch.full((len(vocab.COLORS), len(vocab.SHAPES), len(vocab.POSITIONS)), -1, dtype=torch.long)
for (_c, _s, _p), _i in vocab.IDENTITY_OF.items():
    _IDENTITY_TABLE[_c, _s, _p] = _i


def score(probe: Probe, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: identity (-1 none), colour (hue rule), shape, position, style, integrity, features."""
    logits = probe.logits(images)
    colour = hue_colors(images)
    pred = {k: v.argmax(1) for k, v in logits.items()}
    identity = torch.where(colour >= 0, _IDENTITY_TABLE[colour.clamp_min(0), pred["shape"], pred["position"]],
                           torch.full_like(colour, -1))
    shape_conf = logits["shape"].softmax(1).amax(1)
    return {"identity": identity, "color": colour, "shape": pred["shape"], "position": pred["position"],
            "style": pred["style"], "integrity": (colour >= 0) & (shape_conf >= INTEGRITY_MIN_CONFIDENCE),
            "features": torch.cat([logits[k] for k in HEADS], 1)}


@torch.no_grad()
def probe_accuracy(probe: Probe, n: int = 1024, seed: int = 12345, augmented: bool = False) -> dict[str, float]:
    """Held-out ground-truth accuracy per head, of the hue rule, and of the whole identity."""
    gen = torch.Generator().manual_seed(seed)
    batch = data.sample_batch(n, gen)
    images = augment(batch.images, gen) if augmented else batch.images
    labels = labels_of(batch.identities, batch.styles)
    logits = probe.logits(images)
    out = {k: (logits[k].argmax(1) == labels[k]).float().mean().item() for k in HEADS}
    s = score(probe, images)
    out["hue_rule"] = (s["color"] == labels["color"]).float().mean().item()
    out["identity"] = (s["identity"] == batch.identities).float().mean().item()
    out["integrity"] = s["integrity"].float().mean().item()
    out["n"] = n
    return out


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, d) and b (M, d), float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(ca cb) via the symmetric form sqrt(ca)^(1/2) cb sqrt(ca)^(1/2)
    ea, va = torch.linalg.eigh(ca)
    sa = va @ torch.diag(ea.clamp_min(0).sqrt()) @ va.T
    em = torch.linalg.eigvalsh(sa @ cb @ sa).clamp_min(0)
    return float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * em.sqrt().sum())
