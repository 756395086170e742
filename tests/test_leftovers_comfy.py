"""Integration (real ComfyUI): issue 34's leftovers that need the nodes or the CLI."""
from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import pytest
import torch

import comfy_harness as ch
from comfy_harness import load_tiny_checkpoint

pytestmark = pytest.mark.integration
cli = importlib.import_module(f"{ch.PACK_PACKAGE}.headless.cli")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(comfy, tiny_ckpt):
    comfy.require_pack()
    model, clip, vae = load_tiny_checkpoint(tiny_ckpt, clip_layers=1)
    return comfy.pack_module, model, clip, vae


def test_mass_erase_concept_type_error_lists_nudity(env):
    pack, model, clip, vae = env
    node = pack.nodes.mass_erase_node.MaceMassErase
    with pytest.raises(ValueError, match=r"^concept_type: unknown 'nudes'; choose one of .*'nudity'"):
        node.execute(model, clip, vae, "ship", "", "nudes", "", "", False, "lo", 1.0, 1.0, 1, 1e-3, 1, 64, 1, 0, 1e-3)


def test_cfr_logs_a_work_estimate_and_refuses_too_many_concepts(env, caplog, monkeypatch):
    pack, model, clip, _vae = env
    node = pack.nodes.cfr_node.MaceRefineCrossAttention
    with caplog.at_level(logging.INFO), torch.inference_mode():
        node.execute(model, clip, "ship\ncar", "object", "", "", 1.0, 1.0, False, True)
    assert "MACE Refine Cross-Attention: work estimate: 2 concept(s) -> " in caplog.text
    monkeypatch.setenv("MACE_MAX_CONCEPTS", "1")
    encodes = []
    monkeypatch.setattr(pack.nodes.comfy_text_encoder.ComfyTextEncoder, "encode",
                        lambda self, prompts: encodes.append(prompts))
    with pytest.raises(ValueError, match="^concepts: 2 concepts in one request; this server takes at most 1 "):
        node.execute(model, clip, "ship\ncar", "object", "", "", 1.0, 1.0, False, True)
    assert encodes == []  # refused before any work


def test_convert_into_a_missing_folder(comfy, tmp_path, capsys):
    comfy.require_pack()
    target = tmp_path / "new" / "deeper" / "api.json"
    assert cli.main(["convert", str(REPO / "workflows" / "erase_style_cfr.json"), "-o", str(target)]) == 0
    assert json.loads(target.read_text())
    (tmp_path / "file").write_text("x")
    rc = cli.main(["convert", str(REPO / "workflows" / "erase_style_cfr.json"), "-o", str(tmp_path / "file" / "a.json")])
    assert rc == 2 and "-o " in capsys.readouterr().err  # a file where a folder should be: a usage error, no traceback
