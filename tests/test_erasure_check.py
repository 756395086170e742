"""The erasure check without ComfyUI: the diffusion classifier's contract (fake denoiser) and, on toy
world v2, that the base model as judge tells a CFR erasure from the base model and from a no-op one.

Nothing here is a stored number: every accuracy is measured on images sampled in the test.
"""
from __future__ import annotations

import pytest
import torch

from fake_denoiser import FakeDenoiser
from mace_ops.concepts import parse_concepts
from mace_ops.diffusion_classifier import JudgeConfig, classify
from mace_ops.erasure_check import candidates, check_prompts, check_rows, judge_table, parse_held_out
from mace_ops.erasure_metrics import mass_row, rate


def _fake_inputs(n=5, k=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    contexts = torch.randn(k, 6, 32, generator=g)
    table = torch.arange(k).repeat(n, 1)
    labels = torch.randint(0, k, (n,), generator=g)
    return latents, contexts, table, labels


def test_classifier_verdicts_are_consistent():
    den = FakeDenoiser()
    latents, contexts, table, labels = _fake_inputs()
    seen = []
    j = classify(den, latents, contexts, table, labels, JudgeConfig(draws=4, shortlist=3, screen_draws=1, batch=7),
                 keep=(0,), progress=lambda d, t: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] and all(d <= t for d, t in seen)
    assert j.forwards == 5 * 9 + 5 * 3 * 5 - sum(  # screened: every candidate once, then the shortlist (+ label, anchor)
        3 * (5 - int(torch.isfinite(j.errors[i]).sum())) for i in range(5))
    fin = torch.isfinite(j.errors)
    assert fin[:, 0].all() and fin[torch.arange(5), labels].all()        # anchor and label never screened out
    assert torch.equal(j.winner, j.errors.argmin(1))
    assert torch.equal(j.recognised, j.margin > 0) and ((j.p_label >= 0) & (j.p_label <= 1)).all()
    assert (j.margin_se >= 0).all()


def test_same_image_same_draws_same_verdict():
    den = FakeDenoiser()
    latents, contexts, table, labels = _fake_inputs(n=3)
    twice = torch.cat([latents, latents])
    j = classify(den, twice, contexts, torch.cat([table, table]), torch.cat([labels, labels]),
                 JudgeConfig(draws=3, batch=5), draw_ids=[0, 1, 2, 0, 1, 2])
    a, b = j.select(slice(0, 3)), j.select(slice(3, 6))
    assert torch.equal(a.winner, b.winner) and torch.allclose(a.margin, b.margin)
    with pytest.raises(ValueError, match="labels must be candidate positions"):
        classify(den, latents, contexts, table, labels + 100)
    with pytest.raises(ValueError, match="t_low"):
        classify(den, latents, contexts, table, labels, JudgeConfig(t_low=0.9, t_high=0.5))


def test_prompts_candidates_and_rows():
    erased = parse_concepts("van gogh, vincent van gogh\nmonet")
    kept = parse_concepts("picasso")
    held = parse_held_out("vincent -> van gogh\nclaude -> monet", erased)
    assert held == [("vincent", "van gogh"), ("claude", "monet")]
    with pytest.raises(ValueError, match="held_out, line 1: say which"):
        parse_held_out("vincent", erased)
    with pytest.raises(ValueError, match="erased phrase"):
        parse_held_out("monet -> van gogh", erased)
    prompts = check_prompts(erased, held, kept, ("a {}", "b {}", "c {}"), 4)
    assert [p.set for p in prompts] == ["erased"] * 4 + ["held_out"] * 4 + ["kept"] * 4
    assert [p.prompt for p in prompts[:4]] == ["a van gogh", "b monet", "c vincent van gogh", "a van gogh"]
    assert prompts[4].prompt == "b vincent" and prompts[4].label == "van gogh"
    cands = candidates("art", erased, kept)
    assert cands == ["art", "van gogh", "monet", "picasso"]
    texts, table, labels = judge_table([p.template for p in prompts], [p.label for p in prompts], cands)
    assert table.shape == (12, 4) and texts[table[0, 3]] == "a picasso" and labels[:2].tolist() == [1, 2]
    hits = {"none": torch.ones(12, dtype=torch.bool), "erased": torch.tensor([0, 0, 0, 1] * 2 + [1] * 4).bool()}
    rows = check_rows("style", 2, prompts, hits)
    assert rows[1]["acc_e"] == 0.25 and rows[1]["n_e"] == 4 and rows[1]["acc_s"] == 1.0
    assert rows[1]["H"] == pytest.approx(3 / (1 / 0.75 + 1 / 0.75 + 1), abs=1e-4)
    no_g = mass_row("style", 1, rate([True, False]), rate([True]))
    assert no_g["acc_g"] is None and no_g["n_g"] == 0 and no_g["H"] == pytest.approx(2 / (1 / 0.5 + 1), abs=1e-4)


@pytest.fixture(scope="module")
def toy():
    from toyworld.v2 import evaluate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: more threads only contend
    yield evaluate.load_world()
    torch.set_num_threads(threads)


def test_toy_check_tells_cfr_from_base_and_from_a_no_op(toy):
    from toyworld.v2 import check, erase, evaluate, vocab

    task = erase.Task("name", (vocab.NAMES[0],), tuple(vocab.NAMES[100:150]))
    retained = vocab.NAMES[150:155]
    e_set, _, _ = evaluate.prompt_sets("name", task.erase, retained, n_erased=8, n_retained=5)
    cands = check.candidates("name", task.erase, retained)
    config = JudgeConfig(draws=6)
    acc = {}
    for method, kv in (("base", None), ("no-op", toy.kv_weights()),
                       ("cfr", erase.cfr_erase(toy, task, prior_weight=1.0).weights)):
        acc[method] = check.check_set(toy, e_set, "name", cands, config, kv_weights=kv).check_accuracy
    assert acc["base"] - acc["cfr"] >= 0.5, acc
    assert abs(acc["no-op"] - acc["base"]) < 1e-9 and acc["no-op"] - acc["cfr"] >= 0.5, acc
