"""Scoring generated images: the fixed hue rule for colour and a tiny CNN probe.

* ``hue_colors``: deterministic, needs no weights. Pixels with S > 0.45 and V > 0.35 vote for
  the nearest hue centre; the majority wins; fewer than 20 voting pixels gives -1 ("none").
* ``Probe``: a small CNN with three heads (colour, shape, style), trained on ground-truth renders
  with noise and blur augmentation (``train_probe``); used for shape and style (and colour as a
  cross-check). ``probe_accuracy`` reports held-out ground-truth accuracy.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data, vocab

SAT_MIN, VAL_MIN, MIN_PIXELS = 0.45, 0.35, 20
NONE = -1


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model images -> [0, 1]."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def rgb_to_hsv(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rgb (B, 3, H, W) in [0, 1] -> hue in degrees, saturation, value (each (B, H, W))."""
    r, g, b = rgb.unbind(1)
    v, _ = rgb.max(1)
    mn, _ = rgb.min(1)
    c = v - mn
    s = torch.where(v > 0, c / v.clamp_min(1e-8), torch.zeros_like(v))
    cs = c.clamp_min(1e-8)
    h = torch.where(v == r, torch.remainder((g - b) / cs, 6.0),
                    torch.where(v == g, (b - r) / cs + 2.0, (r - g) / cs + 4.0))
    return h * 60.0, s, v


def hue_colors(images: torch.Tensor) -> torch.Tensor:
    """Colour index (B,) of images in [-1, 1] by the hue rule; -1 for "none"."""
    h, s, v = rgb_to_hsv(_to_unit(images))
    centers = torch.tensor(vocab.HUE_CENTERS)
    d = torch.remainder(h.unsqueeze(-1) - centers, 360.0)
    d = torch.minimum(d, 360.0 - d)
    nearest = d.argmin(-1)  # (B, H, W)
    ok = (s > SAT_MIN) & (v > VAL_MIN)
    votes = F.one_hot(nearest, len(centers)) * ok.unsqueeze(-1)
    counts = votes.flatten(1, 2).sum(1)  # (B, 8)
    best = counts.argmax(1)
    return torch.where(ok.flatten(1).sum(1) >= MIN_PIXELS, best, torch.full_like(best, NONE))


def probe_features(w: int) -> nn.Sequential:
    """The probes' CNN trunk: 3 -> 4w channels, 32x32 -> 4x4."""
    def conv(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.ReLU())
    return nn.Sequential(conv(3, w, 1), conv(w, 2 * w, 2), conv(2 * w, 2 * w, 1),
                         conv(2 * w, 4 * w, 2), conv(4 * w, 4 * w, 2))


class Probe(nn.Module):
    """Tiny CNN (~280k parameters) with colour (8), shape (4) and style (4) heads on [-1, 1] images."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = probe_features(w)
        # heads read mean- and max-pooled features (max pooling makes shape easy to learn)
        self.color = nn.Linear(8 * w, len(vocab.COLORS))
        self.shape = nn.Linear(8 * w, len(vocab.SHAPES))
        self.style = nn.Linear(8 * w, len(vocab.STYLES))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        f = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)
        return {"color": self.color(f), "shape": self.shape(f), "style": self.style(f)}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Argmax labels per head for images in [-1, 1]."""
        outs: dict[str, list[torch.Tensor]] = {"color": [], "shape": [], "style": []}
        for i in range(0, images.shape[0], batch_size):
            logits = self(images[i: i + batch_size].float())
            for k in outs:
                outs[k].append(logits[k].argmax(1))
        return {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for k, v in outs.items()}


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur (half the batch) and Gaussian noise, mimicking sample artefacts."""
    b = images.shape[0]
    sigma = 0.4 + 0.8 * torch.rand(b, generator=gen)
    k = torch.arange(-1, 2, dtype=torch.float32)
    g1 = torch.exp(-(k.view(1, 3) ** 2) / (2 * sigma.view(b, 1) ** 2))
    g1 = g1 / g1.sum(1, keepdim=True)
    kern = (g1.view(b, 3, 1) * g1.view(b, 1, 3))  # (B, 3, 3)
    x = F.pad(images, (1, 1, 1, 1), mode="replicate")
    blurred = F.conv2d(x.transpose(0, 1), kern.unsqueeze(1), groups=b).transpose(0, 1)
    use_blur = (torch.rand(b, generator=gen) < 0.5).view(b, 1, 1, 1)
    out = torch.where(use_blur, blurred, images)
    noise = torch.randn(images.shape, generator=gen) * (0.15 * torch.rand(b, 1, 1, 1, generator=gen))
    return (out + noise).clamp(-1, 1)


def train_probe(steps: int = 600, batch_size: int = 64, seed: int = 1, lr: float = 2e-3,
                log=None) -> Probe:
    """Train a probe on ground-truth renders (seeded); returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = Probe()
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        batch = data.sample_batch(batch_size, gen)
        logits = probe(augment(batch.images, gen))
        loss = (F.cross_entropy(logits["color"], batch.colors) + F.cross_entropy(logits["shape"], batch.shapes)
                + F.cross_entropy(logits["style"], batch.styles))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"probe step {step} loss {loss.item():.4f}")
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: Probe, n: int = 512, seed: int = 12345, augmented: bool = False) -> dict[str, float]:
    """Held-out ground-truth accuracy of the probe (and of the hue rule) on fresh renders."""
    gen = torch.Generator().manual_seed(seed)
    batch = data.sample_batch(n, gen)
    images = augment(batch.images, gen) if augmented else batch.images
    pred = probe.predict(images)
    return {
        "color": (pred["color"] == batch.colors).float().mean().item(),
        "shape": (pred["shape"] == batch.shapes).float().mean().item(),
        "style": (pred["style"] == batch.styles).float().mean().item(),
        "hue_rule": (hue_colors(images) == batch.colors).float().mean().item(),
        "n": n,
    }
