"""ANT's weight saliency for the LoRA stage: only the salient K/V rows change, the concept still
loses attention, the training draws are those of a run without it, and bad settings are named."""
import dataclasses

import pytest
import torch

from fake_denoiser import FakeDenoiser, concept_mass, fake_latents_and_masks
from fakes import FakeTextEncoder
from mace_ops.concepts import Concept
from mace_ops.lora_train import LoraTrainConfig, train_concept_lora
from mace_ops.saliency import mask_up, salient_rows
from mace_ops.templates import OBJECT_TEMPLATES

torch.set_num_threads(1)
ENC, DEN = FakeTextEncoder(), FakeDenoiser()
LATENTS, _ = fake_latents_and_masks()
SHIP = Concept(("ship",), line=1)
BASE = LoraTrainConfig(steps=30, lr=1e-2, seed=0, use_masks=False, path="full", include_end_tokens=False)


def test_salient_rows_are_the_rows_the_loss_depends_on():
    w = {"a": torch.ones(6, 3), "b": torch.ones(4, 3)}
    x = torch.tensor([1.0, 2.0, 3.0])

    def loss_of(transform):   # depends on rows 0 and 1 of "a" and row 3 of "b", row 0 of "a" most
        wa, wb = transform("a", w["a"]), transform("b", w["b"])
        return 5 * (wa[0] @ x) + (wa[1] @ x) + (wb[3] @ x)

    rows = salient_rows(loss_of, w, share=0.2)               # 2 of 10 rows
    assert rows["a"].tolist() == [True] + [False] * 5 and rows["b"].tolist() == [False, False, False, True]
    up = {"a": torch.ones(6, 1), "b": torch.ones(4, 1)}
    mask_up(up, rows)
    assert up["a"].flatten().tolist() == [1, 0, 0, 0, 0, 0] and up["b"].flatten().tolist() == [0, 0, 0, 1]
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="share"):
            salient_rows(loss_of, w, share=bad)


def test_saliency_lora_changes_only_its_rows_and_still_erases():
    salient = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, None,
                                 dataclasses.replace(BASE, saliency=0.1))
    total = sum(w.shape[0] for w in DEN.kv_weights().values())
    kept = salient.metadata["settings"]["salient_rows"]
    assert 0 < kept <= round(0.1 * total) + 2
    changed = sum(int((salient.lora.delta(n).detach().abs().sum(1) > 0).sum()) for n in salient.lora.names)
    assert 0 < changed <= kept
    before = concept_mass(DEN, ENC, "ship", None, False, LATENTS)
    assert concept_mass(DEN, ENC, "ship", salient.lora.weight_transform, False, LATENTS) < 0.8 * before


def test_saliency_keeps_the_training_draws_and_is_off_by_default():
    plain = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, None, dataclasses.replace(BASE, steps=3))
    full = train_concept_lora(DEN, ENC, SHIP, OBJECT_TEMPLATES, LATENTS, None,
                              dataclasses.replace(BASE, steps=3, saliency=1.0))
    assert plain.losses == full.losses                      # share 1: every row, the same draws
    cfg = LoraTrainConfig()
    assert cfg.saliency == 0 and "saliency" not in cfg.settings()
    with pytest.raises(ValueError, match="saliency share"):
        dataclasses.replace(cfg, saliency=2.0).validate()
    with pytest.raises(ValueError, match="path to 'full'"):
        dataclasses.replace(cfg, saliency=0.1, path="cached_queries").validate()
