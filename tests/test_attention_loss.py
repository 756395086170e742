"""Attention loss: invariants of mace.md §10.14, batch handling, mask resizing, the mass metric."""
import pytest
import torch

from mace_ops.attention_loss import (
    AttentionLossCollector,
    attention_loss,
    concept_attention_mass,
    layer_term,
    resize_masks,
)
from mace_ops.interfaces import AttentionProbe

B, HEADS, L = 2, 3, 6


def _probe(h=4, w=4, seed=0, name="l0", grad=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, HEADS, h * w, L, generator=g, dtype=torch.float64, requires_grad=grad)
    return AttentionProbe(name, torch.softmax(logits, -1), h, w), logits


POS = torch.tensor([[0, 1, 1, 0, 0, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)


def _masks(size=8):
    m = torch.zeros(B, size, size)
    m[0, : size // 2] = 1.0  # top half
    m[1, :, size // 4 : size // 2] = 0.8  # a column band, above the 0.5 threshold
    return m


def _manual(probs, h, w, masks):
    total = 0.0
    for b in range(B):
        pix = resize_masks(masks[b : b + 1], h, w)[0] if masks is not None else torch.ones(h * w, dtype=torch.bool)
        sel = probs[b][:, pix][:, :, POS[b]]
        total += float(sel.pow(2).sum().sqrt())
    return total


def test_matches_definition_and_sums_samples():
    probe, _ = _probe()
    masks = _masks()
    loss = attention_loss([probe], POS, masks)
    assert abs(float(loss) - _manual(probe.probs.detach(), 4, 4, masks)) < 1e-6
    per_sample = sum(
        float(layer_term(AttentionProbe("x", probe.probs[b : b + 1], 4, 4), POS[b : b + 1], masks[b : b + 1]))
        for b in range(B)
    )
    assert abs(float(loss) - per_sample) < 1e-6  # batch > 1: sum of per-sample norms


def test_zero_when_concept_columns_vanish_inside_mask():
    probe, _ = _probe()
    masks = _masks()
    probs = probe.probs.detach().clone()
    for b in range(B):
        pix = resize_masks(masks[b : b + 1], 4, 4)[0]
        sub = probs[b][:, pix]
        sub[:, :, POS[b]] = 0
        probs[b][:, pix] = sub
    probs.requires_grad_(True)
    loss = attention_loss([AttentionProbe("l", probs, 4, 4)], POS, masks)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(probs.grad).all() and float(probs.grad.abs().max()) == 0.0


def test_invariant_to_probs_outside_mask_and_outside_positions():
    probe, _ = _probe()
    masks = _masks()
    base = attention_loss([probe], POS, masks)
    noisy = probe.probs.detach().clone()
    g = torch.Generator().manual_seed(1)
    for b in range(B):
        outside = ~resize_masks(masks[b : b + 1], 4, 4)[0]
        noisy[b][:, outside] = torch.rand(noisy[b][:, outside].shape, generator=g, dtype=noisy.dtype)
        noisy[b][:, :, ~POS[b]] = torch.rand(noisy[b][:, :, ~POS[b]].shape, generator=g, dtype=noisy.dtype)
    assert float(attention_loss([AttentionProbe("l", noisy, 4, 4)], POS, masks)) == float(base)


def test_all_ones_mask_equals_no_mask():
    probe, _ = _probe()
    assert float(attention_loss([probe], POS, torch.ones(B, 16, 16))) == float(attention_loss([probe], POS, None))


def test_layers_add_and_collector_matches():
    probes = [_probe(4, 4, 0, "a")[0], _probe(2, 2, 1, "b")[0], _probe(8, 8, 2, "c")[0]]
    masks = _masks(8)
    total = attention_loss(probes, POS, masks)
    assert abs(float(total) - sum(float(layer_term(p, POS, masks)) for p in probes)) < 1e-9
    collector = AttentionLossCollector(POS, masks)
    for p in probes:
        collector(p)
    assert collector.layers == 3 and abs(float(collector.loss()) - float(total)) < 1e-9


def test_gradient_flows_to_logits():
    probe, logits = _probe(grad=True)
    attention_loss([probe], POS, _masks()).backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_nearest_resize():
    m = torch.zeros(1, 8, 8)
    m[0, 0:4, 0:2] = 1
    r = resize_masks(m, 4, 4).reshape(4, 4)
    expect = torch.zeros(4, 4, dtype=torch.bool)
    expect[0:2, 0] = True
    assert torch.equal(r, expect)
    assert torch.equal(resize_masks(torch.full((1, 3, 3), 0.5), 3, 3), torch.zeros(1, 9, dtype=torch.bool))


def test_mass_metric():
    uniform = torch.full((B, HEADS, 16, L), 1.0 / L)
    probe = AttentionProbe("u", uniform, 4, 4)
    assert abs(concept_attention_mass([probe], POS, _masks()) - (3 + 4) / 2 / L) < 1e-6


@pytest.mark.parametrize(
    "positions,masks,fragment",
    [
        (POS[:1], None, "positions must be"),
        (POS, torch.ones(1, 4, 4), "1 masks for a batch of 2"),
        (POS, torch.ones(B, 4), "masks must be"),
    ],
)
def test_shape_errors(positions, masks, fragment):
    probe, _ = _probe()
    with pytest.raises(ValueError, match=fragment):
        attention_loss([probe], positions, masks)


def test_no_layers_is_an_error():
    with pytest.raises(ValueError, match="no cross-attention layer"):
        attention_loss([], POS)
