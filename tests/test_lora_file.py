"""Concept-LoRA files: stock key format, bit-exact round trip, metadata, validation."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mace_ops import __version__
from mace_ops.erasure_file import weights_fingerprint
from mace_ops.lora import KVLora
from mace_ops.lora_file import LORA_FORMAT, load_concept_lora, lora_keys, read_lora_info, save_concept_lora

K = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
V = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
M = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
SHAPES = {K: (32, 16), V: (32, 16), M: (48, 16)}
INFO = {
    "concept": ["ship", "boat"],
    "steps": 50,
    "lr": 1e-5,
    "seed": 2024,
    "settings": {"rank": 2, "sampler": "cfis", "t1": 200.0},
}


def trained_lora(rank=2, alpha=None):
    lora = KVLora(SHAPES, rank=rank, alpha=alpha, seed=4)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for u in lora.up.values():
            u.copy_(torch.randn(u.shape, generator=g))
    return lora


def test_round_trip_bit_exact_and_stock_keys(tmp_path):
    lora = trained_lora(alpha=3.0)
    path = str(tmp_path / "ship.safetensors")
    meta = save_concept_lora(path, lora, "abc123", INFO)
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata() == meta
    assert f"{K[:-len('.weight')]}.lora_up.weight" in keys
    assert "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_down.weight" in keys
    assert "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.alpha" in keys
    assert keys == {key for name in SHAPES for key in lora_keys(name).values()}
    loaded = load_concept_lora(path)
    assert set(loaded.factors) == set(SHAPES)
    for name, f in lora.factors().items():
        g = loaded.factors[name]
        assert torch.equal(f.up, g.up) and torch.equal(f.down, g.down) and g.alpha == 3.0 and g.rank == 2
        # what ComfyUI's LoRA patch adds: alpha / rank * up @ down
        assert torch.equal(g.delta(), lora.deltas()[name])
    rebuilt = loaded.to_lora()
    assert rebuilt.scale == lora.scale and all(torch.equal(rebuilt.delta(n), lora.delta(n).detach()) for n in SHAPES)


def test_metadata(tmp_path):
    path = str(tmp_path / "ship.safetensors")
    base = {k: torch.randn(s) for k, s in SHAPES.items()}
    save_concept_lora(path, trained_lora(), weights_fingerprint(base), INFO)
    info = load_concept_lora(path).info
    assert info["format"] == LORA_FORMAT and info["pack_version"] == __version__
    assert info["concept"] == ["ship", "boat"] and info["steps"] == 50 and info["lr"] == 1e-5 and info["seed"] == 2024
    assert info["rank"] == 2 and info["settings"]["sampler"] == "cfis"
    assert load_concept_lora(path).metadata["mace.base_model"] == weights_fingerprint(base)
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["mace.settings"]) == INFO["settings"]
    assert read_lora_info(path) == info  # the header alone gives the same info
    other = str(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="plain.safetensors: not a MACE concept LoRA"):
        read_lora_info(other)


def test_fp16_storage(tmp_path):
    path = str(tmp_path / "ship.safetensors")
    save_concept_lora(path, trained_lora(), "x", INFO, dtype="fp16")
    f = load_concept_lora(path).factors[K]
    assert f.up.dtype == torch.float16 and f.down.dtype == torch.float16


def test_validation(tmp_path):
    path = str(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="lacks"):
        save_concept_lora(path, trained_lora(), "x", {"concept": ["ship"]})
    with pytest.raises(ValueError, match="dtype"):
        save_concept_lora(path, trained_lora(), "x", INFO, dtype="int8")
    assert not os.path.exists(path)

    plain = str(tmp_path / "plain.safetensors")
    save_file({"x.lora_up.weight": torch.zeros(2, 1)}, plain)
    with pytest.raises(ValueError, match="not a MACE concept LoRA"):
        load_concept_lora(plain)
    erasure = str(tmp_path / "erasure.safetensors")
    save_file({"x.diff": torch.zeros(2, 2)}, erasure, metadata={"mace.format": "1"})
    with pytest.raises(ValueError, match="not a concept LoRA"):
        load_concept_lora(erasure)
    partial = str(tmp_path / "partial.safetensors")
    save_file({"x.lora_up.weight": torch.zeros(2, 1), "x.lora_down.weight": torch.zeros(1, 3)}, partial,
              metadata={"mace.format": LORA_FORMAT})
    with pytest.raises(ValueError, match=r"x.weight lacks \['alpha'\]"):
        load_concept_lora(partial)
    pickle = str(tmp_path / "a.ckpt")
    open(pickle, "wb").close()
    with pytest.raises(ValueError, match="no pickle"):
        load_concept_lora(pickle)
    with pytest.raises(ValueError, match="not found"):
        load_concept_lora(str(tmp_path / "missing.safetensors"))


def test_base_model_check_is_dtype_independent(tmp_path):
    from mace_ops.lora_file import check_lora_fits
    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}
    path = str(tmp_path / "l.safetensors")
    save_concept_lora(path, trained_lora(), weights_fingerprint(base), INFO)
    lora = load_concept_lora(path)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        check_lora_fits(lora, base, "l", {k: v.to(dtype) for k, v in base.items()})
    with pytest.raises(ValueError, match="l: trained for a different base model"):
        check_lora_fits(lora, base, "l", {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()})
    with pytest.raises(ValueError, match="shape of"):
        check_lora_fits(lora, {k: torch.zeros(s[0], s[1] + 1) for k, s in SHAPES.items()}, "l")
