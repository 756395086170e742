"""MACE's attention loss: the cross-attention mass that concept tokens get inside the concept mask.

For every cross-attention layer l with probabilities A (batch, heads, HW, L):

    term_l = sum_b || A[b, :, M_b, S_b] ||_F          loss = sum_l term_l

M_b is sample b's mask resized (nearest) to the layer's feature map and thresholded at 0.5, S_b
the concept positions of sample b's prompt (concept tokens, plus end/padding tokens when enabled).
The norm is the plain, unsquared Frobenius norm, as in the reference; unlike the reference every
sample of a batch counts (it kept only the first). Without masks the whole image counts.

The loss only reads the selected entries, so it is exactly 0 when those entries are 0, and does
not depend on the probabilities outside the mask or outside S. ``concept_attention_mass`` is the
matching diagnostic: the mean attention probability that S gets per masked pixel and head.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from .interfaces import AttentionProbe


def resize_masks(masks: torch.Tensor, height: int, width: int, threshold: float = 0.5) -> torch.Tensor:
    """(B, H, W) masks in [0, 1] -> (B, height*width) bool, nearest resize, value > threshold."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be (batch, height, width), got {tuple(masks.shape)}")
    m = masks.detach().to(torch.float32)
    if tuple(m.shape[1:]) != (height, width):
        m = F.interpolate(m[:, None], size=(height, width), mode="nearest")[:, 0]
    return (m > threshold).reshape(m.shape[0], height * width)


def _check(probe: AttentionProbe, positions: torch.Tensor, masks: torch.Tensor | None) -> None:
    probs = probe.probs
    if probs.ndim != 4:
        raise ValueError(
            f"{probe.layer}: attention probs must be (batch, heads, queries, keys), got {tuple(probs.shape)}"
        )
    b, _, q, k = probs.shape
    if q != probe.height * probe.width:
        raise ValueError(f"{probe.layer}: {q} queries but feature map {probe.height}x{probe.width}")
    if positions.shape != (b, k):
        raise ValueError(f"{probe.layer}: positions must be (batch={b}, keys={k}) bool, got {tuple(positions.shape)}")
    if masks is not None and masks.shape[0] != b:
        raise ValueError(f"{probe.layer}: {masks.shape[0]} masks for a batch of {b}")


def _safe_norm(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm with a zero (not NaN) gradient at 0."""
    sq = x.to(torch.promote_types(x.dtype, torch.float32)).pow(2).sum()
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def layer_term(probe: AttentionProbe, positions: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """sum over samples b of ||probs[b, :, mask_b, S_b]||_F for one layer (at least float32)."""
    positions = positions.to(device=probe.probs.device, dtype=torch.bool)
    _check(probe, positions, masks)
    pixel = None if masks is None else resize_masks(masks, probe.height, probe.width).to(probe.probs.device)
    total = probe.probs.new_zeros((), dtype=torch.promote_types(probe.probs.dtype, torch.float32))
    for b in range(probe.probs.shape[0]):
        a = probe.probs[b][:, :, positions[b]]  # (heads, HW, |S|)
        if pixel is not None:
            a = a[:, pixel[b]]
        total = total + _safe_norm(a)
    return total


def attention_loss(
    probes: Iterable[AttentionProbe], positions: torch.Tensor, masks: torch.Tensor | None = None
) -> torch.Tensor:
    """MACE attention loss summed over layers. positions: (B, L) bool; masks: (B, H, W) or None."""
    terms = [layer_term(p, positions, masks) for p in probes]
    if not terms:
        raise ValueError("attention loss: the denoiser reported no cross-attention layer")
    return torch.stack(terms).sum()


class AttentionLossCollector:
    """An ``on_attention`` callback that adds each layer's term as the forward runs.

    Holding only the running sum (not every probs tensor) keeps memory to what autograd needs.
    """

    def __init__(self, positions: torch.Tensor, masks: torch.Tensor | None = None):
        self.positions, self.masks = positions, masks
        self.total: torch.Tensor | None = None
        self.layers = 0

    def __call__(self, probe: AttentionProbe) -> None:
        term = layer_term(probe, self.positions, self.masks)
        self.total = term if self.total is None else self.total + term
        self.layers += 1

    def loss(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("attention loss: the denoiser reported no cross-attention layer")
        return self.total


def concept_attention_mass(
    probes: Iterable[AttentionProbe], positions: torch.Tensor, masks: torch.Tensor | None = None
) -> float:
    """Mean over layers, samples, heads and masked pixels of the probability mass on S (0..1)."""
    values = []
    for probe in probes:
        positions_d = positions.to(device=probe.probs.device, dtype=torch.bool)
        _check(probe, positions_d, masks)
        probs = probe.probs.detach().float()
        pixel = None if masks is None else resize_masks(masks, probe.height, probe.width).to(probs.device)
        for b in range(probs.shape[0]):
            mass = probs[b][:, :, positions_d[b]].sum(-1)  # (heads, HW)
            if pixel is not None:
                mass = mass[:, pixel[b]]
            if mass.numel():
                values.append(float(mass.mean()))
    if not values:
        raise ValueError("attention mass: no layer, or every mask is empty")
    return sum(values) / len(values)
