"""The per-run encoding memo: same results bit for bit, each distinct prompt encoded once while
recent, bounded, and the pipeline encodes far fewer prompts with it."""
import torch

from fakes import FakeTextEncoder
from mace_ops.cfr import refine_cross_attention
from mace_ops.concepts import Concept
from mace_ops.encoding_cache import CachedTextEncoder, cached
from mace_ops.templates import OBJECT_TEMPLATES


class Counting(FakeTextEncoder):
    def __init__(self):
        super().__init__()
        self.encoded = 0

    def encode(self, prompts):
        self.encoded += len(prompts)
        return super().encode(prompts)


def test_memo_returns_the_same_encodings_and_encodes_each_prompt_once():
    inner = Counting()
    enc = CachedTextEncoder(inner)
    prompts = ["a photo of ship", "a photo of car", "a photo of ship"]
    first = enc.encode(prompts)
    again = enc.encode(list(reversed(prompts)))
    assert inner.encoded == 2  # two distinct prompts, once each
    ref = FakeTextEncoder().encode(prompts)
    for a, r in zip(first, ref):
        assert a.ids == r.ids and a.length == r.length and torch.equal(a.features, r.features)
    assert torch.equal(again[0].features, first[2].features)
    assert enc.end_id == inner.end_id and enc.tokenize("ship") == inner.tokenize("ship")
    assert cached(enc) is enc and CachedTextEncoder(enc).inner is inner  # no nesting


def test_memo_is_bounded_and_evicts_the_least_recent():
    inner = Counting()
    enc = CachedTextEncoder(inner, max_prompts=2)
    enc.encode(["ship", "car"])
    enc.encode(["ship"])          # ship is now the most recent
    enc.encode(["dog"])           # evicts car
    assert len(enc._memo) == 2 and "car" not in enc._memo
    enc.encode(["car"])
    assert inner.encoded == 4


def test_cfr_gives_identical_weights_with_fewer_encodings():
    from fakes import fake_kv_weights
    weights = fake_kv_weights()
    concepts = [Concept((w,), line=i) for i, w in enumerate(("ship", "car", "dog", "cat"), start=1)]
    plain_inner, memo_inner = Counting(), Counting()

    class Plain:  # the same encoder without the memo: CFR wraps whatever it gets, so count outside
        end_id = plain_inner.end_id
        tokenize = plain_inner.tokenize

        def encode(self, prompts):
            return [e for p in prompts for e in plain_inner.encode([p])]

    a = refine_cross_attention(memo_inner, weights, concepts, OBJECT_TEMPLATES, "boat")
    n_plain = sum(len(OBJECT_TEMPLATES) * 2 for _ in concepts)  # concept + anchor prompts per concept
    assert memo_inner.encoded == len(OBJECT_TEMPLATES) * (len(concepts) + 1) < n_plain  # the anchor once
    b = refine_cross_attention(Plain(), weights, concepts, OBJECT_TEMPLATES, "boat")
    for k in weights:
        assert torch.equal(a.weights[k], b.weights[k])


def test_remember_seeds_the_memo_and_other_methods_pass_through():
    inner = Counting()
    enc = CachedTextEncoder(inner, max_prompts=3)
    made = FakeTextEncoder().encode(["ship", "car"])
    enc.remember(["ship", "car"], made)
    assert enc.encode(["car", "ship"])[0] is made[1] and inner.encoded == 0
    enc.remember(["boat", "dog"], FakeTextEncoder().encode(["boat", "dog"]))  # bounded: "car" (least recent) goes
    enc.encode(["car"])
    assert inner.encoded == 1
    assert enc.__class__.__getattr__(enc, "end_id") == inner.end_id  # delegated lookup
    assert not hasattr(enc, "encode_embeddings")  # the inner encoder has none: no capability appears
