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
    assert loaded.metadata["mace.base_model"] == FP


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
    # and the same model loaded in another dtype is the same base model
    for dtype in (torch.float16, torch.bfloat16):
        ef.check_base(er, {k: v.to(dtype) for k, v in W0.items()})


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    path = str(tmp_path / "e.safetensors")

    def boom(*a, **k):  # interrupted after the bytes were written, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(ef.os, "replace", boom)
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
    big = {k: torch.full_like(v, 1e5) for k, v in RES.deltas.items()}      # beyond fp16's 65,504
    with pytest.raises(ValueError, match="dtype: in fp16: .* exceed its range.* fp32 or bf16"):
        ef.save_erasure(str(tmp_path / "a.safetensors"), big, FP, {}, "fp16")
    assert os.listdir(tmp_path) == []
    ef.save_erasure(str(tmp_path / "b.safetensors"), big, FP, {}, "bf16")


def test_saved_files_are_byte_identical_and_get_normal_permissions(tmp_path):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    info = {f"k{i}": i for i in range(40)}  # many keys: a hash map would order them differently
    ef.save_erasure(a, RES.deltas, FP, info)
    ef.save_erasure(b, dict(reversed(list(RES.deltas.items()))), FP, dict(reversed(list(info.items()))))
    assert open(a, "rb").read() == open(b, "rb").read()
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(a).st_mode & 0o777 == 0o666 & ~umask
    # what safetensors itself reads back
    raw = load_file(a)
    assert all(torch.equal(raw[ef.diff_key(k)], d.half()) for k, d in RES.deltas.items())
    for dtype in ("bf16", "fp32"):
        ef.save_erasure(a, RES.deltas, FP, {}, dtype)
        assert all(torch.equal(ef.load_erasure(a).deltas[k], d.to(ef.DTYPES[dtype])) for k, d in RES.deltas.items())


def test_keys_and_shapes_are_checked_even_for_another_base(tmp_path):
    path = str(tmp_path / "e.safetensors")
    ef.save_erasure(path, RES.deltas, FP, {})
    er = ef.load_erasure(path)
    wrong = {k: torch.zeros(v.shape[0] + 1, v.shape[1]) for k, v in W0.items()}
    with pytest.raises(ValueError, match="shape of"):
        ef.check_base(er, wrong, "e", allow_other_base=True)
    with pytest.raises(ValueError, match="lacks"):
        ef.check_base(er, dict(list(W0.items())[:1]), "e", allow_other_base=True)
    ef.check_base(er, {k: v + 1.0 for k, v in W0.items()}, "e", allow_other_base=True)  # other base allowed


def test_damaged_file_is_named(tmp_path):
    path = tmp_path / "e.safetensors"
    ef.save_erasure(str(path), RES.deltas, FP, {})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ef.DamagedFileError, match="e.safetensors: damaged or truncated erasure file"):
        ef.load_erasure(str(path))


def test_bias_deltas_use_comfyuis_diff_b_key_and_round_trip(tmp_path):
    """A compiled text gate changes biases too: ``<module>.bias`` is stored as ``<module>.diff_b``,
    the key ComfyUI's LoRA loader reads for a bias diff."""
    deltas = {"text_encoders.clip_l.mlp.fc1.weight": torch.randn(4, 3), "text_encoders.clip_l.mlp.fc1.bias": torch.randn(4)}
    path = str(tmp_path / "tg.safetensors")
    ef.save_erasure(path, deltas, "", {"stages": []}, "fp32")
    assert sorted(load_file(path)) == ["text_encoders.clip_l.mlp.fc1.diff", "text_encoders.clip_l.mlp.fc1.diff_b"]
    loaded = ef.load_erasure(path).deltas
    assert sorted(loaded) == sorted(deltas) and all(torch.equal(loaded[k], v) for k, v in deltas.items())
    with pytest.raises(ValueError, match="'.weight' or '.bias'"):
        ef.diff_key("a.b.scale")
