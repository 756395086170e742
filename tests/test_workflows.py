"""The shipped workflows and the headless runner (``python -m comfyui_mace run/check``).

Plain tests (no ComfyUI needed):
* ``workflows/`` is the pack's only template folder (ComfyUI's template browser lists every
  folder it knows, so a copy would show each workflow twice);
* every workflow JSON parses, is UI format with self-consistent links, and uses only stock
  ComfyUI nodes and this pack's nodes (stock names are looked up in the ComfyUI checkout's
  source text when there is one, else in a static list);
* ``--set`` parsing / resolution, and the "ComfyUI not found" exit (status 2).

Integration (real ComfyUI, ``comfy`` fixture):
* every workflow passes ``check_ui_workflow`` (all node types exist, every link type matches
  the declared schema, widget counts, required sockets) and its API form passes ComfyUI's own
  ``execution.validate_prompt`` (widget values within the declared ranges and options; model
  file names are added to the file lists, since the real weights are not there);
* the CLI in-process (``check``, ``convert``, a failing ``run``, bad ``--set``) and, in a
  subprocess, ``python -m comfyui_mace run API.json --set ...`` on the tiny checkpoint.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import comfy_harness as ch

REPO = ch.REPO_ROOT
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
IDS = [p.name for p in WORKFLOWS]

ch.load_pack_package()
cli = importlib.import_module(f"{ch.PACK_PACKAGE}.headless.cli")

# Stock node types that the pack's workflows may use, for when no ComfyUI checkout is around.
STOCK_FALLBACK = {
    "CheckpointLoaderSimple", "CheckpointSave", "CLIPTextEncode", "CLIPSetLastLayer",
    "ConditioningCombine", "ConditioningConcat", "EmptyLatentImage", "KSampler",
    "KSamplerAdvanced", "VAEDecode", "VAEEncode", "VAELoader", "SaveImage", "PreviewImage",
    "LoadImage", "ImageScale", "ImageBatch", "ImageStitch", "LoraLoader", "LoraLoaderModelOnly",
    "PreviewAny", "StringConcatenate", "PrimitiveString", "PrimitiveInt", "PrimitiveFloat",
    "PrimitiveBoolean", "LatentUpscale",
}


def our_node_ids() -> set[str]:
    ids = set()
    for p in (REPO / "nodes").glob("*.py"):
        ids.update(re.findall(r"node_id\s*=\s*[\"'](\w+)[\"']", p.read_text(encoding="utf-8")))
    return ids


def _comfy_source_texts() -> list[str] | None:
    root = ch.find_comfyui()
    if root is None:
        return None
    files = [root / "nodes.py"] + sorted((root / "comfy_extras").glob("*.py"))
    return [f.read_text(encoding="utf-8", errors="replace") for f in files if f.is_file()]


def is_stock_node(name: str, texts: list[str] | None) -> bool:
    if texts is None:
        return name in STOCK_FALLBACK
    pat = re.compile(rf"[\"']{re.escape(name)}[\"']\s*:|node_id\s*=\s*[\"']{re.escape(name)}[\"']")
    return any(pat.search(t) for t in texts)


# --------------------------------------------------------------------------------------------
# Plain tests
# --------------------------------------------------------------------------------------------

def test_there_are_workflows():
    assert WORKFLOWS, "workflows/ holds no *.json"


# The folder names ComfyUI's template route scans (app/custom_node_manager.py, 0.3.64).
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")


def _template_folder_names() -> tuple[str, ...]:
    """From the ComfyUI checkout when there is one (so a newer ComfyUI's list is used)."""
    comfy = ch.find_comfyui()
    src = comfy / "app" / "custom_node_manager.py" if comfy else None
    if src is not None and src.is_file():
        m = re.search(r"example_workflow_folder_names\s*=\s*\[([^\]]*)\]", src.read_text())
        if m:
            return tuple(re.findall(r"[\"']([^\"']+)[\"']", m.group(1)))
    return TEMPLATE_FOLDERS


def test_template_browser_lists_each_workflow_once():
    names = _template_folder_names()
    assert "workflows" in names
    listed = [f"{d}/{p.name}" for d in names for p in sorted((REPO / d).glob("*.json"))]
    assert len(listed) == len(WORKFLOWS) and all(x.startswith("workflows/") for x in listed), listed


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_json_is_consistent_ui_format(path):
    ui = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(ui.get("nodes"), list) and ui["nodes"], "not UI format (no 'nodes')"
    nodes = {int(n["id"]): n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]), "duplicate node ids"
    links = {}
    for link in ui.get("links", []):
        lid, fn, fs, tn, ts, typ = link[:6]
        assert lid not in links, f"duplicate link id {lid}"
        links[lid] = link
        assert fn in nodes and tn in nodes, f"link {lid} refers to a missing node"
        out = nodes[fn]["outputs"][fs]
        inp = nodes[tn]["inputs"][ts]
        assert lid in (out.get("links") or []), f"link {lid} missing from node {fn} output {fs}"
        assert inp.get("link") == lid, f"node {tn} input {ts} does not point at link {lid}"
        assert typ == out["type"], f"link {lid} type {typ} != node {fn} output type {out['type']}"
        assert inp["type"] in (typ, "*"), f"link {lid} type {typ} into input type {inp['type']}"
    for n in ui["nodes"]:
        for inp in n.get("inputs") or []:
            assert inp.get("link") is None or inp["link"] in links, \
                f"node {n['id']} input {inp['name']} points at a missing link"
        for out in n.get("outputs") or []:
            for lid in out.get("links") or []:
                assert lid in links, f"node {n['id']} output {out['name']} lists missing link {lid}"
    assert ui.get("last_node_id", 0) >= max(nodes)
    assert ui.get("last_link_id", 0) >= max(links, default=0)


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_uses_only_stock_and_pack_nodes(path):
    ui = json.loads(path.read_text(encoding="utf-8"))
    ours = our_node_ids()
    assert {"MaceRefineCrossAttention", "MaceSaveErasure"} <= ours
    texts = _comfy_source_texts()
    foreign = sorted({n["type"] for n in ui["nodes"]
                      if n["type"] not in ours and n["type"] not in ch.FRONTEND_ONLY
                      and not is_stock_node(n["type"], texts)})
    where = "the ComfyUI checkout" if texts is not None else "the static stock list"
    assert not foreign, f"node types neither this pack's nor stock ({where}): {foreign}"


def _object_info():
    """Minimal /object_info-style node definitions for the plain --set tests."""
    return {
        "KSampler": {"input": {"required": {
            "model": ["MODEL"], "seed": ["INT", {"min": 0}], "steps": ["INT", {"min": 1}],
            "cfg": ["FLOAT", {}], "sampler_name": [["euler", "ddim"]], "positive": ["CONDITIONING"],
            "denoise": ["FLOAT", {}]}}, "output": ["LATENT"]},
        "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}],
                                                  "clip": ["CLIP"]}}, "output": ["CONDITIONING"]},
    }


def _prompt():
    return {
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "cfg": 7.0,
                                                   "sampler_name": "euler", "model": ["4", 0],
                                                   "positive": ["6", 0], "denoise": 1.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["4", 1]},
              "_meta": {"title": "positive"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "b", "clip": ["4", 1]}},
    }


def test_set_overrides_resolve_nodes_and_parse_values():
    p = _prompt()
    done = cli.apply_overrides(p, ["KSampler.steps=4", "3.cfg=5", "positive.text=true",
                                   "7.text=a cat, 8k", "KSampler.sampler_name=ddim",
                                   "KSampler.denoise=1", 'KSampler.model=["9", 0]'],
                               _object_info())
    assert p["3"]["inputs"]["steps"] == 4
    assert p["3"]["inputs"]["cfg"] == 5.0 and isinstance(p["3"]["inputs"]["cfg"], float)
    assert p["6"]["inputs"]["text"] == "true"          # STRING input keeps the text
    assert p["7"]["inputs"]["text"] == "a cat, 8k"
    assert p["3"]["inputs"]["sampler_name"] == "ddim"
    assert p["3"]["inputs"]["model"] == ["9", 0]      # JSON list: a link
    assert [d[:2] for d in done][:3] == [("3", "steps"), ("3", "cfg"), ("6", "text")]


@pytest.mark.parametrize("item, needle", [
    ("KSampler.stepz=3", "has no input 'stepz'; its inputs: model, seed, steps, cfg"),
    ("CLIPTextEncode.text=x", "matches 2 nodes"),
    ("Nope.text=x", "no node 'Nope'"),
    ("steps=3", "expected NODE.FIELD=VALUE"),
    ("KSampler.steps", "expected NODE.FIELD=VALUE"),
])
def test_set_errors_name_the_node_and_field(item, needle):
    with pytest.raises(cli.UsageError) as exc:
        cli.apply_overrides(_prompt(), [item], _object_info())
    assert needle in str(exc.value)
    if "Nope" in item:
        assert "3 (KSampler)" in str(exc.value) and "positive" in str(exc.value)


def test_cli_without_comfyui_exits_2_with_instructions(tmp_path):
    wf = tmp_path / "w.json"
    wf.write_text("{}")
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    r = subprocess.run([sys.executable, str(REPO), "run", str(wf), "--comfyui",
                        str(tmp_path / "no-comfy")], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert "ComfyUI not found" in r.stderr and "--comfyui" in r.stderr \
        and "COMFYUI_PATH" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# --------------------------------------------------------------------------------------------
# Integration: real ComfyUI
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_matches_node_schemas(comfy, path):
    comfy.require_pack()
    problems = ch.check_ui_workflow(path)
    assert problems == [], "\n".join(problems)
    api = ch.ui_workflow_to_api(path)
    assert api
    problems = ch.check_api_prompt(api)
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_values_pass_comfy_validation(comfy, path, monkeypatch):
    """ComfyUI's own validate_prompt on the converted workflow: widget values within the
    declared ranges/options.  File combos (checkpoints, LoRAs) list the referenced names."""
    import execution
    import folder_paths

    comfy.require_pack()
    api = ch.ui_workflow_to_api(path)
    names = {v for node in api.values() for k, v in node["inputs"].items()
             if isinstance(v, str) and k.endswith("_name")}
    real = folder_paths.get_filename_list
    monkeypatch.setattr(folder_paths, "get_filename_list",
                        lambda folder: sorted(set(real(folder)) | names))
    import asyncio

    res = asyncio.run(execution.validate_prompt("test-validate", api, None))
    ok, err, _outputs, node_errors = res[:4]
    from comfyui_mace.headless.runner import format_node_errors

    assert ok, format_node_errors(err, node_errors, api)


def test_cli_check_and_convert_in_process(comfy, capsys, tmp_path):
    comfy.require_pack()
    rc = cli.main(["check", *map(str, WORKFLOWS)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count(": OK (ui format") == len(WORKFLOWS)

    one = REPO / "workflows" / "erase_style_cfr.json"  # one KSampler: "KSampler.steps" names one node
    target = tmp_path / "api.json"
    rc = cli.main(["convert", str(one), "-o", str(target), "--set", "KSampler.steps=3"])
    assert rc == 0
    api = json.loads(target.read_text())
    want = ch.ui_workflow_to_api(one)
    ks = [k for k, v in want.items() if v["class_type"] == "KSampler"]
    for k in ks[:1]:
        want[k]["inputs"]["steps"] = 3
    assert api == want

    bad = json.loads(WORKFLOWS[0].read_text())
    bad["nodes"][0]["type"] = "NoSuchNode"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    rc = cli.main(["check", str(tmp_path / "bad.json")])
    assert rc == 1 and "unknown node type 'NoSuchNode'" in capsys.readouterr().out


def test_cli_run_reports_failures_in_process(comfy, tiny_ckpt, capsys, tmp_path):
    """A node that raises: exit status 1 and the exception text; a bad --set: status 2."""
    comfy.require_pack()
    prompt = {"1": {"class_type": "CheckpointLoaderSimple",
                    "inputs": {"ckpt_name": Path(tiny_ckpt).name}},
              "2": {"class_type": "MaceSaveErasure",
                    "inputs": {"model": ["1", 0], "filename_prefix": "loras/x", "dtype": "fp16"},
                    "_meta": {"title": "save it"}}}
    wf = tmp_path / "fails.json"
    wf.write_text(json.dumps(prompt))
    rc = cli.main(["run", str(wf), "-q"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "node 2 (MaceSaveErasure)" in err and "carries no MACE erasure" in err

    rc = cli.main(["run", str(wf), "-q", "--set", "save it.dtipe=fp32"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "node 2 (MaceSaveErasure, title 'save it') has no input 'dtipe'" in err
    assert "filename_prefix, dtype" in err

    rc = cli.main(["run", str(wf), "-q", "--set", "CheckpointLoaderSimple.ckpt_name=nope.ckpt"])
    err = capsys.readouterr().err
    assert rc == 1 and "ckpt_name" in err and "nope.ckpt" in err


def test_cli_run_subprocess_python_m(comfy, tiny_ckpt, tmp_path):
    """``python -m comfyui_mace run API.json --set ...`` in a fresh process (its own ComfyUI
    start, only this pack, a temp base directory) on the tiny checkpoint; < 60 s."""
    prompt = ch.stock_t2i_prompt(Path(tiny_ckpt).name, save=True, steps=2, prefix="unset")
    wf = tmp_path / "t2i_api.json"
    wf.write_text(json.dumps(prompt))
    (tmp_path / "pkgs").mkdir()
    (tmp_path / "pkgs" / "comfyui_mace").symlink_to(REPO, target_is_directory=True)
    out_dir = tmp_path / "out"
    env = dict(os.environ, COMFYUI_PATH=str(comfy.comfy_root), PYTHONPATH="")
    cmd = [sys.executable, "-m", "comfyui_mace", "run", str(wf),
           "--set", "KSampler.steps=1", "--set", "5.seed=7",
           "--set", "SaveImage.filename_prefix=mace_cli/run", "--set", "2.text=a red bicycle",
           "--base-directory", str(tmp_path / "base"), "--output-directory", str(out_dir),
           "--extra-model-dir", f"checkpoints={Path(tiny_ckpt).parent}", "--no-custom-nodes"]
    r = subprocess.run(cmd, cwd=tmp_path / "pkgs", capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    png = out_dir / "mace_cli" / "run_00001_.png"
    assert png.is_file(), r.stdout
    assert str(png) in r.stdout and f"output folder: {out_dir}" in r.stdout
    assert "set node 5 (KSampler) steps = 1" in r.stderr
    assert "running node 5 (KSampler)" in r.stderr and "node 5 (KSampler): 1/1" in r.stderr
    assert "MaceRefineCrossAttention" in r.stderr  # the pack was loaded
    assert not list((tmp_path / "base").glob("custom_nodes/*")), "wrote into the base dir"


def test_retarget_for_test_makes_default_steps_explicit():
    """0 means "the default" (50-120 LoRA steps) to the MACE training nodes; a test run must
    train ``max_steps``, never the default."""
    api = {"1": {"class_type": "MaceMassErase", "inputs": {"lora_steps": 0, "sampling_steps": 20,
                                                           "images_per_concept": 8,
                                                           "image_size": 512}},
           "2": {"class_type": "MaceTrainConceptLora", "inputs": {"steps": 0}},
           "3": {"class_type": "KSampler", "inputs": {"steps": 1}}}
    out = ch.retarget_for_test(api, "tiny.safetensors", max_steps=2)
    assert out["1"]["inputs"] == {"lora_steps": 2, "sampling_steps": 2, "images_per_concept": 2,
                                  "image_size": 64}
    assert out["2"]["inputs"]["steps"] == 2 and out["3"]["inputs"]["steps"] == 1
    assert api["1"]["inputs"]["lora_steps"] == 0  # the input is not modified


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_nodes_do_not_overlap(path):
    """Node rectangles as saved (title bar above ``pos``) are pairwise disjoint; the frontend
    only grows a node to fit its widgets, and tests/test_browser.py measures the real boxes."""
    title_h = 30
    nodes = json.loads(path.read_text())["nodes"]
    rects = [(n["id"], n["type"], n["pos"][0], n["pos"][1] - title_h, n["pos"][0] + n["size"][0],
              n["pos"][1] + n["size"][1]) for n in nodes]
    overlaps = [f"{a[1]} #{a[0]} / {b[1]} #{b[0]}" for i, a in enumerate(rects) for b in rects[i + 1:]
                if a[2] < b[4] and b[2] < a[4] and a[3] < b[5] and b[3] < a[5]]
    assert not overlaps, overlaps
