"""Integration: MACE Erasure Check on the tiny SD1.5-layout checkpoint (random weights: behaviour only).

Values in range with binomial SEs and n, the JSON in ``mass_quality``'s row schema under the output
folder, the worst-case grid, the shared models left without the judge's patches, Cancel, and the
errors that name the field.
"""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from tiny_models import tiny_sd15_clip1

pytestmark = pytest.mark.integration
SCHEMA = ("kind", "concepts", "H", "se_H", "acc_e", "se_e", "acc_g", "se_g", "acc_s", "se_s", "n_e", "n_g", "n_s",
          "integrity", "fd", "method", "seconds", "peak_mb")


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    comfy.require_pack()
    pack = comfy.pack_module
    model, clip, vae = tiny_sd15_clip1(tmp_path_factory, "tiny_check")
    with torch.inference_mode():
        erased = model.clone()  # a stand-in erasure: every to_k weight changed (cheaper than fitting one)
        keys = [k for k in erased.model_state_dict() if k.endswith("attn2.to_k.weight")]
        erased.add_patches({k: ("diff", (0.5 * torch.randn_like(erased.model_state_dict()[k]),)) for k in keys})
    return SimpleNamespace(model=model, clip=clip, vae=vae, erased=erased, pack=pack,
                           node=pack.nodes.erasure_check_node.MaceErasureCheck)


def _check(env, erased=None, concepts="ship, ship boat", held_out="vessel -> ship", keep="dog", n=2, **kw):
    args = dict(base_model=env.model, clip=env.clip, erased_model=erased if erased is not None else env.erased,
                vae=env.vae, concepts=concepts, held_out=held_out, keep=keep, concept_type="object", anchor="",
                images_per_set=n, seed=3, steps=1, cfg=5.0, width=64, height=64, sampler_name="euler",
                scheduler="normal", draws=1, other_candidates="")
    args.update(kw)
    with torch.inference_mode():
        return env.node.execute(**args)


def test_check_table_grid_and_json(env):
    out = _check(env)
    table, grid, path = out.result
    for word in ("Acc_e", "Acc_g", "Acc_s", "before", "after", "n=2", "seconds per image"):
        assert word in table
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3
    assert float(grid.min()) >= 0.0 and float(grid.max()) <= 1.0
    import folder_paths

    assert os.path.isfile(path) and os.path.realpath(path).startswith(os.path.realpath(
        folder_paths.get_output_directory()))
    data = json.loads(open(path).read())
    assert [r["method"] for r in data["rows"]] == ["none", "erased"]
    for row in data["rows"]:
        assert set(SCHEMA) <= set(row)
        assert row["n_e"] == row["n_g"] == row["n_s"] == 2 and row["kind"] == "object" and row["concepts"] == 1
        for c in "egs":
            assert 0.0 <= row[f"acc_{c}"] <= 1.0
            assert row[f"se_{c}"] == pytest.approx(math.sqrt(row[f"acc_{c}"] * (1 - row[f"acc_{c}"]) / 2), abs=1e-3)
        assert row["H"] is None or 0.0 <= row["H"] <= 1.0
    assert data["candidates"] == ["", "ship", "dog"]
    assert len(data["images"]) == 6 and {i["set"] for i in data["images"]} == {"erased", "held_out", "kept"}
    assert all(0.0 <= i["p_label_erased"] <= 1.0 and i["judged_none"] in data["candidates"] for i in data["images"])
    assert _no_patches_left(env.model) and _no_patches_left(env.erased)  # the judge's wrappers are gone


def _no_patches_left(m) -> bool:
    funcs = [f for _, mod in m.model.named_modules() for a in ("weight_function", "bias_function")
             for f in mod.__dict__.get(a, [])]
    return not funcs and "patches_replace" not in m.model_options.get("transformer_options", {})


def test_cancel_while_sampling_and_while_judging(env):
    import comfy.model_management as mm

    den_cls = env.pack.nodes.erasure_check_node.ComfyDenoiser
    real = den_cls.forward_with_attention
    calls = []

    def forward(self, *a, **kw):
        calls.append(1)
        mm.interrupt_current_processing(True)  # the user presses Cancel during the first judge call
        return real(self, *a, **kw)

    try:
        mm.interrupt_current_processing(True)  # Cancel before the first sampling step ends
        with pytest.raises(mm.InterruptProcessingException):
            _check(env, n=1)
        mm.interrupt_current_processing(False)
        den_cls.forward_with_attention = forward
        with pytest.raises(mm.InterruptProcessingException):
            _check(env, n=1)
    finally:
        den_cls.forward_with_attention = real
        mm.interrupt_current_processing(False)
    assert len(calls) == 1  # stopped after the judge's first denoiser call
    assert _no_patches_left(env.model) and _no_patches_left(env.erased)


@pytest.mark.parametrize("field,kw,match", [
    ("keep", {"keep": " \n"}, r"keep: no concept"),
    ("anchor", {"anchor": "dog"}, r"anchor: 'dog' is also a listed concept"),
    ("clip", {"clip": None}, r"clip: no CLIP connected"),
    ("vae", {"vae": None}, r"vae: no VAE connected"),
    ("held_out", {"held_out": "vessel -> car"}, r"held_out, line 1: 'car' is not an erased concept"),
    ("held_out", {"concepts": "ship\ncar", "held_out": "vessel"}, r"held_out, line 1: say which erased concept"),
    ("keep", {"keep": "ship"}, r"keep, line 1: 'ship' is also erased"),
    ("images_per_set", {"n": float("nan")}, r"images_per_set"),
])
def test_bad_inputs_name_the_field(env, field, kw, match):
    with pytest.raises(ValueError, match=match):
        _check(env, **kw)
