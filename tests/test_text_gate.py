"""``mace_ops.text_gate``: the ACE gate's cosine and ramp compiled into MLP units, on plain tensors."""
from __future__ import annotations

import math

import pytest
import torch

from mace_ops.concepts import Concept
from mace_ops.text_gate import (ACTIVATIONS, CLOSED_OFFSET, TextGate, TextGateConfig, calibrate_text_gate,
                                  compile_text_gate, ramp_units)


def _residuals_at(p: torch.Tensor, cosines: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Residuals (k, d) whose centred direction has exactly ``cosines`` to the centred unit ``p``,
    at random scales and offsets (what a LayerNorm removes)."""
    d = p.numel()
    q = torch.randn(len(cosines), d, generator=gen, dtype=torch.float64)
    q -= q.mean(-1, keepdim=True)
    q -= (q @ p)[:, None] * p
    q = torch.nn.functional.normalize(q, dim=-1)
    x = cosines[:, None] * p + torch.sqrt(1 - cosines[:, None] ** 2) * q
    scale = torch.rand(len(cosines), 1, generator=gen, dtype=torch.float64) * 3 + 0.5
    return x * scale + torch.randn(len(cosines), 1, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_ramp_units_read_the_cosine_exactly_and_are_closed_at_the_threshold(activation):
    """Through the norm's affine part, unit i's pre-activation is s (cos - tau_i) - z0; the pair
    writes < 1e-4 of Delta at and below tau and Delta from tau + width on (CLIP's quick_gelu too)."""
    gen, d, n, width = torch.Generator().manual_seed(0), 32, 3, 0.01
    gamma = (torch.rand(d, generator=gen, dtype=torch.float64) + 0.2) * torch.where(torch.arange(d) % 5 == 0, -1, 1)
    beta = torch.randn(d, generator=gen, dtype=torch.float64) * 0.3
    protos = torch.randn(n, d, generator=gen, dtype=torch.float64)
    protos = torch.nn.functional.normalize(protos - protos.mean(-1, keepdim=True), dim=-1)
    gate = TextGate(protos, torch.tensor([0.5, 0.7, 0.9], dtype=torch.float64),
                    torch.randn(n, d, generator=gen, dtype=torch.float64))
    rows, bias, cols = ramp_units(gamma, beta, gate, activation, width)
    assert rows.shape == (2 * n, d) and bias.shape == (2 * n,) and cols.shape == (d, 2 * n)
    z0, phi = CLOSED_OFFSET[activation], ACTIVATIONS[activation]
    s = 3 * z0 / width
    for i in range(n):
        tau = float(gate.thresholds[i])
        cos = torch.tensor([tau - 0.3, tau - 1e-3, tau, tau + width, tau + width + 0.02], dtype=torch.float64)
        r = _residuals_at(protos[i], cos, gen)
        h = torch.nn.functional.layer_norm(r, (d,), gamma, beta, eps=0.0)
        z = h @ rows.T + bias
        own = torch.nn.functional.cosine_similarity(r - r.mean(-1, keepdim=True), protos[i][None], dim=-1)
        assert torch.allclose(own, cos, atol=1e-9)
        assert torch.allclose(z[:, i], s * (cos - tau) - z0, atol=1e-6)
        out = phi(z[:, [i, n + i]]) @ cols[:, [i, n + i]].T                     # this concept's pair only
        size = gate.deltas[i].norm()
        assert torch.all(out[:3].norm(dim=-1) < 1e-4 * size), out[:3].norm(dim=-1) / size
        assert torch.allclose(out[3:], gate.deltas[i].expand(2, -1), atol=1e-3 * float(size))


class _Site:
    """An ``MlpSite`` over fixed residuals (every prompt encodes to the same rows)."""

    activation = "quick_gelu"

    def __init__(self, d: int, h: int, gen: torch.Generator):
        from mace_ops.interfaces import EncodedPrompt

        rows = torch.randn(6, d, generator=gen)

        class Enc:
            def encode(self, prompts):
                return [EncodedPrompt((0, 1, 2, 3, 4, 5), 6, rows.clone()) for _ in prompts]
        self.inputs = self.outputs = Enc()
        self._norm = (torch.rand(d, generator=gen) + 0.5, torch.randn(d, generator=gen) * 0.1)
        self._mlp = {"fc1.weight": torch.randn(h, d, generator=gen), "fc1.bias": torch.randn(h, generator=gen),
                     "fc2.weight": torch.randn(d, h, generator=gen), "fc2.bias": torch.randn(d, generator=gen)}
        self._mlp["fc2.weight"][:, :4] *= 1e-3                      # four nearly idle units

    def norm(self):
        return self._norm

    def mlp(self):
        return self._mlp


def test_compile_text_gate_replaces_the_least_important_units_and_keeps_every_shape():
    """The ramp units land on the units that matter least (here the four made idle), whose mean
    output moves into the bias; the rest of the MLP is untouched; too many concepts for the
    layer is refused naming the field and the fix; the site's tensors are not written to."""
    gen, d = torch.Generator().manual_seed(1), 8
    site = _Site(d, 16, gen)
    original = {k: v.clone() for k, v in site.mlp().items()}
    protos = torch.nn.functional.normalize(torch.randn(2, d, generator=gen), dim=-1)
    gate = TextGate(protos, torch.tensor([0.9, 0.95]), torch.randn(2, d, generator=gen))
    new = compile_text_gate(site, gate, ["a prompt"])
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in original.items()}
    changed = (new["fc1.weight"] != original["fc1.weight"]).any(1)
    assert changed.nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert torch.equal(new["fc2.weight"][:, 4:], original["fc2.weight"][:, 4:])
    assert not torch.equal(new["fc2.bias"], original["fc2.bias"])
    assert all(torch.equal(site.mlp()[k], original[k]) for k in original)
    many = TextGate(torch.zeros(9, d), torch.zeros(9), torch.zeros(9, d))
    with pytest.raises(ValueError, match="concepts: 9 need 18 MLP units, the layer has 16; erase fewer"):
        compile_text_gate(site, many, ["a prompt"])
    with pytest.raises(ValueError, match="width"):
        TextGateConfig(width=0.0).validate()
    assert math.isclose(TextGateConfig().width, 0.01)


def test_calibrate_text_gate_refuses_an_empty_concept_list_or_calibration_set():
    """Nothing to erase, or nothing to set the thresholds on, is named before any encoding."""
    site = _Site(8, 16, torch.Generator().manual_seed(2))
    concept = Concept(("ship",))
    for concepts, prompts in (([], ["a prompt"]), ([concept], [])):
        with pytest.raises(ValueError, match="concepts and calibration prompts: the text gate needs both"):
            calibrate_text_gate(site, concepts, ("a photo of {}",), "boat", prompts)


def test_calibrate_text_gate_writes_each_concepts_own_anchor():
    """A concept with its own anchor (``x -> y``) gets the Delta towards that anchor, the others
    towards the shared one, each exactly as if calibrated alone with it."""
    site = _Site(8, 16, torch.Generator().manual_seed(3))

    site.inputs = site.outputs = _ByPrompt()
    templates, prompts = ("a photo of {}", "a picture of {}"), ["a dog", "a red car", "the sea at night"]
    ship, cat = Concept(("ship",), anchor="boat"), Concept(("cat",))
    both = calibrate_text_gate(site, [ship, cat], templates, "animal", prompts)
    alone_ship = calibrate_text_gate(site, [Concept(("ship",))], templates, "boat", prompts)
    alone_cat = calibrate_text_gate(site, [cat], templates, "animal", prompts)
    shared = calibrate_text_gate(site, [Concept(("ship",))], templates, "animal", prompts)
    assert torch.allclose(both.deltas[0], alone_ship.deltas[0]) and torch.allclose(both.deltas[1], alone_cat.deltas[0])
    assert not torch.allclose(both.deltas[0], shared.deltas[0])


class _ByPrompt:
    """One token per word, its rows fixed by word and place (8 wide), the same on every call."""

    def encode(self, prompts):
        from mace_ops.interfaces import EncodedPrompt

        out = []
        for p in prompts:
            ids = tuple(sum(map(ord, w)) for w in p.split())
            rows = [torch.randn(8, generator=torch.Generator().manual_seed(i * 31 + t)) for t, i in enumerate(ids)]
            out.append(EncodedPrompt(ids, len(ids), torch.stack(rows)))
        return out


def test_unit_importance_is_the_same_in_chunks(monkeypatch):
    """Summed over chunks of token rows (its memory bound), the ranking and mean activation equal
    the all-at-once values."""
    import mace_ops.text_gate as tg

    site = _Site(8, 16, torch.Generator().manual_seed(4))
    site.inputs = _ByPrompt()
    prompts = ["a dog on the grass", "a red car", "the sea at night under the moon", "two cats"]
    whole = tg.unit_importance(site, prompts)
    monkeypatch.setattr(tg, "IMPORTANCE_ROWS", 3)          # 3 rows = one prompt's worth at most per chunk
    chunked = tg.unit_importance(site, prompts)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, chunked))
    rows = torch.cat([e.features for e in site.inputs.encode(prompts)])
    gamma, beta = site.norm()
    act = ACTIVATIONS[site.activation](torch.nn.functional.layer_norm(rows, (8,), gamma, beta)
                                       @ site.mlp()["fc1.weight"].T + site.mlp()["fc1.bias"])
    assert torch.allclose(whole[1], act.mean(0), atol=1e-6)
