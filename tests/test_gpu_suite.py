"""bench/gpu_suite.sh --small runs unchanged on CPU (so the GPU benchmark cannot rot): every section
and its reference-style baseline produce rows, the LoRA paths train, the JSON is written."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from comfy_harness import find_comfyui

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_small_runs_on_cpu(tmp_path, comfy):
    out = tmp_path / "suite.json"
    env = {**os.environ, "COMFYUI_PATH": str(find_comfyui()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--small", "--device", "cpu", "--out",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["section"] for r in rows} == {"cfr", "fusion", "lora", "pipeline", "dynamic", "check"}
    check = [r for r in rows if r["section"] == "check"]  # the erasure check: sampling, judging, derived
    assert [r["method"] for r in check] == ["KSampler path"] + ["diffusion classifier"] * 2 + ["derived"] * 2
    assert all(r["seconds"] > 0 for r in check)
    dynamic = [r for r in rows if r["section"] == "dynamic"]  # 0.3.64 on CPU: the leg says why it cannot run
    assert len(dynamic) == 1 and dynamic[0]["note"].startswith("skipped: "), dynamic
    assert not [r for r in rows if "note" in r and r["section"] != "dynamic"], [r for r in rows if "note" in r]
    for section in ("cfr", "fusion", "lora", "pipeline"):
        methods = {r["method"] for r in rows if r["section"] == section}
        assert "reference-style" in methods and methods & {"ours", "cached_queries"}, section
        assert any("speedup" in r for r in rows if r["section"] == section), section
    lora = [r for r in rows if r["section"] == "lora"]
    assert {r["case"].split()[0] for r in lora} == {"fp32", "bf16"}
    assert all(r["loss_first"] > 0 and r["s_per_step"] > 0 for r in lora)  # the attention loss was live
    assert "section" in proc.stdout and "speedup" in proc.stdout  # the table is printed


def test_gpu_suite_script_names_a_missing_comfyui(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env["HOME"] = str(tmp_path)
    script = tmp_path / "repo" / "bench" / "gpu_suite.sh"
    script.parent.mkdir(parents=True)
    script.write_text((REPO / "bench" / "gpu_suite.sh").read_text())
    proc = subprocess.run(["bash", str(script), "--small"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "set COMFYUI_PATH" in proc.stderr


def test_dynamic_leg_compares_the_two_loads(comfy):
    """The dynamic-VRAM leg's loading, training and comparison on CPU: with a no-op enabler both
    loads are legacy, so the deltas must agree exactly (what a GPU run compares for real)."""
    import dataclasses

    from bench import gpu_suite
    from bench.gpu_suite import dynamic_rows

    comfy.require_pack()
    scale = dataclasses.replace(gpu_suite.SMALL, steps=2, images=1, res=32)
    rows = dynamic_rows(comfy, scale, "cpu", gpu_suite._latents(scale, 1, "cpu"), 2, gpu_suite._unet_config(scale),
                        enable=lambda: None)
    assert [r["case"] for r in rows] == ["cached_queries", "full"], rows
    assert all(r["delta_rel_max"] == 0.0 and r["loss_abs_max"] == 0.0 for r in rows), rows
