"""One finiteness and magnitude check for every tensor read from a file (issue 34):
``validation.require_file_values`` with the documented bound ``FILE_VALUE_LIMIT``."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mace_ops.erasure_file as ef
from mace_ops.ace import GatedErasure, load_gated_file, save_gated_erasure
from mace_ops.lora import KVLora
from mace_ops.lora_file import load_concept_lora, save_concept_lora
from mace_ops.validation import FILE_VALUE_LIMIT, require_file_values

INFO = {"concept": ["ship"], "steps": 1, "lr": 0.1, "seed": 0, "settings": {}}
BAD = [float("nan"), float("inf"), 1e30, -2 * FILE_VALUE_LIMIT]


def poison(path: str, value: float) -> None:
    """Set one value of the file's first floating tensor, metadata kept."""
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in sorted(tensors) if tensors[k].is_floating_point() and tensors[k].numel() > 1)
    tensors[key].view(-1)[0] = value
    save_file(tensors, path, metadata=meta)


def test_bound_is_documented_and_named():
    assert FILE_VALUE_LIMIT == 1e6
    require_file_values({"w": torch.full((2,), FILE_VALUE_LIMIT), "i": torch.tensor([10**9])}, "f")  # ints: indices
    with pytest.raises(ValueError, match=r"^f: w holds values up to 1e\+30 .*limit 1e\+06 \(FILE_VALUE_LIMIT\)"):
        require_file_values({"w": torch.tensor([0.0, 1e30])}, "f")
    with pytest.raises(ValueError, match="^f: w holds NaN"):
        require_file_values({"w": torch.tensor([float("nan")])}, "f")


@pytest.mark.parametrize("value", BAD)
def test_erasure_lora_and_gate_files_are_checked(tmp_path, value):
    w = {"blk.attn2.to_k.weight": torch.randn(4, 4)}
    erasure = str(tmp_path / "e.safetensors")
    ef.save_erasure(erasure, {"blk.attn2.to_k.weight": torch.randn(4, 4) * 0.01}, "fp", {}, "fp32")
    lora = str(tmp_path / "l.safetensors")
    save_concept_lora(lora, KVLora.for_weights(w, seed=0), "fp", INFO)
    gate = str(tmp_path / "g.safetensors")
    g = GatedErasure(torch.nn.functional.normalize(torch.ones(1, 4), dim=-1), torch.zeros(1, dtype=torch.long),
                     torch.tensor([0.5]), torch.eye(4)[:, :1].unsqueeze(0), torch.tensor([[0.25]]), temperature=0.01)
    save_gated_erasure(gate, g, "fp", {})
    for path, load in ((erasure, ef.load_erasure), (lora, load_concept_lora), (gate, load_gated_file)):
        load(path)  # fine as written
        poison(path, value)
        with pytest.raises(ValueError, match="NaN or inf|FILE_VALUE_LIMIT") as err:
            load(path)
        assert str(tmp_path) not in str(err.value)


def test_erasure_with_no_tensor_is_refused(tmp_path):
    path = str(tmp_path / "empty.safetensors")
    save_file({}, path, metadata={"mace.format": ef.FORMAT_VERSION, "mace.base_model": "fp"})
    with pytest.raises(ValueError, match="^empty.safetensors: holds no tensor"):
        ef.load_erasure(path)
    with pytest.raises(ValueError, match="^erasure file not found: none.safetensors$"):
        ef.load_erasure(str(tmp_path / "none.safetensors"))
