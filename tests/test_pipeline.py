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

torch.set_num_threads(1)
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
    def stop_in_second_concept():  # the user presses stop once the first LoRA is on disk
        if os.listdir(tmp_path):
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


# ---- issue 11: resume keys on a concept's own inputs -----------------------------------------

CAT = Concept(("cat",), None, 3)


def test_add_remove_and_reorder_reuse_every_unchanged_concept(tmp_path):
    first = run(tmp_path, CONCEPTS)
    assert first.trained == ["ship", "car"]
    calls = []
    added = run(tmp_path, CONCEPTS + [CAT], calls=calls)  # one more concept: only it is trained
    assert added.reused == ["ship", "car"] and added.trained == ["cat"] and calls == ["cat"]
    calls.clear()
    reordered = run(tmp_path, [CAT, CONCEPTS[1], CONCEPTS[0]], calls=calls)
    assert sorted(reordered.reused) == ["car", "cat", "ship"] and calls == []
    removed = run(tmp_path, [CONCEPTS[1]], calls=calls)
    assert removed.reused == ["car"] and calls == []
    # the same LoRA file serves every list it is in
    assert added.lora_files[0] == first.lora_files[0] and reordered.lora_files[2] == first.lora_files[0]


def test_own_inputs_are_the_key(tmp_path):
    from mace_ops.pipeline import resume_inputs, settings_key
    base = settings_key(CONCEPTS[0], SETTINGS, TEMPLATES, PRESERVE, {"seed": 1})
    assert base == settings_key(Concept(("ship",), None, 7), SETTINGS, TEMPLATES, PRESERVE, {"seed": 1})  # line no.
    changed = [
        settings_key(Concept(("ship", "boat"), None, 1), SETTINGS, TEMPLATES, PRESERVE, {"seed": 1}),  # synonym
        settings_key(Concept(("ship",), "sky", 1), SETTINGS, TEMPLATES, PRESERVE, {"seed": 1}),  # anchor
        settings_key(CONCEPTS[0], SETTINGS, TEMPLATES[:4], PRESERVE, {"seed": 1}),  # templates
        settings_key(CONCEPTS[0], SETTINGS, TEMPLATES, PRESERVE[:1], {"seed": 1}),  # preserve set
        settings_key(CONCEPTS[0], SETTINGS, TEMPLATES, PRESERVE, {"seed": 2}),  # image seed
        settings_key(CONCEPTS[0], PipelineSettings("object", "ground", CFRConfig(lamb=2.0), SETTINGS.lora),
                     TEMPLATES, PRESERVE, {"seed": 1}),  # CFR lambda
    ]
    assert len({base, *changed}) == 7
    assert set(resume_inputs(CONCEPTS[0], SETTINGS, TEMPLATES, PRESERVE)) >= {
        "phrases", "anchor", "concept_type", "templates", "cfr", "preserve", "lora", "training_data"}


def test_damaged_file_is_named_set_aside_and_retrained(tmp_path):
    first = run(tmp_path, CONCEPTS)
    path = first.lora_files[0]
    with open(path, "r+b") as f:  # truncate the first LoRA
        f.truncate(os.path.getsize(path) // 2)
    logs = []
    den = FakeDenoiser()
    res = run_mass_erasure(ENC, den, den.kv_weights(), CONCEPTS, TEMPLATES, SETTINGS, str(tmp_path), data,
                           PRESERVE, log=logs.append)
    assert res.trained == ["ship"] and res.reused == ["car"]
    assert res.set_aside == [os.path.basename(path) + ".damaged"] and "set aside" in res.summary()
    assert any(os.path.basename(path) in line and "damaged or truncated" in line for line in logs)
    assert os.path.isfile(path + ".damaged") and os.path.isfile(path)


def test_interrupt_during_cfr_and_fusion(tmp_path):
    seen = []

    def stop_at(stage_done):
        def progress(done, total):
            seen.append((done, total))
            if done >= stage_done:
                raise KeyboardInterrupt
        return progress

    den = FakeDenoiser()
    with pytest.raises(KeyboardInterrupt):  # during CFR encoding: after the first concept
        run_mass_erasure(ENC, den, den.kv_weights(), CONCEPTS, TEMPLATES, SETTINGS, str(tmp_path), data,
                         PRESERVE, progress=stop_at(1), log=lambda s: None)
    assert seen[-1] == (1, 2 + 2 * SETTINGS.lora.steps + 2 + 1) and os.listdir(tmp_path) == []
    run(tmp_path, CONCEPTS)
    seen.clear()
    with pytest.raises(KeyboardInterrupt):  # during fusion: after the first concept's covariance
        run_mass_erasure(ENC, den, den.kv_weights(), CONCEPTS, TEMPLATES, SETTINGS, str(tmp_path), data,
                         PRESERVE, progress=stop_at(2 + 2 * SETTINGS.lora.steps + 1), log=lambda s: None)
    assert len(os.listdir(tmp_path)) == 2


def test_two_shards_then_fuse_equal_one_run(tmp_path):
    from mace_ops.pipeline import Shard, parse_shard

    concepts = CONCEPTS + [Concept(("horse",), None, 3)]
    den = FakeDenoiser()

    def go(folder, **kw):
        return run_mass_erasure(ENC, den, den.kv_weights(), concepts, TEMPLATES, SETTINGS, str(folder), data,
                                PRESERVE, log=lambda s: None, **kw)

    one = go(tmp_path / "one")
    shared = tmp_path / "shared"
    with pytest.raises(ValueError, match=r"no finished LoRA for 3 concept\(s\).*ship, car, horse"):
        go(shared, fuse_only=True)
    first = go(shared, shard=Shard(0, 2))
    assert first.trained == ["ship", "horse"] and first.other_shards == ["car"] and not first.fused
    assert first.weights == {} and "shard 1/2" in first.summary() and "fuse" in first.summary()
    with pytest.raises(ValueError, match=r"no finished LoRA for 1 concept\(s\).*: car;"):
        go(shared, fuse_only=True)
    second = go(shared, shard=Shard(1, 2))
    assert second.trained == ["car"] and second.reused == []
    fused = go(shared, fuse_only=True)
    assert fused.trained == [] and fused.reused == ["ship", "car", "horse"] and fused.fused
    assert sorted(os.listdir(shared)) == sorted(os.listdir(tmp_path / "one"))
    for k in one.weights:
        assert torch.equal(one.weights[k], fused.weights[k]), k

    assert parse_shard("") == (None, False) and parse_shard(" 1/1 ") == (None, False)
    assert parse_shard("2/3") == (Shard(1, 3), False) and parse_shard("FUSE") == (None, True)
    for bad, msg in (("3/2", "must be 1..n"), ("0/2", "must be 1..n"), ("1/0", "must be 1..n"),
                     ("half", "not understood"), ("1of2", "not understood")):
        with pytest.raises(ValueError, match=f"shard: .*{msg}"):
            parse_shard(bad)
    with pytest.raises(ValueError, match="choose one"):
        go(shared, shard=Shard(0, 2), fuse_only=True)
    with pytest.raises(ValueError, match="shard: 3/2"):
        Shard(2, 2)


def test_batched_concepts_equal_one_by_one_and_resume(tmp_path):
    import dataclasses

    from mace_ops.lora_file import load_concept_lora

    cached = dataclasses.replace(SETTINGS, lora=dataclasses.replace(SETTINGS.lora, path="cached_queries",
                                                                    query_samples=4, steps=8))
    concepts = CONCEPTS + [Concept(("horse",), None, 3)]
    den = FakeDenoiser()
    logs = []

    def go(folder, batch, should_stop=None):
        return run_mass_erasure(ENC, den, den.kv_weights(), concepts, TEMPLATES, cached, str(folder), data, PRESERVE,
                                log=logs.append, concept_batch=batch, should_stop=should_stop)

    alone, together = go(tmp_path / "a", 1), go(tmp_path / "b", 2)
    assert together.trained == ["ship", "car", "horse"]
    assert any("trained with 1 other concept" in line for line in logs)
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b"))  # same resume keys
    for pa, pb in zip(alone.lora_files, together.lora_files):
        fa, fb = load_concept_lora(pa).deltas(), load_concept_lora(pb).deltas()
        for k in fa:
            torch.testing.assert_close(fa[k], fb[k], atol=1e-6, rtol=1e-4)
    for k in alone.weights:
        torch.testing.assert_close(alone.weights[k], together.weights[k], atol=1e-5, rtol=1e-4)

    folder = tmp_path / "c"

    def stop_in_second_group():  # the first group (ship, car) is on disk
        if folder.exists() and len(os.listdir(folder)) >= 2:
            raise KeyboardInterrupt("user pressed stop")
        return False

    with pytest.raises(KeyboardInterrupt):
        go(folder, 2, stop_in_second_group)
    assert len(os.listdir(folder)) == 2
    resumed = go(folder, 2)
    assert resumed.reused == ["ship", "car"] and resumed.trained == ["horse"]
