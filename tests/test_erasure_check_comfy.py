"""Integration: MACE Erasure Check on the tiny SD1.5-layout checkpoint (random weights: behaviour only).

Values in range with binomial SEs and n, the JSON in ``mass_quality``'s row schema under the output
folder, the worst-case grid, the shared models left without the judge's patches, Cancel, and the
errors that name the field. The optional CLIP judge with a tiny random-weight CLIP vision model:
both judges in the table and the JSON, and the refusals of a vision model that is not the text
tower's CLIP and of a text tower without its projection (what SD1.x checkpoints give).
"""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from tiny_models import tiny_clip_vision, tiny_sd15_clip1

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


@pytest.fixture()
def projected(env):
    """The tiny CLIP's clip_l with a loaded text projection (as the stock Load CLIP gives for a text-encoder
    file that has one; an SD1.x checkpoint has none), restored afterwards."""
    w = env.clip.cond_stage_model.clip_l.transformer.text_projection.weight
    old = w.detach().clone()
    with torch.inference_mode():
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * 0.02)
    yield env
    with torch.inference_mode():
        w.copy_(old)


def test_clip_judge_rows_agreement_and_json(projected, tmp_path):
    env = projected
    out = _check(env, clip_vision=tiny_clip_vision(tmp_path, 768))
    table, grid, path = out.result
    assert "CLIP judge (zero-shot, clip_l text tower" in table and "judges agree (same verdict per image)" in table
    assert table.count("Acc_e erased") == 2 and "clip judging" in table
    assert "ComfyUI does not use" in table           # SD1.x: the projection is flagged
    assert grid.shape[0] == 1
    data = json.loads(open(path).read())
    assert [(r["judge"], r["method"]) for r in data["rows"]] == [("diffusion", "none"), ("diffusion", "erased"),
                                                                 ("clip", "none"), ("clip", "erased")]
    for row in data["rows"]:
        assert set(SCHEMA) <= set(row) and row["n_e"] == row["n_g"] == row["n_s"] == 2
        for c in "egs":
            assert 0.0 <= row[f"acc_{c}"] <= 1.0
            assert row[f"se_{c}"] == pytest.approx(math.sqrt(row[f"acc_{c}"] * (1 - row[f"acc_{c}"]) / 2), abs=1e-3)
        assert row["H"] is None or 0.0 <= row["H"] <= 1.0
    for k in ("none", "erased"):
        a = data["agreement"][k]
        assert a["n"] == 6 and 0.0 <= a["verdict"] <= 1.0 and 0.0 <= a["answer"] <= 1.0
    cj = data["settings"]["clip_judge"]
    assert cj["text_tower"] == "clip_l" and cj["width"] == 768 and cj["projection_used_by_comfyui"] is False
    assert all(-1.0 <= v <= 1.0 for v in cj["mean_best_cosine"].values())
    for img in data["images"]:
        assert img["clip_judged_none"] in data["candidates"] and img["clip_judged_erased"] in data["candidates"]
        assert img["clip_margin_none"] is None or -2.0 <= img["clip_margin_none"] <= 2.0
    # the verdicts in the JSON are the ones the rows count
    kept = [i for i in data["images"] if i["set"] == "kept"]
    row = data["rows"][3]
    assert row["acc_s"] == pytest.approx(sum(i["clip_judged_erased"] == i["label"] for i in kept) / len(kept))
    assert _no_patches_left(env.model) and _no_patches_left(env.erased)


def test_clip_judge_refusals_name_clip_vision(projected, tmp_path):
    env = projected
    with pytest.raises(ValueError, match=r"clip_vision: this vision model's image embeddings are 32 wide, but the "
                       r"checkpoint's text tower \(CLIP ViT-L/14's text tower \(SD1.x\)\) projects to 768: .*Connect "
                       r"the CLIP ViT-L/14 vision model"):
        _check(env, clip_vision=tiny_clip_vision(tmp_path, 32))
    w = env.clip.cond_stage_model.clip_l.transformer.text_projection.weight
    with torch.inference_mode():
        w.zero_()                                     # an SD1.x checkpoint's CLIP: no projection loaded
    with pytest.raises(ValueError, match=r"clip_vision: the text tower's projection \(clip_l.transformer."
                       r"text_projection\) is not loaded .* SD1.x checkpoints do not carry it"):
        _check(env, clip_vision=tiny_clip_vision(tmp_path, 768))
    with pytest.raises(ValueError, match=r"clip_vision: not a CLIP vision model"):
        _check(env, clip_vision=object())


def test_clip_judge_text_embeddings_are_comfyuis_projected_pooled_where_it_projects(env, tmp_path):
    """SD2.x's clip_h (a 3-layer, random-weight tower): ComfyUI projects its pooled output itself, and the
    judge's text embedding is exactly that projection; the matching vision width is 1024."""
    import comfy.sd
    import comfy.supported_models_base as smb
    from comfy.text_encoders import sd2_clip

    with torch.inference_mode():
        clip = comfy.sd.CLIP(smb.ClipTarget(sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel),
                             model_options={"clip_h_model_config": {"num_hidden_layers": 3}})
        gen = torch.Generator().manual_seed(0)
        clip.cond_stage_model.load_state_dict(
            {k: torch.randn(v.shape, generator=gen) * 0.02 if v.ndim > 1 else torch.ones(v.shape)
             for k, v in clip.cond_stage_model.state_dict().items()}, strict=False)
        enc = env.pack.nodes.comfy_clip_judge.ClipJudgeEncoders(clip, tiny_clip_vision(tmp_path, 1024))
        assert (enc.tower_name, enc.width, enc.projected_by_comfy, enc.note) == ("clip_h", 1024, True, None)
        texts = ["a photo of a ship", "a photo of a dog"]
        ours = enc.encode_texts(texts)
        theirs = torch.cat([clip.encode_from_tokens(clip.tokenize(t, disable_weights=True), return_pooled=True)[1]
                            for t in texts])
        assert ours.shape == (2, 1024) and torch.allclose(ours, theirs.float(), atol=1e-5)
        with pytest.raises(ValueError, match=r"clip_vision: .* projects to 1024: .*OpenCLIP ViT-H/14 vision model"):
            env.pack.nodes.comfy_clip_judge.ClipJudgeEncoders(clip, tiny_clip_vision(tmp_path, 768))
