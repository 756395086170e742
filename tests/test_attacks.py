"""Attacks (mace_ops.attacks), adversarial pairs, ACE's gated erasure, and the toy world v2 check that
the soft-prompt attack really recovers a concept and that the robust erasure blocks it."""
from __future__ import annotations

import pytest
import torch

from mace_ops.ace import ACEConfig, GatedErasure
from mace_ops.attacks import (SoftPrompt, SoftPromptConfig, adversarial_rounds, paraphrase_attack, paraphrase_candidates,
                              soft_prompt_attack)
from mace_ops.interfaces import SOFT_TOKEN_ID


def test_paraphrase_candidates_and_selection():
    cands = paraphrase_candidates(["zib", "zab"], ["a photo of {}", "{} posing", "a photo of {}"])
    assert cands == ["a photo of zib", "zib posing", "a photo of zab", "zab posing"]
    picked = paraphrase_attack(cands, lambda ps: torch.tensor([0.0, 1.0, 0.5, 1.0]), keep=2)
    assert picked == ["zib posing", "zab posing"]
    with pytest.raises(ValueError, match="scores"):
        paraphrase_attack(cands, lambda ps: torch.ones(3), keep=1)


def test_soft_prompt_attack_needs_embedding_encoder():
    class Plain:
        end_id = 0

        def tokenize(self, text):
            return [1]

        def encode(self, prompts):
            return []

    with pytest.raises(ValueError, match="continuous embeddings"):
        soft_prompt_attack(Plain(), None, torch.zeros(1, 3, 4, 4), ["a {}"], "x", SoftPromptConfig(steps=1))


def _toy_gate(threshold: float) -> GatedErasure:
    d = 4
    U = torch.eye(d)[:, :1].unsqueeze(0)                     # the concept's direction: axis 0
    protos = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), dim=-1)
    return GatedErasure(protos, torch.zeros(1, dtype=torch.long), torch.tensor([threshold]), U,
                        torch.tensor([[0.25]]), temperature=0.01)


def test_gated_erasure_acts_only_after_the_concept_and_round_trips():
    ctx = torch.tensor([[[0.0, 1.0, 0.0, 0.0],      # unrelated
                         [1.0, 0.0, 0.0, 1.0],      # the concept token
                         [2.0, 1.0, 0.0, 0.0]]])    # a later position (causal: carries it)
    g = _toy_gate(0.9)
    out = g(ctx)
    assert torch.allclose(out[0, 0], ctx[0, 0])              # before the concept: untouched
    assert torch.allclose(out[0, 1:, 0], torch.tensor([0.25, 0.25]), atol=1e-4)  # axis 0 nulled to the target
    assert torch.allclose(out[0, 1:, 1:], ctx[0, 1:, 1:])    # other directions kept
    closed = _toy_gate(1.5)(ctx)                             # a gate that never opens changes nothing
    assert torch.allclose(closed, ctx)
    again = GatedErasure.from_state_dict(g.state_dict(), g.temperature)
    assert torch.allclose(again(ctx), out)
    delta = g.linear_part({"w": torch.eye(4)})["w"]
    assert torch.allclose(delta, -torch.diag(torch.tensor([1.0, 0, 0, 0])))
    with pytest.raises(ValueError, match="missing"):
        GatedErasure.from_state_dict({"owner": torch.zeros(1)}, 0.1)


# ----------------------------------------------------------------------------- toy world v2
@pytest.fixture(scope="module")
def world():
    from toyworld.v2 import evaluate
    return evaluate.load_world()


def test_encode_embeddings_matches_the_words(world):
    enc = world.text_encoder
    word = enc.word_embeddings("someone")
    soft = enc.encode_embeddings(["a photo of {}"], word)[0]
    plain = enc.encode(["a photo of someone"])[0]
    assert soft.ids[4] == SOFT_TOKEN_ID and soft.length == plain.length
    assert torch.allclose(soft.features, plain.features, atol=1e-5)


def test_soft_prompt_attack_recovers_a_blanked_name_and_ace_blocks_it(world):
    """The name's word is replaced by two embeddings started at the anchor ("someone"): before the
    attack the prompts draw the name almost never; after the attack on the unedited model they draw
    it; against the ACE-style gate the same attack succeeds clearly less often. (With the gate's
    threshold calibrated per prompt, this name's attack still gets 0.58 of 12 images through, against
    0.92 unedited; bench.attack measures the gate's ASR over attacks, README "How robust is it".)"""
    from toyworld.v2 import erase, robust, vocab
    torch.manual_seed(0)
    name = vocab.NAMES[3]
    none = robust.Edit()
    start = world.text_encoder.word_embeddings(vocab.NEUTRAL_NAME)[[0, 0]]
    before = float(robust.soft_asr(world, none, name, start, per_template=1).mean())
    images = robust.attacker_images(world, name)
    found = robust.soft_attack(world, none, name, images=images).embeddings
    after = float(robust.soft_asr(world, none, name, found, per_template=1).mean())
    assert before <= 0.1 and after >= 0.7, (before, after)

    task = erase.Task("name", (name,), tuple(vocab.NAMES[100:150]))
    ace = erase.ace_erase(world, task, config=ACEConfig())
    edit = robust.Edit(None, ace)
    clean = float(robust.identity_hits(world, robust.sample_prompts(world, [f"a photo of {vocab.NAMES[160]}"] * 4,
                                                                   edit, seed=3), vocab.NAME_INDEX[vocab.NAMES[160]]).mean())
    assert clean >= 0.75                                     # a retained name still draws
    attacked = robust.soft_attack(world, edit, name, images=images).embeddings
    blocked = float(robust.soft_asr(world, edit, name, attacked, per_template=1).mean())
    assert blocked <= after - 0.25, (after, blocked)


def test_gate_threshold_is_a_prompt_quantile_and_skips_prompts_that_name_the_concept(world):
    """tau_i is the quantile of the calibration prompts' peak similarity (max over positions), not of
    every position's (which template words and pads dominate); a calibration prompt that names the concept is
    not an ordinary prompt and leaves tau as it was; only such prompts: a clear error."""
    from mace_ops.ace import fit_gated_erasure, prompt_peaks
    from mace_ops.concepts import parse_concepts
    from toyworld.v2 import erase, vocab
    name, enc = vocab.NAMES[5], world.text_encoder
    concepts, tpls = parse_concepts(name), erase.erase_templates("name")
    calib = [t.replace("{}", w) for w in vocab.NAMES[100:110] for t in tpls]
    half = fit_gated_erasure(enc, concepts, tpls, vocab.NEUTRAL_NAME, calib, ACEConfig(quantile=0.5))
    peaks = prompt_peaks(half, enc.encode(calib))                             # (P, 1)
    per_position = half.similarity(torch.cat([e.features for e in enc.encode(calib)]))
    assert float(half.thresholds[0]) == pytest.approx(float(torch.quantile(peaks[:, 0], 0.5)), abs=1e-6)
    assert float(half.thresholds[0]) > float(torch.quantile(per_position[:, 0], 0.5)) + 0.05
    base = fit_gated_erasure(enc, concepts, tpls, vocab.NEUTRAL_NAME, calib, ACEConfig())
    named = fit_gated_erasure(enc, concepts, tpls, vocab.NEUTRAL_NAME, calib + [f"a photo of {name}"] * 50,
                              ACEConfig())
    assert torch.equal(base.thresholds, named.thresholds)
    with pytest.raises(ValueError, match="calibration prompts: every one names"):
        fit_gated_erasure(enc, concepts, tpls, vocab.NEUTRAL_NAME, [f"this is {name}"], ACEConfig())


def test_adversarial_pairs_of_a_word_embedding_equal_that_word_as_a_concept(world):
    """A 'found' embedding that is exactly another name's word embedding must refit CFR as if that
    name had been listed (same aligned pairs, soft positions mapped like concept tokens)."""
    from mace_ops.adversarial import embedding_pairs
    from toyworld.v2 import erase, vocab
    a, b = vocab.NAMES[0], vocab.NAMES[1]
    preserve = tuple(vocab.NAMES[100:110])
    one = erase.Task("name", (a,), preserve)
    both = erase.Task("name", (a, b), preserve)
    extra = embedding_pairs(world.text_encoder, [world.text_encoder.word_embeddings(b)], one.templates, one.anchor)
    via_pairs = erase.cfr_erase(world, one, extra_pairs=extra).weights
    listed = erase.cfr_erase(world, both).weights
    plain = erase.cfr_erase(world, one).weights
    k = next(iter(listed))
    assert torch.allclose(via_pairs[k], listed[k], atol=1e-4)
    assert not torch.allclose(plain[k], listed[k], atol=1e-3)


def test_gated_erasure_file_round_trip(tmp_path):
    from mace_ops.ace import attn2_patch, load_gated_erasure, save_gated_erasure
    from safetensors import safe_open
    g = _toy_gate(0.9)
    path = str(tmp_path / "gate.safetensors")
    save_gated_erasure(path, g, "fp", {"concepts": ["zib"]}, fallback_deltas={"blk.attn2.to_k.weight": torch.eye(4)})
    back, meta = load_gated_erasure(path)
    ctx = torch.randn(2, 3, 4)
    assert torch.allclose(back(ctx), g(ctx)) and meta["mace.concepts"] == '["zib"]'
    with safe_open(path, framework="pt") as f:                 # what a stock LoRA loader sees
        assert "blk.attn2.to_k.diff" in f.keys()
    n, k, v = attn2_patch(back)("q", ctx, ctx, {})
    assert n == "q" and torch.allclose(k, g(ctx)) and torch.allclose(v, g(ctx))
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_gated_erasure(str(tmp_path / "bad.safetensors"))


def test_adversarial_rounds_attack_every_concept_against_the_current_edit():
    fits, attacks = [], []

    def fit(found):
        fits.append({i: len(v) for i, v in found.items()})
        return len(fits)  # the edit: its fit number

    def attack(edit, i, r):
        attacks.append((edit, i, r))
        return SoftPrompt(torch.full((2, 3), float(10 * r + i)))

    edit, found = adversarial_rounds(fit, attack, 2, 2)
    assert edit == 3 and fits == [{}, {0: 1, 1: 1}, {0: 2, 1: 2}]
    assert attacks == [(1, 0, 0), (1, 1, 0), (2, 0, 1), (2, 1, 1)]
    assert [float(v[0, 0]) for v in found[1]] == [1.0, 11.0]
    assert adversarial_rounds(fit, attack, 2, 0)[0] == 4
    with pytest.raises(ValueError, match="rounds"):
        adversarial_rounds(fit, attack, 2, -1)


# ----------------------------------------------------------------------------- styles under attack
def test_style_targets_lookalikes_and_paraphrases():
    """A style's look-alike is the nearest style left (same background pattern, nearest tone; never
    an erased one); its paraphrases are its word and synonym in every style template."""
    from toyworld.v2 import robust, vocab
    st = vocab.STYLES[0]
    t = robust.target(st)
    assert t.kind == "style" and t.head == "style" and t.anchor == vocab.NEUTRAL_STYLE
    assert robust.target(vocab.STYLE_SYNONYMS[st][0]) is t and robust.target(vocab.NAMES[0]).kind == "name"
    with pytest.raises(ValueError, match="neither a name nor a style"):
        robust.target("nonsenseword")
    for erased in ((st,), tuple(vocab.STYLES[:5])):
        for s in erased:
            look = robust.lookalike(s, exclude=erased)
            pt, tn = vocab.STYLE_LOOK[vocab.STYLE_INDEX[s]]
            pt2, tn2 = vocab.STYLE_LOOK[vocab.STYLE_INDEX[look]]
            assert look not in erased and pt2 == pt
            others = [vocab.STYLE_LOOK[j][1] for j, o in enumerate(vocab.STYLES)
                      if o not in erased and vocab.STYLE_LOOK[j][0] == pt]
            assert abs(tn2 - tn) == min(abs(o - tn) for o in others)
    cands = robust.paraphrase_prompts(st)
    assert len(cands) == 2 * len(vocab.STYLE_TEMPLATES)
    assert f"{vocab.STYLE_SYNONYMS[st][0]} style" in cands and f"{st} style" in cands
    assert robust.lookalike(vocab.NAMES[3], vocab.NAMES[:10]) not in vocab.NAMES[:10]   # names unchanged


def test_min_snr_weights_follow_the_schedule():
    from mace_ops.attacks import min_snr_weights
    from toyworld.v1 import diffusion
    from toyworld.v1.adapters import ToyDenoiser
    t = torch.tensor([0, 50, 300, 700, 999])
    ab = diffusion.ALPHA_BAR[t]
    snr = ab / (1 - ab)
    w = min_snr_weights(ToyDenoiser(None), torch.zeros(5, 3, 8, 8), t, 1.0)
    assert torch.allclose(w, snr.clamp(max=1.0) / snr, rtol=1e-2)   # fp32 at t = 0
    assert w[0] < 1e-3 and w[-1] == 1.0                       # low noise down-weighted, high noise kept


def test_style_soft_prompt_attack_recovers_a_blanked_style(world):
    """The style word is replaced by two embeddings started at the anchor ("art"): the anchor's own
    prompts draw the style about at chance; a 30-step attack on the unedited model draws it."""
    from dataclasses import replace

    from toyworld.v2 import robust, vocab
    st = vocab.STYLES[0]
    none = robust.Edit()
    start = world.text_encoder.word_embeddings(vocab.NEUTRAL_STYLE)[[0, 0]]
    before = float(robust.soft_asr(world, none, st, start, per_template=1).mean())
    found = robust.soft_attack(world, none, st, replace(robust.STYLE_ATTACK_CONFIG, steps=30)).embeddings
    after = float(robust.soft_asr(world, none, st, found, per_template=1).mean())
    assert before <= 0.2 and after >= 0.7, (before, after)


def test_ramp_gate_is_exactly_closed_below_its_threshold_and_old_files_keep_their_sigmoid(tmp_path):
    """The ramp gate (the default) leaves a prompt whose similarity stays below the threshold
    bit-identical and opens as tanh((s - tau) / T) above it; the first, centred gate (sigmoid) nudges
    that prompt. A gate file keeps its shape; one saved before the ramp (no ``mace.gate_shape``) loads
    as the sigmoid it was; an unknown shape is refused with the fix."""
    import dataclasses
    import math
    from safetensors import safe_open
    from safetensors.torch import save_file
    from mace_ops.ace import ACEConfig, load_gated_erasure, save_gated_erasure
    g = _toy_gate(0.9)                                         # prototype (1, 0, 0, 1) / sqrt 2, T 0.01
    assert g.shape == "ramp"

    def at(cos):                                               # a unit vector at this cosine to the prototype
        p = torch.tensor([1.0, 0.0, 0.0, 1.0]) / math.sqrt(2)
        o = torch.tensor([1.0, 0.0, 0.0, -1.0]) / math.sqrt(2)
        return cos * p + math.sqrt(1 - cos ** 2) * o
    below = torch.stack([at(0.5), at(0.85), at(0.899)])[None]
    assert torch.equal(g(below), below)                        # closed: not one bit changed
    sigmoid = dataclasses.replace(g, shape="sigmoid")
    assert (sigmoid(below) - below).abs().max() > 1e-4         # the centred gate leaks below tau
    above = at(0.91)[None, None]
    assert float(g.gates(above)) == pytest.approx(math.tanh(1.0), abs=1e-4)
    assert float(sigmoid.gates(above)) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=1e-4)

    path = str(tmp_path / "gate.safetensors")
    for gate in (g, sigmoid):
        save_gated_erasure(path, gate, "fp", {"concepts": ["zib"]})
        back, meta = load_gated_erasure(path)
        assert back.shape == gate.shape == meta["mace.gate_shape"]
    with safe_open(path, framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    old = str(tmp_path / "old.safetensors")
    save_file(tensors, old, {k: v for k, v in meta.items() if k != "mace.gate_shape"})
    assert load_gated_erasure(old)[0].shape == "sigmoid"
    save_file(tensors, old, {**meta, "mace.gate_shape": "cubic"})
    with pytest.raises(ValueError, match="old.safetensors: gate shape 'cubic'.*update comfyui-mace"):
        load_gated_erasure(old)
    with pytest.raises(ValueError, match="gate: 'cubic' is not a gate shape"):
        ACEConfig(gate="cubic").validate()


def test_refit_drops_found_prototypes_that_a_kept_name_already_has(world):
    """A soft prompt 'found' for an erased name that is exactly a preserve-list name's embedding is a
    kept concept: its prototypes are dropped and the kept name's prompts stay below every threshold.
    One that is the erased name's nickname is a way around the erasure and is kept."""
    from mace_ops.ace import prompt_peaks
    from toyworld.v2 import erase, vocab
    name, kept = vocab.NAMES[0], vocab.NAMES[120]
    task = erase.Task("name", (name,), tuple(vocab.NAMES[100:150]))
    enc = world.text_encoder
    kept_emb, nick_emb = enc.word_embeddings(kept), enc.word_embeddings(vocab.NICKNAMES[name][0])
    plain = erase.ace_erase(world, task)
    nick = erase.ace_erase(world, task, adversarial={0: [nick_emb]})
    both = erase.ace_erase(world, task, adversarial={0: [kept_emb, nick_emb]})
    assert nick.prototypes.shape[0] > plain.prototypes.shape[0]          # the nickname's rows stay
    assert both.prototypes.shape[0] == nick.prototypes.shape[0]          # the kept name's are all dropped
    assert torch.equal(both.thresholds, nick.thresholds)
    kept_prompts = enc.encode([t.format(n=kept) for t in vocab.NAME_TEMPLATES])
    assert bool((prompt_peaks(both, kept_prompts)[:, 0] <= both.thresholds[0]).all())


def test_shared_floor_is_a_conformal_quantile_over_groups():
    """The floor scores each labelled group by its largest peak over its prompts and every concept and
    takes the ceil((1 - alpha)(G + 1))-th smallest; unlabelled prompts do not count; with too few
    groups for alpha it is their maximum; alpha 1 or no labels: no floor."""
    from mace_ops.ace import shared_floor
    gen = torch.Generator().manual_seed(0)
    peaks = torch.rand(60, 3, generator=gen)                      # 60 prompts, 3 concepts
    labels = [p // 3 for p in range(60)]                          # 20 groups of 3 prompts
    scores = peaks.amax(1).reshape(20, 3).amax(1).sort().values
    assert shared_floor(peaks, labels, 0.1) == pytest.approx(float(scores[18]))   # ceil(0.9 * 21) = 19th
    assert shared_floor(peaks, labels, 0.5) == pytest.approx(float(scores[10]))   # ceil(0.5 * 21) = 11th
    assert shared_floor(peaks, labels, 0.01) == pytest.approx(float(scores[-1]))  # 20 groups: the maximum
    unlabelled = [None if p < 30 else p // 3 for p in range(60)]  # only the last 10 groups count
    assert shared_floor(peaks, unlabelled, 0.5) == pytest.approx(float(peaks[30:].amax(1).reshape(10, 3).amax(1)
                                                                        .sort().values[5]))
    assert shared_floor(peaks, labels, 1.0) == float("-inf")
    assert shared_floor(peaks, None, 0.05) == float("-inf")
    assert shared_floor(peaks, [None] * 60, 0.05) == float("-inf")


def test_shared_floor_keeps_unseen_names_closed_when_many_are_erased(world):
    """30 names erased: without the floor (open_rate 1) the per-concept quantiles let many of 20 unseen
    names open some gate; with the floor (the default) far fewer do, while the erased names' nicknames
    (never given to the fit) still open their own gate. A labels/prompts mismatch is a clear error."""
    from mace_ops.ace import fit_gated_erasure, prompt_peaks
    from toyworld.v2 import erase, vocab
    task = erase.Task("name", tuple(vocab.NAMES[:30]), tuple(vocab.NAMES[100:150]))
    enc, tpls = world.text_encoder, vocab.NAME_TEMPLATES
    unseen = enc.encode([t.format(n=w) for w in vocab.NAMES[150:170] for t in tpls])
    nicks = enc.encode([t.format(n=vocab.NICKNAMES[n][0]) for n in task.erase for t in tpls])
    own = torch.arange(30).repeat_interleave(len(tpls))
    rates = {}
    for alpha in (1.0, 0.05):
        gate = erase.ace_erase(world, task, config=ACEConfig(open_rate=alpha))
        ret = (prompt_peaks(gate, unseen) > gate.thresholds).any(1).float().mean()
        nick = (prompt_peaks(gate, nicks)[torch.arange(len(own)), own] > gate.thresholds[own]).float().mean()
        rates[alpha] = (float(ret), float(nick))
    assert rates[0.05][0] <= rates[1.0][0] / 2 and rates[1.0][0] >= 0.1, rates
    assert rates[0.05][1] >= 0.9, rates
    prompts, groups = task.preserve_groups()
    with pytest.raises(ValueError, match="calibration_groups: 3 labels"):
        fit_gated_erasure(enc, task.concepts(), task.templates, task.anchor, prompts, ACEConfig(), None, groups[:3])


def test_soft_attack_runs_aim_at_the_image_worlds_pictures(monkeypatch):
    """An attack on a text-encoder edit runs through the edited world but aims at what the concept
    looked like in the original one (``image_world``): otherwise the target images would already
    be erased. Without ``image_world`` each attack draws its own from the world it runs in."""
    from toyworld.v2 import robust

    drawn, seen = [], []
    monkeypatch.setattr(robust, "attacker_images", lambda w, c: drawn.append((w, c)) or f"images of {c} by {w}")
    monkeypatch.setattr(robust, "soft_attack", lambda w, edit, c, cfg, images=None, init_word=None:
                        seen.append((w, images, cfg.seed)) or "found")
    cfg = robust.TARGETS["name"].attack
    out = robust.soft_attack_runs("edited", robust.Edit(), ["n0", "n1"], 3, ["someone"], 900, cfg, image_world="original")
    assert out == [("n0", "found"), ("n1", "found"), ("n0", "found")]
    assert drawn == [("original", "n0"), ("original", "n1"), ("original", "n0")]
    assert seen == [("edited", "images of n0 by original", 900), ("edited", "images of n1 by original", 901),
                    ("edited", "images of n0 by original", 902)]
    seen.clear()
    robust.soft_attack_runs("edited", robust.Edit(), ["n0"], 1, ["someone"], 900, cfg)
    assert seen == [("edited", None, 900)]


# ----------------------------------------------------------------------------- toy world v3
def test_v3_lookalike_is_the_nearest_glyph_of_the_same_colour():
    """In v3 a name's look-alike is the nearest name not erased of the same colour by glyph Hamming
    distance, ties by index; its target, words and paraphrases are v3's; v2's rule is untouched."""
    from toyworld.v2 import robust
    from toyworld.v2 import vocab as v2
    from toyworld.v3 import vocab as v3
    erased = tuple(v3.NAMES[:10])

    def gap(i, j):
        return sum(a != b for a, b in zip(v3.code_bits(i), v3.code_bits(j)))
    for n in erased:
        look = robust.lookalike(n, exclude=erased, world_vocab=v3)
        i, j = v3.NAME_INDEX[n], v3.NAME_INDEX[look]
        same = [k for k in range(v3.N_NAMES) if k != i and v3.COLOR_OF[k] == v3.COLOR_OF[i]
                and v3.NAMES[k] not in erased]
        assert look not in erased and v3.COLOR_OF[j] == v3.COLOR_OF[i]
        assert (gap(i, j), j) == min((gap(i, k), k) for k in same)
    t = robust.target(v3.NAMES[0], v3)
    main = v3.NAMES[0]
    assert t.index is v3.NAME_INDEX and t.words(v3.NICKNAMES[main][0]) == (main,) + v3.NICKNAMES[main]
    assert robust.targets(v3)["style"].seed_offset == v3.N_NAMES and robust.targets(v2) is robust.TARGETS
    assert f"a photo of {v3.NICKNAMES[v3.NAMES[0]][0]}" in robust.paraphrase_prompts(v3.NAMES[0], world_vocab=v3)
    with pytest.raises(ValueError, match="toy world v2"):
        robust.target(v3.NAMES[0])                          # a v3 name is no word of v2


def test_bench_attack_runs_in_v3(tmp_path, monkeypatch):
    """``bench.attack --world v3``: one soft attack (3 steps) on CFR + prior at 1 name; the split is
    bench.two_worlds' (seed 0), the CFR ridge reaches the method and is recorded, the row's fields
    are in range. The retained set is cut to 4 names here for speed (clean H only)."""
    import json

    import bench.attack as attack
    from toyworld.v2 import erase
    from toyworld.v3 import vocab as v3

    splits, lambdas = [], []
    real_split, real_cfr = attack.Setup.split, erase.cfr_erase

    def split(self, count):
        e, p, r = real_split(self, count)
        splits.append((e, p, r))
        return e, p, r[:4]

    def cfr(*a, **kw):
        lambdas.append(kw.get("lamb"))
        return real_cfr(*a, **kw)
    monkeypatch.setattr(attack.Setup, "split", split)
    monkeypatch.setattr(erase, "cfr_erase", cfr)
    out = tmp_path / "attack_v3.json"
    attack.main(["--world", "v3", "--methods", "cfr_prior", "--counts", "1", "--runs", "1", "--steps", "3",
                 "--attacks", "soft", "--para-names", "0", "--n-clean", "2", "--cfr-lambda", "0.2",
                 "--out", str(out)])
    (e, p, r), = splits
    assert e == (v3.NAMES[0],) and p == tuple(v3.NAMES[1:101]) and r == tuple(v3.NAMES[1000:1200])
    assert lambdas == [0.2]
    res = json.loads(out.read_text())
    assert res["settings"]["world"] == "v3" and res["settings"]["cfr_lambda"] == 0.2
    row, = res["rows"]
    assert {k: row[k] for k in ("method", "world", "kind", "attack", "concepts", "cfr_lambda", "n_attacks")} == {
        "method": "cfr_prior", "world": "v3", "kind": "name", "attack": "soft", "concepts": 1, "cfr_lambda": 0.2,
        "n_attacks": 1}
    assert row["attack_names"] == [v3.NAMES[0]] and row["init_words"] == [v3.NEUTRAL_NAME]
    assert row["n"] == 2 * len(v3.NAME_TEMPLATES) and len(row["per_attack"]) == 1
    assert 0.0 <= row["asr"] <= 1.0 and abs(row["asr"] - row["per_attack"][0]) <= 1e-3
    for k in ("H", "acc_e", "acc_g", "acc_s"):
        assert 0.0 <= row[k] <= 1.0, (k, row[k])
