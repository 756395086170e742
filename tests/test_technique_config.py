"""The eval-learn / eval-unlearn "mace" technique config: validation (no ComfyUI needed) and a
seed-002-style run end to end on the tiny checkpoint (synonym list, erase_from, save then load)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import comfy_harness as ch

technique = importlib.import_module(f"{ch.PACK_PACKAGE}.headless.technique")
cli = importlib.import_module(f"{ch.PACK_PACKAGE}.headless.cli")


def cfg(tmp_path, **over):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    config = {"erase_concept": ["nudity", "naked"], "erase_from": "person", "lambda_cfr": 0.1,
              "checkpoint": str(ckpt)}
    config.update(over)
    return {"output_dir": str(tmp_path / "out"), "seed": 2, "technique": {"name": "mace", "config": config},
            "metrics": [{"name": "clip_score"}]}


def problems(data, tmp_path) -> str:
    with pytest.raises(technique.ConfigError) as exc:
        technique.validate_config(data, str(tmp_path))
    return str(exc.value)


def test_valid_config_and_defaults(tmp_path):
    tc = technique.validate_config(cfg(tmp_path), str(tmp_path))
    assert tc.erase_concept == ["nudity", "naked"] and tc.erase_from == ["person"]
    assert tc.lambda_cfr == 0.1 and tc.use_fp16 is True and tc.stages == "cfr" and tc.seed == 2
    assert tc.output_dir == str(tmp_path / "out")
    assert any("metrics" in n for n in tc.notes)
    p = technique.build_prompt(tc, "model.safetensors")
    assert p["erase"]["class_type"] == "MaceRefineCrossAttention"
    assert p["erase"]["inputs"]["concepts"] == "nudity, naked" and p["erase"]["inputs"]["erase_from"] == "person"
    assert p["erase"]["inputs"]["lambda_"] == 0.1 and "save_pt" not in p
    tc = technique.validate_config(cfg(tmp_path, erase_concept="nudity", erase_from=None, stages="mace",
                                       save_path="u.pt"), str(tmp_path))
    p = technique.build_prompt(tc, "m")
    assert p["erase"]["class_type"] == "MaceMassErase" and p["erase"]["inputs"]["sampling_steps"] == 50
    assert p["save_pt"]["inputs"]["path"] == "u.pt" and p["save_pt"]["inputs"]["dtype"] == "fp16"  # in output_dir


def test_unknown_keys_are_named(tmp_path):
    data = cfg(tmp_path, lamda_cfr=0.2, erase_concepts="x")
    data["extra"] = 1
    data["technique"]["cfg"] = {}
    msg = problems(data, tmp_path)
    assert "lamda_cfr" in msg and "erase_concepts" in msg and "extra" in msg and "'technique': cfg" in msg


def test_wrong_types_and_values(tmp_path):
    msg = problems(cfg(tmp_path, lambda_cfr="0.1", use_fp16="yes", num_inference_steps=2.5,
                       erase_concept=["a", 3], device="gpu"), tmp_path)
    for part in ("lambda_cfr: expected number > 0", "use_fp16: expected true/false", "num_inference_steps",
                 "erase_concept: every item must be a string", "device: 'gpu'"):
        assert part in msg, msg
    assert "lambda_cfr: 0 is outside (0, 1e+06]" in problems(cfg(tmp_path, lambda_cfr=0), tmp_path)
    assert "technique.name" in problems({**cfg(tmp_path), "technique": {"name": "esd", "config": {}}}, tmp_path)
    assert "seed" in problems({**cfg(tmp_path), "seed": "2"}, tmp_path)
    assert "erase_concept: required" in problems(
        {**cfg(tmp_path), "technique": {"name": "mace", "config": {"checkpoint": "x.ckpt"}}}, tmp_path)


@pytest.mark.parametrize("over,part", [
    ({"preserve_scale": float("nan")}, "preserve_scale: nan is not a finite number"),
    ({"fusion_lambda": float("nan")}, "fusion_lambda: nan is not a finite number"),
    ({"lora_lr": float("nan")}, "lora_lr: nan is not a finite number"),
    ({"lambda_cfr": float("inf")}, "lambda_cfr: inf is not a finite number"),
    ({"guidance_scale": float("-inf")}, "guidance_scale: -inf is not a finite number"),
    ({"lora_lr": 2.0}, "lora_lr: 2.0 is outside [0, 1]"),
    ({"image_size": 4096}, "image_size: 4096 is outside [64, 2048]"),
    ({"erase_concept": ["\u200b"]}, "erase_concept, line 1: only invisible characters"),
    ({"preserve": ["nudity"]}, "preserve, line 1: 'nudity' is also erased"),
])
def test_numbers_and_phrases_go_through_the_node_validators(tmp_path, over, part):
    assert f"technique.config.{part}" in problems(cfg(tmp_path, **over), tmp_path)


def test_seed_above_2_64_and_a_hash_in_a_phrase(tmp_path):
    assert "seed: 18446744073709551616 is outside" in problems({**cfg(tmp_path), "seed": 2**64}, tmp_path)
    tc = technique.validate_config({**cfg(tmp_path, erase_concept=["c# programming", "c #sharp"]),
                                    "seed": 2**64 - 1}, str(tmp_path))
    assert technique.build_prompt(tc, "m")["erase"]["inputs"]["concepts"] == "c\\# programming, c \\#sharp"


def test_config_not_utf8_names_the_file(tmp_path):
    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"output_dir": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(technique.ConfigError, match=r"latin1.json: not UTF-8 text \(byte \d+"):
        technique.load_config_file(str(bad))
    assert cli.main(["technique", "--config", str(bad), "--validate-only"]) == 2


def test_node_ranges_match_the_node_schemas(comfy):
    """The config's numeric ranges are the nodes' own (min/max of the input each key becomes)."""
    comfy.require_pack()
    nodes = {cls.__name__: cls for cls in comfy.pack_module.nodes.NODES}
    for key, (node, name, lo, hi, integer, _open) in {**technique.NODE_RANGES,
                                                      "seed": (*technique.SEED_RANGE, True, False)}.items():
        if not node:
            continue
        inp = next(i for i in nodes[node].define_schema().inputs if i.id == name)
        assert (inp.min, inp.max) == (lo, hi), key


def test_load_path_equal_to_save_path_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "u.pt").write_bytes(b"")
    msg = problems(cfg(tmp_path, load_path="out/u.pt", save_path="u.pt"), tmp_path)  # save_path: in output_dir
    assert "load_path and save_path are the same file" in msg


@pytest.mark.parametrize("save", ["ABS", "../u.pt", "~/u.pt", "unet/../../u.pt", "u.safetensors", "u.txt", "unet/",
                                  ".u.pt", "LINK/u.pt"])
def test_save_path_stays_in_output_dir(tmp_path, save):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "LINK").symlink_to(tmp_path / "elsewhere")
    save = str(tmp_path / "out" / "u.pt") if save == "ABS" else save
    assert "technique.config.save_path: " in problems(cfg(tmp_path, save_path=save), tmp_path)


def test_missing_files(tmp_path):
    msg = problems(cfg(tmp_path, checkpoint="./nope/sd.ckpt", load_path="missing.pt"), tmp_path)
    assert "checkpoint:" in msg and "not found" in msg and "load_path:" in msg
    data = cfg(tmp_path)
    del data["technique"]["config"]["checkpoint"]
    assert "checkpoint: required" in problems(data, tmp_path)


def test_yaml_config_and_cli_exit_status(tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text("output_dir: out\nseed: 2\ntechnique:\n  name: mace\n  config:\n    erase_concept: [nudity]\n"
                 f"    checkpoint: {tmp_path / 'model.safetensors'}\n")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert technique.load_config_file(str(y))["technique"]["config"]["erase_concept"] == ["nudity"]
    assert cli.main(["technique", "--config", str(y), "--validate-only"]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cfg(tmp_path, erase_frm="car")))
    assert cli.main(["technique", "--config", str(bad)]) == 2
    assert "erase_frm" in capsys.readouterr().err


@pytest.mark.integration
def test_seed002_style_config_save_then_load(comfy, tiny_ckpt_2layer, tmp_path):
    """Synonym list + erase_from + save_path; then a second config loads the .pt (load_path)."""
    comfy.require_pack()
    pt = tmp_path / "run1" / "unet" / "mace_unet.pt"
    first = {"output_dir": str(tmp_path / "run1"), "seed": 2, "technique": {"name": "mace", "config": {
        "erase_concept": ["van gogh", "vincent van gogh"], "erase_from": "painting", "lambda_cfr": 0.1,
        "save_path": "unet/mace_unet.pt", "use_fp16": False, "device": "cpu", "num_inference_steps": 2,
        "checkpoint": str(tiny_ckpt_2layer), "concept_type": "style", "preserve": ["claude monet"],
        "builtin_preserve": False}}}
    c1 = tmp_path / "first.json"
    c1.write_text(json.dumps(first))
    assert cli.main(["technique", "--config", str(c1), "-q"]) == 0
    report = json.loads((tmp_path / "run1" / "technique_run.json").read_text())
    erasure1 = Path(report["erasure_file"])
    assert erasure1.parent == tmp_path / "run1" and erasure1.is_file()
    assert report["config"]["erase_from"] == ["painting"] and Path(report["save_path"]) == pt
    sd = torch.load(pt, weights_only=True)
    kv = [k for k in sd if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    assert len(kv) == 8 and any(k.startswith("down_blocks.") and ".attentions." in k for k in kv)
    assert all(v.dtype == torch.float32 for v in sd.values())
    side = load_file(str(pt.with_suffix(".safetensors")))  # our erasure file next to the .pt
    d1 = load_file(str(erasure1))
    assert sorted(side) == sorted(d1) and len(d1) == 8

    second = {"output_dir": str(tmp_path / "run2"), "seed": 2, "technique": {"name": "mace", "config": {
        "erase_concept": ["van gogh", "vincent van gogh"], "erase_from": "painting", "load_path": str(pt),
        "use_fp16": False, "device": "cpu", "checkpoint": str(tiny_ckpt_2layer)}}}
    c2 = tmp_path / "second.json"
    c2.write_text(json.dumps(second))
    assert cli.main(["technique", "--config", str(c2), "-q"]) == 0
    report2 = json.loads((tmp_path / "run2" / "technique_run.json").read_text())
    d2 = load_file(report2["erasure_file"])
    assert sorted(d2) == sorted(d1)
    for k in d1:
        torch.testing.assert_close(d2[k], d1[k], rtol=0, atol=1e-6)

    same = json.loads(json.dumps(second))
    same["output_dir"], same["technique"]["config"]["save_path"] = str(tmp_path / "run1"), "unet/mace_unet.pt"
    c3 = tmp_path / "same.json"
    c3.write_text(json.dumps(same))
    assert cli.main(["technique", "--config", str(c3), "-q"]) == 2
