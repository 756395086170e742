"""Issue 34's leftovers, each with its test (no ComfyUI needed): '#' comments only at the line's
start or after whitespace, invisible-only lines refused, a LoRA's plain-string concept, the
max_concepts guard and the work estimate."""
from __future__ import annotations

import logging

import pytest
import torch

from mace_ops.concepts import parse_concepts, require_concepts
from mace_ops.lora import KVLora
from mace_ops.lora_file import load_concept_lora, save_concept_lora
from mace_ops.work import MAX_CONCEPTS_ENV, WorkEstimate, announce, check_concept_count, encodes_for, max_concepts


def names(text, **kw):
    return [c.phrases for c in parse_concepts(text, **kw)]


def test_hash_starts_a_comment_only_at_the_start_or_after_whitespace():
    assert names("c# programming\nf#, c#  # two languages\n# a whole comment\n  #indented comment") == [
        ("c# programming",), ("f#", "c#")]
    assert names("ship\t# tab before the hash") == [("ship",)]
    assert names(r"r\#b # escaped hash kept") == [("r#b",)]


@pytest.mark.parametrize("line", ["\u200b", "\u200b\u2060\ufeff", " \u200b ", "ship, \u200b"])
def test_lines_of_only_invisible_characters_are_refused(line):
    with pytest.raises(ValueError, match="^concepts, line 1: (only invisible characters|empty phrase)"):
        parse_concepts(line)


def test_lora_concept_as_plain_string_is_one_phrase(tmp_path):
    w = {"blk.attn2.to_k.weight": torch.randn(4, 4)}
    info = {"concept": "Van-Gogh", "steps": 1, "lr": 0.1, "seed": 0, "settings": {}}
    path = str(tmp_path / "plain.safetensors")
    save_concept_lora(path, KVLora.for_weights(w, seed=0), "fp", info)  # mace.concept = "Van-Gogh", not JSON
    assert load_concept_lora(path).phrases("plain.safetensors") == ("van gogh",)
    for bad in ({"x": 1}, [], ["\u200b"], 7):
        save_concept_lora(path, KVLora.for_weights(w, seed=0), "fp", {**info, "concept": bad})
        with pytest.raises(ValueError, match="^plain.safetensors: records no concept"):
            load_concept_lora(path).phrases("plain.safetensors")


def test_max_concepts_guard(monkeypatch):
    monkeypatch.delenv(MAX_CONCEPTS_ENV, raising=False)
    assert max_concepts() == 1000
    text = "\n".join(f"concept {i}" for i in range(1001))
    with pytest.raises(ValueError, match=r"^concepts: 1,001 concepts in one request; this server takes at most 1,000 "
                                         r"\(max_concepts.*MACE_MAX_CONCEPTS"):
        require_concepts(parse_concepts(text))
    monkeypatch.setenv(MAX_CONCEPTS_ENV, "2000")
    assert len(require_concepts(parse_concepts(text))) == 1001
    monkeypatch.setenv(MAX_CONCEPTS_ENV, "3")
    with pytest.raises(ValueError, match="^f: 4 concepts"):
        check_concept_count(4, "f")
    for junk in ("zero", "0", "-5"):
        monkeypatch.setenv(MAX_CONCEPTS_ENV, junk)
        assert max_concepts() == 1000


def test_work_estimate_counts_and_is_logged(caplog):
    concepts = parse_concepts("van gogh, vincent van gogh\nmonet -> painting")
    assert encodes_for(concepts, 10, 7, "art") == (3 + 2) * 10 + 7  # 3 phrases, 2 anchors (art, painting)
    est = WorkEstimate(2, 57, solves=2, images=16, denoise_steps=320, train_steps=1000)
    with caplog.at_level(logging.INFO):
        announce("MACE Mass Erase", est)
    assert ("MACE Mass Erase: work estimate: 2 concept(s) -> 57 prompt encodes, 2 closed-form solve(s), "
            "16 images (320 sampler steps), 1,000 LoRA training steps") in caplog.text
