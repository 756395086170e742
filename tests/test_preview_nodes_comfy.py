"""Integration: the MACE preview nodes (Before/After Grid, Concept Probe) on a tiny SD1.5-layout model.

The tiny random model is not meaningful, so only behaviour is checked: shapes and ranges, rows
growing with the prompts, the erased column differing on the target row, a finite positive probe
ratio, ratio 1 for an unchanged model, and the clear errors for empty prompt lists.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tiny_models import tiny_sd15_clip1

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    comfy.require_pack()
    pack = comfy.pack_module
    model, clip, vae = tiny_sd15_clip1(tmp_path_factory, "tiny_preview")
    with torch.inference_mode():
        erased = pack.nodes.cfr_node.MaceRefineCrossAttention.execute(
            model, clip, "ship", "object", "", "", 1.0, 1.0, False, True).result[0]
    return SimpleNamespace(model=model, clip=clip, vae=vae, erased=erased, nodes=pack.nodes.preview_nodes)


def _grid(env, target, synonym="", preserved=""):
    with torch.inference_mode():
        return env.nodes.MaceBeforeAfterGrid.execute(env.model, env.erased, env.clip, env.vae, target, synonym,
                                                     preserved, 3, 2, 5.0, 64, 64, "euler", "normal").result[0]


def _probe(env, erased, prompts, concept="ship"):
    with torch.inference_mode():
        return env.nodes.MaceConceptProbe.execute(env.model, erased, env.clip, concept, prompts, "200,400", 1,
                                                  64).result


def test_grid_layout_and_columns(env):
    one = _grid(env, "a photo of a ship")
    three = _grid(env, "a photo of a ship", "a photo of a boat", "a photo of a dog\n")
    for g in (one, three):
        assert g.ndim == 4 and g.shape[0] == 1 and g.shape[-1] == 3 and g.dtype == torch.float32
        assert torch.isfinite(g).all() and float(g.min()) >= 0.0 and float(g.max()) <= 1.0
    assert one.shape[2] == three.shape[2] and three.shape[1] > one.shape[1]
    nodes = env.nodes
    y = nodes.HEADER + nodes.LABEL
    left = one[0, y : y + 64, nodes.PAD : nodes.PAD + 64]
    right = one[0, y : y + 64, 2 * nodes.PAD + 64 : 2 * nodes.PAD + 128]
    assert (left - right).abs().max() > 1e-3, "erased column equals the original on the target row"
    assert float(one[0, :2].min()) == 1.0  # white background above the header text


def test_probe_reports_each_prompt(env):
    prompts = "a photo of a ship\na large ship at sea\na photo of a dog"
    report, ratio = _probe(env, env.erased, prompts)
    assert "'a photo of a ship'" in report and "'a large ship at sea'" in report
    assert "'a photo of a dog': skipped" in report and "Summary" in report
    assert math.isfinite(ratio) and ratio > 0
    for m in (env.model, env.erased):  # the probe's wrappers and attn2 patches are gone
        funcs = [f for _, mod in m.model.named_modules() for a in ("weight_function", "bias_function")
                 for f in mod.__dict__.get(a, [])]
        assert not funcs and "patches_replace" not in m.model_options.get("transformer_options", {})


def test_probe_unchanged_model_ratio_one(env):
    _, ratio = _probe(env, env.model, "a photo of a ship, a boat", concept="ship, boat")
    assert abs(ratio - 1.0) < 1e-6


def test_empty_prompts_errors(env):
    with pytest.raises(ValueError, match="target_prompts, synonym_prompts, preserved_prompts"):
        _grid(env, "  \n", "", "")
    with pytest.raises(ValueError, match="prompts: empty"):
        _probe(env, env.erased, "\n")
    with pytest.raises(ValueError, match="none contains the concept"):
        _probe(env, env.erased, "a photo of a dog")

