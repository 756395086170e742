"""Erasure files: bit-exact round trips, metadata, base checks, atomic writes, no pickle."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import mace_ops.erasure_file as ef
from fakes import FakeTextEncoder, fake_kv_weights
from mace_ops.cfr import refine_cross_attention
from mace_ops.concepts import parse_concepts
from mace_ops.templates import OBJECT_TEMPLATES

W0 = fake_kv_weights()
RES = refine_cross_attention(FakeTextEncoder(), W0, parse_concepts("ship, boat"), OBJECT_TEMPLATES, "ground")
FP = ef.weights_fingerprint(W0)


def test_fp32_round_trip_is_bit_exact(tmp_path):
    path = str(tmp_path / "e.safetensors")
    meta = ef.save_erasure(path, RES.deltas, FP, {"method": "cfr", "concepts": [["ship", "boat"]]}, "fp32")
    loaded = ef.load_erasure(path)
    assert set(loaded.deltas) == set(RES.deltas)
    for k, d in RES.deltas.items():
        assert torch.equal(loaded.deltas[k], d)
        assert torch.equal(W0[k] + loaded.deltas[k], W0[k] + d)
    assert loaded.metadata == meta
    assert loaded.info["concepts"] == [["ship", "boat"]] and loaded.info["method"] == "cfr"
    assert loaded.info["base_model_hash"] == FP


def test_fp16_file_holds_rounded_deltas_and_stock_keys(tmp_path):
    path = str(tmp_path / "e.safetensors")
    ef.save_erasure(path, RES.deltas, FP, {}, "fp16")
    raw = load_file(path)
    assert sorted(raw) == sorted(k[: -len(".weight")] + ".diff" for k in RES.deltas)
    for k, d in RES.deltas.items():
        assert raw[k[: -len(".weight")] + ".diff"].dtype == torch.float16
        assert torch.equal(ef.load_erasure(path).deltas[k], d.half())


def test_base_check(tmp_path):
    path = str(tmp_path / "e.safetensors")
    ef.save_erasure(path, RES.deltas, FP, {})
    er = ef.load_erasure(path)
    ef.check_base(er, W0)
    other = {k: v + 0.01 for k, v in W0.items()}
    with pytest.raises(ValueError, match="different base model"):
        ef.check_base(er, other, "e.safetensors")
    with pytest.raises(ValueError, match="lacks"):
        ef.check_base(er, dict(list(W0.items())[:2]))
    # the fingerprint does not depend on fp32 vs fp16 storage of the same weights
    assert ef.weights_fingerprint({k: v.half().float() for k, v in W0.items()}) == ef.weights_fingerprint(
        {k: v.half() for k, v in W0.items()})


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    path = str(tmp_path / "e.safetensors")

    def boom(*a, **k):
        open(a[1], "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ef, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ef.save_erasure(path, RES.deltas, FP, {})
    assert os.listdir(tmp_path) == []


def test_existing_file_replaced_atomically(tmp_path):
    path = str(tmp_path / "e.safetensors")
    ef.save_erasure(path, RES.deltas, FP, {"v": 1})
    ef.save_erasure(path, RES.deltas, FP, {"v": 2})
    assert ef.load_erasure(path).info["v"] == 2
    assert os.listdir(tmp_path) == ["e.safetensors"]


def test_load_refuses_non_mace_and_pickle(tmp_path):
    plain = str(tmp_path / "lora.safetensors")
    save_file({"x.diff": torch.zeros(2, 2)}, plain)
    with pytest.raises(ValueError, match="not a MACE erasure"):
        ef.load_erasure(plain)
    pt = str(tmp_path / "e.pt")
    torch.save({"x": 1}, pt)
    with pytest.raises(ValueError, match="no pickle"):
        ef.load_erasure(pt)
    with pytest.raises(ValueError, match="not found"):
        ef.load_erasure(str(tmp_path / "missing.safetensors"))


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        ef.save_erasure(str(tmp_path / "a.safetensors"), RES.deltas, FP, {}, "fp8")
    with pytest.raises(ValueError, match="nothing to save"):
        ef.save_erasure(str(tmp_path / "a.safetensors"), {}, FP, {})
    assert os.listdir(tmp_path) == []
