"""Integration (real ComfyUI): what Load Erasure and Load UNet .pt apply from a file (issue 34).

Values: NaN, inf and |value| > FILE_VALUE_LIMIT are refused before anything is applied. Keys: an
erasure file changes only cross-attention K/V (SDXL: the pooled-text layer) and, for a compiled
text gate, text-layer MLP tensors -- with allow_other_base too. Loading one file twice says so.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfy_harness import load_tiny_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(comfy, tiny_ckpt):
    comfy.require_pack()
    model, clip, _vae = load_tiny_checkpoint(tiny_ckpt, clip_layers=1)
    pack = comfy.pack_module
    with torch.inference_mode():
        erased = pack.nodes.cfr_node.MaceRefineCrossAttention.execute(
            model, clip, "ship", "object", "", "", 0.1, 1.0, False, True).args[0]
        saved = pack.nodes.erasure_io_nodes.MaceSaveErasure.execute(erased, "loras/values/base", "fp32").args[0]
    return SimpleNamespace(pack=pack, comfy=comfy, model=model, clip=clip, erased=erased, saved=saved,
                           loras=comfy.output_dir / "loras")


def rewrite(src, dst, change):
    with safe_open(str(src), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def load(env, name, model=None, allow=False, clip=None):
    node = env.pack.nodes.erasure_io_nodes.MaceLoadErasure
    with torch.inference_mode():
        return node.execute(model or env.model, name, 1.0, allow, clip).args


def first_key(tensors):
    return sorted(tensors)[0]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_load_erasure_refuses_bad_values(env, value):
    def change(t, _m):
        t[first_key(t)].view(-1)[0] = value
    rewrite(env.saved, env.loras / "values" / "bad.safetensors", change)
    with pytest.raises(ValueError, match="NaN or inf|FILE_VALUE_LIMIT"):
        load(env, "values/bad.safetensors", allow=True)


@pytest.mark.parametrize("key", ["diffusion_model.input_blocks.0.0.diff",
                                 "diffusion_model.out.2.diff_b",
                                 "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.diff"])
def test_load_erasure_applies_only_kv_and_text_mlp_even_with_allow_other_base(env, key):
    def change(t, _m):
        t[key] = torch.zeros(4)
    rewrite(env.saved, env.loras / "values" / "other_keys.safetensors", change)
    with pytest.raises(ValueError, match="never edits"):
        load(env, "values/other_keys.safetensors", allow=True, clip=env.clip)


def test_load_erasure_refuses_a_file_without_tensors(env):
    with safe_open(str(env.saved), "pt") as f:
        meta = dict(f.metadata())
    save_file({}, str(env.loras / "values" / "empty.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="holds no tensor"):
        load(env, "values/empty.safetensors")


def test_loading_the_same_erasure_twice_says_so_and_other_files_stack(env):
    name = os.path.relpath(env.saved, env.loras)
    once = load(env, name)[0]
    with pytest.raises(ValueError, match="already applied to this model"):
        load(env, name, model=once)
    # a file made for the same base stacks on a model with other MACE edits (CFR here)
    stacked = load(env, name, model=env.erased)[0]
    assert env.pack.nodes.comfy_model.get_record(stacked) is not None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_load_unet_pt_refuses_bad_kv_values(env, value):
    upt = env.pack.nodes.unet_pt
    sd = upt.unet_pt_state_dict(env.erased)
    key = next(k for k in sorted(sd) if k.endswith("attn2.to_k.weight"))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = value
    (env.comfy.output_dir / "values").mkdir(exist_ok=True)
    torch.save(sd, env.comfy.output_dir / "values" / "bad.pt")
    with pytest.raises(ValueError, match="^path 'values/bad.pt': .*(NaN or inf|FILE_VALUE_LIMIT)") as err:
        env.pack.nodes.unet_pt_nodes.MaceLoadUNetPt.execute(env.model, "values/bad.pt")
    assert str(env.comfy.output_dir) not in str(err.value)
