"""Toy world v3: identities no word describes, a frozen pre-trained text encoder, the shipped model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mace_ops.cfr import PACK_LAMBDA, PACK_RELATIVE_LAMBDA
from toyworld.v2 import erase
from toyworld.v3 import data, evaluate, scorer, text, vocab

WEIGHTS = evaluate.WEIGHTS_DIR / evaluate.GENERATOR_FILE
REPORT = Path(__file__).resolve().parents[1] / "docs" / "results" / "toyworld_v3.json"


# ----------------------------------------------------------------------------- the world's design
def test_every_name_has_its_own_glyph_at_least_three_cells_from_any_other():
    assert len(vocab.NAMES) == vocab.N_NAMES >= 1200
    bits = data.CODE_BITS.int()
    dist = (bits.unsqueeze(1) != bits.unsqueeze(0)).sum(2) + torch.eye(len(bits), dtype=torch.long) * 99
    assert int(dist.min()) >= vocab.MIN_HAMMING
    lit = bits.sum(1)
    assert int(lit.min()) >= vocab.MIN_LIT and int(lit.max()) <= vocab.MAX_LIT
    counts = torch.bincount(torch.tensor(vocab.COLOR_OF))
    assert counts.tolist() == [vocab.N_NAMES // len(vocab.COLORS)] * len(vocab.COLORS)  # look-alikes share colour
    assert all(1 <= len(vocab.NICKNAMES[n]) <= 2 for n in vocab.NAMES)


def test_no_caption_word_spells_a_glyph_out():
    """The only attribute words are colours; every caption kind is sampled and fits the window."""
    gen = torch.Generator().manual_seed(3)
    batch = data.sample_batch(400, gen)
    words = {w for c in batch.captions for w in c.split()}
    assert words <= set(vocab.WORDS)
    assert not words & {"circle", "square", "cross", "bar", "triangle", "topleft", "middle"}
    assert any(c.startswith("a photo of a ") and c.split()[5] == "person" for c in batch.captions)
    assert any(c == "" for c in batch.captions)
    assert max(len(vocab.tokenize(c)) for c in batch.captions) + 2 <= vocab.CONTEXT_LENGTH


def test_the_scorer_reads_ground_truth_exactly_and_refuses_a_glyph_off_by_two_cells():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab.N_NAMES, (256,), generator=gen)
    images = data.render(ids, torch.randint(0, vocab.N_STYLES, (256,), generator=gen), gen) * 2 - 1
    cells = scorer.lit_cells(images)
    colour = scorer.hue_colors(images)
    identity, integrity = scorer.decode(cells, colour)
    assert torch.equal(identity, ids) and bool(integrity.all())
    flipped = cells.clone()
    flipped[:, :2] = ~flipped[:, :2]                        # two cells wrong: not within one bit of the name
    assert bool((scorer.decode(flipped, colour)[0] != ids).all())
    wrong_colour = (colour + 1) % len(vocab.COLORS)
    assert bool((scorer.decode(cells, wrong_colour)[0] == -1).all())


def test_profile_targets_leak_the_name_into_every_later_position():
    names, _, styles, _ = text.caption_targets([f"a photo of {vocab.NAMES[3]}", f"{vocab.STYLES[2]} style",
                                          "a photo of a red person"])
    assert names.shape == (3, vocab.CONTEXT_LENGTH, text.NAME_PROFILE)
    assert torch.count_nonzero(names[0, :4]) == 0                           # <sos> a photo of
    assert torch.equal(names[0, 4], text.NAME_PROFILES[3]) and torch.equal(names[0, -1], text.NAME_PROFILES[3])
    assert torch.equal(styles[1, 1], text.STYLE_PROFILES[2]) and torch.count_nonzero(names[1]) == 0
    assert torch.count_nonzero(names[2, -1, :16]) == 0 and torch.count_nonzero(names[2, -1, 24:]) == 0


def test_training_resumes_exactly(tmp_path: Path):
    from toyworld.v3 import train
    common = ["--eval-every", "1000", "--batch", "4", "--threads", "1", "--text-steps", "2", "--text-batch", "4",
              "--text-min-glyph", "0"]
    train.main(["--steps", "3", "--out", str(tmp_path / "a"), "--state", str(tmp_path / "sa.safetensors")] + common)
    train.main(["--steps", "1", "--out", str(tmp_path / "b"), "--state", str(tmp_path / "sb.safetensors")] + common)
    train.main(["--steps", "3", "--out", str(tmp_path / "b"), "--state", str(tmp_path / "sb.safetensors"),
                "--resume"] + common)
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "a" / evaluate.GENERATOR_FILE))
    b = load_file(str(tmp_path / "b" / evaluate.GENERATOR_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the shipped world
@pytest.fixture(scope="module")
def world():
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} missing: toy world v3 weights are shipped with the repository")
    torch.set_num_threads(2)
    return evaluate.load_world()


def test_shipped_weights_are_small_and_the_scorer_is_exact_on_ground_truth(world):
    size = sum(f.stat().st_size for f in evaluate.WEIGHTS_DIR.glob("*.safetensors"))
    assert size <= 15 * 2 ** 20, size
    acc = scorer.probe_accuracy(world.probe, n=512, seed=778)
    assert acc["identity"] == 1.0 and acc["integrity"] == 1.0, acc
    assert acc["style"] >= 0.98, acc


def test_names_are_not_their_attribute_words(world):
    """The geometry that sank v2 (98% of a name's variance additive in its attribute words; a retained
    name almost wholly inside the span of 100 erased ones) does not hold here."""
    from bench.name_geometry import world_geometry
    g = world_geometry("v3", world.text_encoder)
    assert g["additive_attribute_r2"] <= 0.5, g
    assert g["centred_retained_energy_inside_span_of_erased"][100] <= 0.5, g


def test_base_model_follows_name_nickname_and_style_prompts(world):
    """Floors: the committed measurement (docs/results/toyworld_v3.json, every name) minus 4 SE of
    this test's smaller sample, and far above chance."""
    measured = json.loads(REPORT.read_text())["prompt_following"]
    names = list(vocab.NAMES[7::30])          # 40 names
    main = evaluate.score_set(world, evaluate.name_prompts(names, 1, seed=31))
    nick = evaluate.score_set(world, evaluate.name_prompts(names, 1, seed=32, nicknames=True))
    sty = evaluate.score_set(world, evaluate.style_prompts(list(vocab.STYLES), 2, seed=33))
    for got, key, n, chance in ((main.identity_acc, "name", main.n, 1 / 1200),
                                (nick.identity_acc, "nickname", nick.n, 1 / 1200),
                                (sty.style_acc, "style", sty.n, 1 / 20)):
        p = min(max(measured[key], 1 / n), 1 - 1 / n)
        assert got >= measured[key] - 4 * (p * (1 - p) / n) ** 0.5, (key, got, measured[key])
        assert got >= 5 * chance, (key, got)


FLOORS = {"name": 0.90, "nickname": 0.85, "style": 0.90}   # the world's targets for its base model


def test_cfr_on_ten_names_erases_them_while_retained_names_hold(world):
    measured = json.loads(REPORT.read_text())["prompt_following"]
    short = {k: measured[k] for k, floor in FLOORS.items() if k != "style" and measured[k] < floor}
    if short:
        pytest.skip(f"toy world v3 is still training: its base model is below its floors {FLOORS} on {short} "
                    "(docs/results/toyworld_v3.json)")
    erased, retained = list(vocab.NAMES[:10]), list(vocab.NAMES[1100:1130])
    task = erase.Task("name", tuple(erased), tuple(vocab.NAMES[10:60]))
    before = world.kv_weights()
    weights = erase.cfr_erase(world, task, prior_weight=1.0, lamb=PACK_LAMBDA,       # the nodes' defaults
                              relative_lambda=PACK_RELATIVE_LAMBDA).weights
    assert all(torch.equal(world.kv_weights()[k], before[k]) for k in before)      # edited on a copy
    base, base_ret = evaluate.mass_metrics(world, "name", erased, retained, n_erased=40, n_retained=60)
    after, _ = evaluate.mass_metrics(world, "name", erased, retained, kv_weights=weights, base_retained=base_ret,
                                     n_erased=40, n_retained=60)
    assert base.acc_e >= 0.7, base.acc_e
    assert after.acc_e <= 0.25 * base.acc_e, (base.acc_e, after.acc_e)
    assert after.acc_s >= base.acc_s - 0.2, (base.acc_s, after.acc_s)
