"""Integration: the harness's UNet .pt (diffusers keys) from and to a MACE erasure, bit-exact K/V."""
from __future__ import annotations

import pickle

import pytest
import torch

from comfy_harness import load_tiny_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(comfy, tiny_ckpt):
    comfy.require_pack()
    model, clip, _vae = load_tiny_checkpoint(tiny_ckpt, clip_layers=1)
    pack = comfy.pack_module
    out = pack.nodes.cfr_node.MaceRefineCrossAttention.execute(
        model, clip, "van gogh", "style", "art", "claude monet", 0.1, 1.0, False, True, "painting")
    return pack, model, out.args[0]


def test_roundtrip_is_bit_exact_on_kv(env, tmp_path):
    pack, base, erased = env
    upt, cm = pack.nodes.unet_pt, pack.nodes.comfy_model
    path = upt.save_unet_pt(erased, str(tmp_path / "u.pt"), "fp32")
    sd = torch.load(path, weights_only=True)
    assert len(sd) == len(base.model_state_dict("diffusion_model."))
    assert all(k.startswith(("down_blocks", "up_blocks", "mid_block", "conv_", "time_embedding")) for k in sd)
    loaded, info = upt.load_unet_pt(base, path)
    assert info["changed"] == 8
    want, got = cm.effective_kv_weights(erased), cm.effective_kv_weights(loaded)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    base_kv = cm.effective_kv_weights(base)
    assert any(not torch.equal(want[k], base_kv[k]) for k in want)
    record = cm.get_record(loaded)
    assert sorted(record.deltas) == sorted(cm.get_record(erased).deltas)


def test_refuses_other_weights_and_bad_files(env, tmp_path):
    pack, base, erased = env
    upt = pack.nodes.unet_pt
    sd = upt.unet_pt_state_dict(erased)
    key = "conv_in.weight"
    bad = dict(sd)
    bad[key] = bad[key] + 0.5
    torch.save(bad, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other than the cross-attention K/V differ.*conv_in.weight"):
        upt.load_unet_pt(base, str(tmp_path / "other.pt"))
    missing = dict(sd)
    missing.pop(key)
    missing["unet.extra"] = torch.zeros(1)
    torch.save(missing, tmp_path / "keys.pt")
    with pytest.raises(ValueError, match="missing 1 key.*conv_in.weight.*unexpected 1 key.*unet.extra"):
        upt.load_unet_pt(base, str(tmp_path / "keys.pt"))
    shaped = dict(sd)
    shaped[key] = torch.zeros(3)
    torch.save(shaped, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="shape"):
        upt.load_unet_pt(base, str(tmp_path / "shape.pt"))

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="not a weights-only torch file"):
        upt.load_unet_pt(base, str(tmp_path / "evil.pt"))
    with pytest.raises(ValueError, match="not found"):
        upt.load_unet_pt(base, str(tmp_path / "none.pt"))
