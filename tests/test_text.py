"""Issue 11, class 6: one normalisation for every phrase, escapes, erase/preserve overlap, clear messages."""
import pytest

from fakes import FakeTextEncoder, fake_kv_weights
from mace_ops.cfr import refine_cross_attention
from mace_ops.concepts import check_disjoint, normalise_phrase, parse_concepts
from mace_ops.templates import OBJECT_TEMPLATES


def test_one_normalisation_for_phrases_and_anchors():
    (c,) = parse_concepts("  Van-Gogh,  VINCENT_van   gogh -> Modern-Art ")
    assert c.phrases == ("van gogh", "vincent van gogh") and c.anchor == "modern art"
    assert normalise_phrase(" Modern-Art ") == c.anchor  # the anchor input uses the same function


def test_syntax_characters_can_be_escaped():
    (a, b) = parse_concepts("AC\\-DC, R\\#B  # a comment\nx\\,y -> a\\-b")
    assert a.phrases == ("ac-dc", "r#b") and b.phrases == ("x,y",) and b.anchor == "a-b"


def test_phrase_in_erase_and_preserve_lists_is_an_error():
    erase = parse_concepts("ship, boat\ncar")
    with pytest.raises(ValueError, match=r"preserve, line 2: 'boat' is also erased \(concepts, line 1\)"):
        check_disjoint(erase, parse_concepts("dog\nBoat", "preserve", False))
    check_disjoint(erase, parse_concepts("dog", "preserve", False))


def test_over_long_anchor_names_the_input_and_the_fix():
    enc = FakeTextEncoder()
    with pytest.raises(ValueError, match="anchor .*shorten the anchor"):
        refine_cross_attention(enc, fake_kv_weights(), parse_concepts("ship"), OBJECT_TEMPLATES,
                               " ".join(["ship"] * 30))


def test_width_mismatch_names_the_clip_input():
    enc = FakeTextEncoder(dim=16)
    with pytest.raises(ValueError, match="model/clip mismatch.*connect the CLIP"):
        refine_cross_attention(enc, fake_kv_weights(dim=32), parse_concepts("ship"), OBJECT_TEMPLATES, "ground")
