"""mace_ops.pooled: the closed-form edit of SDXL's pooled-text columns (plain torch)."""
from __future__ import annotations

import pytest
import torch

from mace_ops.cfr import CFRConfig
from mace_ops.concepts import Concept
from mace_ops.pooled import edit_pooled_projection, pooled_stats

D, OUT, EXTRA = 16, 12, 5
TEMPLATES = ("a photo of {}", "a painting of {}", "{} in a field")


def fake_pooled(prompts):
    """A deterministic vector per prompt (hash-seeded)."""
    import zlib

    return torch.stack([torch.randn(D, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                        for p in prompts])


def test_edit_solves_the_ridge_problem_and_leaves_other_columns():
    concepts = [Concept(("ship", "boat"), "sea", 1)]
    keep = [t.format("car") for t in TEMPLATES]
    stats = pooled_stats(fake_pooled, concepts, TEMPLATES, "", keep)
    assert stats.n_pairs == 6 and stats.n_preserve == 3
    w = torch.randn(OUT, D + EXTRA, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    lamb, scale = 0.5, 2.0
    edit = edit_pooled_projection(w, "label_emb.0.0.weight", stats, CFRConfig(lamb, scale))
    assert torch.equal(edit.delta[:, D:], torch.zeros(OUT, EXTRA))
    # the gradient of sum ||W'p_c - W p_a||^2 + s sum ||W'q - W q||^2 + lamb ||W' - W||^2 vanishes at W'
    W, Wn = w[:, :D].double(), (w + edit.delta)[:, :D].double()
    pc = torch.cat([fake_pooled([t.format(p) for t in TEMPLATES]) for p in ("ship", "boat")]).double()
    pa = fake_pooled([t.format("sea") for t in TEMPLATES]).double().repeat(2, 1)
    q = fake_pooled(keep).double()
    s = scale * stats.n_pairs / stats.n_preserve
    grad = (Wn @ pc.T - W @ pa.T) @ pc + s * (Wn - W) @ q.T @ q + lamb * (Wn - W)
    assert float(grad.abs().max()) < 1e-4 * float((W @ pa.T).abs().max() * pc.abs().max())
    # and it moves the concept's pooled outputs towards the anchor's
    assert (Wn @ pc.T - W @ pa.T).norm() < (W @ pc.T - W @ pa.T).norm()


def test_edit_refuses_a_layer_too_narrow():
    stats = pooled_stats(fake_pooled, [Concept(("ship",), None, 1)], TEMPLATES, "sea", [])
    with pytest.raises(ValueError, match="cannot read a width-16 embedding"):
        edit_pooled_projection(torch.zeros(4, 8), "k", stats, CFRConfig(1.0, 1.0))
