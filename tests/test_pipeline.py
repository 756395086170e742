"""Full pipeline (CFR -> per-concept LoRA -> fusion): resume, interrupts, both concepts erased."""
import os

import pytest
import torch

from fake_denoiser import FakeDenoiser
from fakes import FakeTextEncoder
from mace_ops.alignment import concept_positions
from mace_ops.attention_loss import concept_attention_mass
from mace_ops.cfr import CFRConfig
from mace_ops.concepts import Concept
from mace_ops.lora_train import LoraTrainConfig
from mace_ops.pipeline import OverrideDenoiser, PipelineSettings, load_concept_list, run_mass_erasure
from mace_ops.templates import OBJECT_TEMPLATES

ENC = FakeTextEncoder()
TEMPLATES = OBJECT_TEMPLATES[:8]
SETTINGS = PipelineSettings("object", "ground", CFRConfig(lamb=1.0),
                            LoraTrainConfig(steps=20, lr=1e-1, seed=3, use_masks=False),
                            fusion_lambda=1e-3, fusion_preserve_scale=0.1)
PRESERVE = ["a dog running on the grass", "a cat sleeping on a sofa"]


def data(concept):
    g = torch.Generator().manual_seed(len(concept.name))
    return torch.randn(4, 4, 8, 8, generator=g), None


def run(tmp_path, concepts, should_stop=None, calls=None):
    den = FakeDenoiser()
    def counted(c):
        if calls is not None:
            calls.append(c.name)
        return data(c)
    return run_mass_erasure(ENC, den, den.kv_weights(), concepts, TEMPLATES, SETTINGS, str(tmp_path), counted,
                            PRESERVE, should_stop=should_stop, log=lambda s: None)


def mass(weights, word):
    den = OverrideDenoiser(FakeDenoiser(), weights)
    enc = ENC.encode([f"a photo of a {word}"])[0]
    pos = torch.zeros(1, len(enc.ids), dtype=torch.bool)
    pos[0, concept_positions(enc.ids, enc.length, ENC.tokenize(word), ENC.end_id, False)] = True
    probes = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        den.forward_with_attention(x, torch.tensor([300, 300]), enc.features[None].repeat(2, 1, 1), probes.append)
    return concept_attention_mass(probes, pos.repeat(2, 1))


CONCEPTS = [Concept(("ship",), None, 1), Concept(("car",), None, 2)]


def test_pipeline_erases_each_concept_and_resumes(tmp_path):
    calls = []
    first = run(tmp_path, CONCEPTS, calls=calls)
    assert first.trained == ["ship", "car"] and first.reused == [] and calls == ["ship", "car"]
    assert all(os.path.isfile(p) for p in first.lora_files)
    base = FakeDenoiser().kv_weights()
    for word in ("ship", "car"):
        assert mass(first.weights, word) < 0.5 * mass(base, word), word
    calls.clear()
    second = run(tmp_path, CONCEPTS, calls=calls)
    assert second.reused == ["ship", "car"] and second.trained == [] and calls == []
    for k in first.weights:
        assert torch.equal(first.weights[k], second.weights[k])
        assert torch.allclose(first.deltas[k], first.weights[k] - base[k], atol=1e-6)


def test_interrupted_run_keeps_finished_concepts(tmp_path):
    steps = []

    def stop_in_second_concept():
        steps.append(1)
        if len(steps) > SETTINGS.lora.steps + 3:
            raise KeyboardInterrupt("user pressed stop")
        return False

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, CONCEPTS, should_stop=stop_in_second_concept)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 1 and "ship" in files[0]
    calls = []
    resumed = run(tmp_path, CONCEPTS, calls=calls)
    assert resumed.reused == ["ship"] and resumed.trained == ["car"] and calls == ["car"]


def test_changed_settings_retrain(tmp_path):
    run(tmp_path, CONCEPTS[:1])
    other = PipelineSettings("object", "ground", SETTINGS.cfr, LoraTrainConfig(steps=12, lr=1e-2, seed=3,
                                                                                use_masks=False))
    den = FakeDenoiser()
    res = run_mass_erasure(ENC, den, den.kv_weights(), CONCEPTS[:1], TEMPLATES, other, str(tmp_path), data,
                           log=lambda s: None)
    assert res.trained == ["ship"]


def test_concept_list_errors_name_the_line(tmp_path):
    with pytest.raises(ValueError, match="concepts, line 2: empty phrase"):
        load_concept_list("ship\nboat,,vessel\n")
    f = tmp_path / "celebs.csv"
    f.write_text("ship\n\ncar\ncar\n")
    roots = [("the test folder", str(tmp_path))]
    with pytest.raises(ValueError, match="celebs.csv, line 4: 'car' is already listed on line 3"):
        load_concept_list(path="celebs.csv", roots=roots)
    with pytest.raises(ValueError, match="is not a file in the test folder"):
        load_concept_list(path="missing.txt", roots=roots)
    with pytest.raises(ValueError, match="refused"):
        load_concept_list(path=str(f), roots=roots)  # absolute paths are refused even inside the root
    with pytest.raises(ValueError, match="no concept given"):
        load_concept_list("# only a comment\n")
