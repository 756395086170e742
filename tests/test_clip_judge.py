"""The CLIP zero-shot judge without ComfyUI (``mace_ops.clip_judge``): fake encoders whose right
answers are known, the batching and progress contract, the width check, and the erasure check's
table with a second judge."""
from __future__ import annotations

import pytest
import torch

from mace_ops.clip_judge import ALIGNED_BELOW, agreement, clip_classify, zero_shot
from mace_ops.concepts import parse_concepts
from mace_ops.erasure_check import check_prompts, check_rows, judge_table, report

WORDS = ["", "ship", "dog", "cat"]          # anchor first, as the erasure check orders candidates
TEMPLATES = ["a photo of {}", "a painting of {}"]


def _world(width=16, seed=0):
    """A text encoder that puts each word on its own axis (+ a shared template axis) and images
    that show a known word: image i is word ``shown[i]``'s direction plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.linalg.qr(torch.randn(width, width, generator=g))[0].T   # orthonormal rows

    def encode_texts(texts):
        out = []
        for t in texts:
            word = t.split(" of ", 1)[1] if " of " in t else ""
            out.append(axes[WORDS.index(word)] + 0.3 * axes[-1] * (1 if t.startswith("a photo") else -1))
        return torch.stack(out)
    return axes, encode_texts


def test_fake_encoders_give_the_known_answers():
    axes, encode_texts = _world()
    templates = [TEMPLATES[i % 2] for i in range(6)]
    labels_text = ["ship", "ship", "dog", "dog", "cat", "cat"]
    shown = ["ship", "", "dog", "cat", "cat", "ship"]          # images 1, 3, 5 drifted
    unique, table, labels = judge_table(templates, labels_text, WORDS)
    g = torch.Generator().manual_seed(1)
    images = torch.stack([axes[WORDS.index(w)] + 0.05 * torch.randn(16, generator=g) for w in shown])
    calls, seen = [], []

    def encode_images(idx):
        calls.append(list(idx))
        return images[list(idx)]

    j = clip_classify(6, encode_images, encode_texts, unique, table, labels, batch=4,
                      progress=lambda d, t: seen.append((d, t)))
    assert [WORDS[int(w)] for w in j.winner] == shown
    assert j.recognised.tolist() == [True, False, True, False, True, False]
    assert torch.equal(j.recognised, j.margin > 0)
    assert calls == [[0, 1, 2, 3], [4, 5]]                   # a batch at a time, in order
    assert seen == [(1, 7), (5, 7), (7, 7)]                  # texts, then each image batch
    assert ((j.cosine >= -1 - 1e-9) & (j.cosine <= 1 + 1e-9)).all()
    assert float(j.best_cosine.mean()) > ALIGNED_BELOW       # matched "towers" score high
    half = j.select(slice(0, 3))
    assert half.winner.tolist() == j.winner[:3].tolist() and half.cosine.shape == (3, 4)


def test_agreement_and_table_with_a_second_judge():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, False, True])
    assert agreement(a, b) == 0.5 and agreement(a[:0], b[:0]) is None
    with pytest.raises(ValueError, match="agreement"):
        agreement(a, b[:3])
    erased, kept = parse_concepts("ship"), parse_concepts("dog")
    prompts = check_prompts(erased, [], kept, TEMPLATES, 2)
    diff = check_rows("object", 1, prompts, {"none": torch.tensor([1, 1, 1, 1]).bool(),
                                             "erased": torch.tensor([0, 0, 1, 1]).bool()}, judge="diffusion")
    clip = check_rows("object", 1, prompts, {"none": torch.tensor([1, 0, 1, 1]).bool(),
                                             "erased": torch.tensor([0, 0, 1, 0]).bool()}, judge="clip")
    assert [r["judge"] for r in diff + clip] == ["diffusion"] * 2 + ["clip"] * 2
    assert clip[0]["acc_e"] == 0.5 and clip[1]["acc_s"] == 0.5
    text = report(diff, {"before": 0.0, "after": 0.0}, {"judging": 1.0},
                  second={"title": "CLIP judge", "rows": clip, "notes": ["judges agree: 75%"]})
    lines = text.splitlines()
    assert lines[0].startswith("MACE erasure check") and "CLIP judge" in lines
    clip_at = lines.index("CLIP judge")
    assert lines[clip_at + 2].startswith("Acc_e") and "0.500 ± 0.354 (n=2)" in lines[clip_at + 2]
    assert "judges agree: 75%" in text and lines[-1].startswith("seconds per image")
    assert report(diff, {}, {}).count("Acc_e") == 1            # no second judge: the table as before


def test_contract_errors_name_the_field():
    _, encode_texts = _world()
    unique, table, labels = judge_table(["a photo of {}"], ["ship"], WORDS)
    with pytest.raises(ValueError, match=r"clip_vision: the image embeddings are 8 wide and the text embeddings 16"):
        clip_classify(1, lambda idx: torch.zeros(len(idx), 8), encode_texts, unique, table, labels)
    with pytest.raises(ValueError, match=r"clip_vision: the image encoder gave \(2, 16\) for 1 images"):
        clip_classify(1, lambda idx: torch.zeros(2, 16), encode_texts, unique, table, labels)
    with pytest.raises(ValueError, match="labels must be candidate positions"):
        zero_shot(torch.ones(1, 16), encode_texts(unique), table, labels + 9)
    with pytest.raises(ValueError, match="not finite"):
        zero_shot(torch.full((1, 16), float("nan")), encode_texts(unique), table, labels)
    empty = clip_classify(0, lambda idx: torch.zeros(len(idx), 16), encode_texts, unique, table[:0], labels[:0])
    assert empty.winner.shape == (0,) and empty.cosine.shape == (0, 4)
