"""Segmented prompts (SD3: CLIP's window, then T5's): alignment and CFR pairs per window."""
import pytest
import torch

from mace_ops.alignment import align, align_encoded
from mace_ops.interfaces import EncodedPrompt


def _prompt(windows):
    """windows: [(ids, length)] -> one segmented EncodedPrompt with random features."""
    ids = [i for w, _ in windows for i in w]
    return EncodedPrompt(tuple(ids), windows[0][1], torch.randn(len(ids), 3),
                         tuple((len(w), n) for w, n in windows))


def test_each_window_is_aligned_on_its_own_and_offset():
    clip_old, clip_new = ([0, 5, 9, 1, 1, 1], 4), ([0, 5, 7, 1, 1, 1], 4)   # start, "a", concept/anchor, end, pads
    t5_old, t5_new = ([5, 9, 9, 1, 0, 0], 4), ([5, 7, 1, 0, 0, 0], 3)
    a = align_encoded(_prompt([clip_old, t5_old]), _prompt([clip_new, t5_new]))
    first = align(clip_old[0], 4, clip_new[0], 4)
    second = align(t5_old[0], 4, t5_new[0], 3)
    assert a.old == first.old + tuple(6 + i for i in second.old)
    assert a.new == first.new + tuple(6 + i for i in second.new)


def test_unsegmented_prompts_align_as_before():
    o = EncodedPrompt((0, 5, 9, 1, 1), 4, torch.zeros(5, 2))
    n = EncodedPrompt((0, 5, 7, 1, 1), 4, torch.zeros(5, 2))
    assert align_encoded(o, n) == align(o.ids, 4, n.ids, 4)


def test_windows_must_match_and_cover_the_prompt():
    with pytest.raises(ValueError, match="windows differ"):
        align_encoded(_prompt([([0, 5, 1, 1], 3), ([5, 1], 2)]), _prompt([([0, 5, 1], 3), ([5, 1, 0], 2)]))
    with pytest.raises(ValueError, match="segments"):
        EncodedPrompt((0, 5, 1, 1), 3, torch.zeros(4, 2), ((3, 3),))


def test_an_empty_prompt_without_start_token_has_length_one():
    """T5 (FLUX, SD3) has no start token: '' is its end token alone, then padding."""
    e = EncodedPrompt((1, 0, 0), 1, torch.zeros(3, 2))
    assert align_encoded(e, e) == align((1, 0, 0), 1, (1, 0, 0), 1)
