"""Erasure quality in the shipped toy world (CPU, fixed seeds, DDIM 10 steps, CFG 7).

Gates are floors/ceilings from measured numbers with a margin. Measured on the shipped weights
(n=32 prompts per word, binomial SE <= 0.09): base colour accuracy 0.96 (main) / 0.97 (synonyms);
CFR on "red" (defaults): efficacy 0.06, generality crimson 0.13 / scarlet 0.69, specificity 1.00;
with light preservation (0.1) generality over both synonyms is 0.55 for "red" and 0.28 for
"red, crimson"; MACE's co-existing-token-only CFR leaves "red" at 1.00.
"""
import pytest
import torch

from toyworld.v1.erase import cfr_erase

SYNONYMS = ["crimson", "scarlet"]


@pytest.fixture(scope="module")
def world():
    from toyworld.v1.checkpoint import GENERATOR_FILE, WEIGHTS_DIR
    from toyworld.v1.evaluate import load_toyworld

    if not (WEIGHTS_DIR / GENERATOR_FILE).is_file():
        pytest.fail(f"shipped toy-world weights missing: {WEIGHTS_DIR / GENERATOR_FILE}")
    return load_toyworld()


def metrics(world, weights):
    from toyworld.v1.evaluate import mace_metrics

    return mace_metrics(world, ["red"], kv_weights=weights, synonyms=SYNONYMS, n_erased=32, n_synonym=32,
                        n_other=4)


def test_base_model_follows_prompts(world):
    from toyworld.v1.evaluate import prompt_following

    pf = prompt_following(world, per_color=8)
    assert pf["color_main"] >= 0.9 and pf["color_syn"] >= 0.9, pf
    assert pf["style_main"] >= 0.9 and pf["shape_main"] >= 0.9, pf


def test_cfr_erases_red_and_keeps_other_colours(world):
    base = metrics(world, None)
    assert base.efficacy >= 0.9 and base.generality >= 0.85
    red = metrics(world, cfr_erase(world, "red").weights)
    assert red.efficacy <= 0.3, red  # chance is 1/8; the anchor "any" is a random colour
    assert red.specificity >= 0.85 and red.specificity >= base.specificity - 0.1, red
    assert red.H >= 0.55, red
    assert red.style_erased >= base.style_erased - 0.15 and red.shape_erased >= base.shape_erased - 0.15, red


def test_listing_a_synonym_lowers_generality(world):
    only = metrics(world, cfr_erase(world, "red", preserve_scale=0.1).weights)
    both = metrics(world, cfr_erase(world, "red, crimson", preserve_scale=0.1).weights)
    assert both.generality <= only.generality - 0.15, (both.generality, only.generality)
    assert both.efficacy <= 0.3 and both.specificity >= 0.85, both


def test_co_existing_tokens_alone_leave_the_concept(world):
    """MACE's CFR maps only the words around the concept; the concept token needs the LoRA stage."""
    only_context = metrics(world, cfr_erase(world, "red", concept_tokens=False).weights)
    assert only_context.efficacy >= 0.7, only_context
