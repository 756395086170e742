"""The LoRA null-space option: the projector's algebra, and trained LoRAs (full and cached-query
paths) that change nothing of the preserved subspace while the concept still loses attention."""
import dataclasses

import pytest
import torch

from fake_denoiser import FakeDenoiser, concept_mass, fake_latents_and_masks
from fakes import FakeTextEncoder
from mace_ops.concepts import Concept
from mace_ops.lora_train import LoraTrainConfig, train_concept_lora
from mace_ops.null_space import null_space_projector
from mace_ops.templates import OBJECT_TEMPLATES

torch.set_num_threads(1)
ENC, DEN = FakeTextEncoder(), FakeDenoiser()
LATENTS, _ = fake_latents_and_masks()
SHIP = Concept(("ship",), line=1)
KEEP = [t.replace("{}", w) for w in ("car", "dog") for t in OBJECT_TEMPLATES[:6]]


def _moment(prompts=KEEP):
    keep = torch.cat([e.features for e in ENC.encode(prompts)]).double()
    return (keep.T @ keep / keep.shape[0]).float()


def test_projector_removes_the_top_energy_directions():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    s = torch.tensor([50.0, 30.0, 15.0, 4.0, 0.9, 0.1], dtype=torch.float64)
    m = (basis * s) @ basis.T
    for energy, k in ((0.4, 1), (0.7, 2), (0.9, 3), (0.98, 4), (0.995, 5)):
        q, got = null_space_projector(m.float(), energy)
        assert got == k
        torch.testing.assert_close(q @ q, q, atol=1e-5, rtol=0)  # a projector
        torch.testing.assert_close(q, q.T)
        assert float((q @ basis[:, :k].float()).abs().max()) < 1e-5  # the kept directions are blocked
        assert float((q @ basis[:, k:].float() - basis[:, k:].float()).abs().max()) < 1e-5  # the rest pass
    q, k = null_space_projector(m.float(), 0.0)
    assert k == 0 and torch.equal(q, torch.eye(6))
    for bad, match in ((1.0, "below 1"), (-0.1, "energy"), (float("nan"), "energy")):
        with pytest.raises(ValueError, match=match):
            null_space_projector(m.float(), bad)
    with pytest.raises(ValueError, match="square"):
        null_space_projector(torch.ones(3, 4), 0.9)
    with pytest.raises(ValueError, match="all zero"):
        null_space_projector(torch.zeros(3, 3), 0.9)


@pytest.mark.parametrize("path", ["full", "cached_queries"])
def test_null_space_lora_leaves_preserved_text_alone_and_still_erases(path):
    P = _moment()
    q, k = null_space_projector(P, 0.99)
    assert 0 < k < P.shape[0]
    blocked = torch.eye(P.shape[0]) - q  # the preserved subspace
    # the concept's own tokens only: the end/padding tokens are the same in preserved prompts, so they are blocked
    base = LoraTrainConfig(steps=30, lr=1e-2, seed=0, use_masks=False, path=path, include_end_tokens=False)
    plain = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, None, base)
    kept = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, None,
                              dataclasses.replace(base, null_space=0.99), preserve_moment=P)
    assert kept.metadata["settings"]["null_space_rank"] == k
    for name in kept.lora.names:
        d_kept, d_plain = kept.lora.delta(name).detach(), plain.lora.delta(name).detach()
        assert float((d_kept @ blocked).norm()) <= 1e-5 * max(float(d_kept.norm()), 1e-12)
        if float(d_plain.norm()) > 0:  # V stays zero on the cached path
            assert float((d_plain @ blocked).norm()) > 0.05 * float(d_plain.norm())  # without it the LoRA reads it
    before = concept_mass(DEN, ENC, "ship", None, False, LATENTS)
    assert concept_mass(DEN, ENC, "ship", kept.lora.weight_transform, False, LATENTS) < 0.6 * before  # still erases


def test_null_space_setting_is_checked_and_off_by_default():
    cfg = LoraTrainConfig()
    assert cfg.null_space == 0 and "null_space" not in cfg.settings()  # older resume keys hold
    assert dataclasses.replace(cfg, null_space=0.9).settings()["null_space"] == 0.9
    with pytest.raises(ValueError, match="null-space energy"):
        dataclasses.replace(cfg, null_space=1.5).validate()
    with pytest.raises(ValueError, match="null space > 0 needs preserve prompts"):
        train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, None,
                           dataclasses.replace(cfg, steps=2, null_space=0.9))
