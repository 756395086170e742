"""Help inside ComfyUI and the common jobs in a few widgets.

Plain (no ComfyUI): the preset table (``nodes/presets.py``) is well formed and ``resolve`` runs
the preset's values under a preset, the widgets' under ``custom``, naming what it overrode.

Integration (real ComfyUI, ``comfy`` fixture):
* every node has a description saying what it does and when to use it, every input and output a
  tooltip;
* the preset nodes: every governed input is advanced and its schema default is the table's
  ``recommended`` value; ``preset`` is the last input, optional, default ``recommended``; an API
  prompt without it runs as ``custom`` (the ``execute`` default);
* the advanced flag reaches ``INPUT_TYPES`` (what /object_info serves) on this ComfyUI;
* the common jobs' nodes show at most 10 inputs once advanced ones are hidden (newer frontends);
* the shipped workflows saved before ``preset`` existed (its value dropped) still check and
  convert, their values landing on the same inputs;
* ``web/docs/<node_id>.md`` are what ``scripts/build_node_docs.py`` writes now.
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import re
import sys
import types

import pytest

import comfy_harness as ch

REPO = ch.REPO_ROOT
PRESET_NODES = ("MaceRefineCrossAttention", "MaceMassErase", "MaceGatedErasure", "MaceErasureCheck")
# The decision table's jobs: one style (CFR), many names (Mass Erase), the gates, save/share, the check.
JOB_NODES = ("MaceRefineCrossAttention", "MaceMassErase", "MaceGatedErasure", "MaceTextGate", "MaceSaveErasure",
             "MaceLoadErasure", "MaceErasureCheck")
MAX_VISIBLE = 10
# inputs added after the preset (a saved workflow's widget values are positional)
AFTER_PRESET = {"MaceRefineCrossAttention": ("relative_lambda",), "MaceMassErase": ("relative_lambda",)}


def _load_presets(monkeypatch):
    """nodes/presets.py with stand-ins for its pack imports (no ComfyUI)."""
    pkg = "_presets_pkg"
    for name, attrs in {pkg: {}, f"{pkg}.mace_ops": {},
                        f"{pkg}.mace_ops.ace": {"ACEConfig": lambda: types.SimpleNamespace(
                            rank=8, quantile=0.999, margin=0.0, temperature=0.005, open_rate=0.05, gate="ramp")},
                        f"{pkg}.mace_ops.lora_train": {"DEFAULT_LORA_PRESERVE": 0.0, "DEFAULT_NULL_SPACE": 0.99,
                                                       "DEFAULT_QUERY_SAMPLES": 8},
                        f"{pkg}.mace_ops.cfr": {"PACK_LAMBDA": 0.1, "PACK_RELATIVE_LAMBDA": True},
                        f"{pkg}.nodes": {}, f"{pkg}.nodes.prior_input": {"DEFAULT_PRIOR_WEIGHT": 1.0},
                        f"{pkg}.nodes.comfy_compat": {"io": types.SimpleNamespace()}}.items():
        mod = types.ModuleType(name)
        mod.__path__ = []
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location(f"{pkg}.nodes.presets", REPO / "nodes" / "presets.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_preset_table_is_well_formed(monkeypatch):
    p = _load_presets(monkeypatch)
    for node, rows in p.PRESETS.items():
        assert p.RECOMMENDED in rows and p.CUSTOM not in rows
        for name, row in rows.items():
            assert list(row) == list(p.governed(node)), (node, name)  # every preset sets every governed input
            assert p.NOTES.get((node, name)), f"no note for preset {name!r} of {node}"
        assert p.choices(node)[0] == p.RECOMMENDED and p.choices(node)[-1] == p.CUSTOM
    assert p.PRESETS["MaceMassErase"]["paper"]["lora_null_space"] == 0.0
    assert p.PRESETS["MaceRefineCrossAttention"]["paper"]["erase_concept_tokens"] is False


def test_resolve_runs_the_preset_and_names_what_it_overrode(monkeypatch):
    p = _load_presets(monkeypatch)
    node = "MaceRefineCrossAttention"
    widgets = {**p.PRESETS[node][p.RECOMMENDED], "lambda_": 5.0}
    rec = p.resolve(node, "recommended", widgets)
    assert rec["lambda_"] == 0.1 and rec.ignored == {"lambda_": 5.0}
    custom = p.resolve(node, "custom", widgets)
    assert custom["lambda_"] == 5.0 and custom.ignored == {}
    paper = p.resolve(node, "paper", widgets)
    assert paper["erase_concept_tokens"] is False and set(paper.ignored) == {"lambda_", "erase_concept_tokens"}
    text = p.settings_text(rec, {"concept_type": "style", "erase_from": ""})
    assert text.startswith("settings: preset=recommended; lambda=0.1, relative_lambda=True, preserve_scale=1,")
    assert "concept_type='style'" in text and "erase_from=''" in text
    assert "ignored under preset 'recommended' (choose preset 'custom' to apply): lambda=5" in text
    with pytest.raises(ValueError, match="preset: unknown 'fast'"):
        p.resolve(node, "fast", widgets)


# --------------------------------------------------------------------------------------------
# Integration
# --------------------------------------------------------------------------------------------

def _schema(comfy, node_id):
    return comfy.nodes.NODE_CLASS_MAPPINGS[node_id].define_schema()


def _pack(comfy):
    comfy.require_pack()
    return comfy.pack_module


def test_every_node_says_what_and_when_and_every_input_has_a_tooltip(comfy):
    _pack(comfy)
    problems = []
    for node_id in comfy.pack_node_ids:
        s = _schema(comfy, node_id)
        sentences = re.split(r"(?<=[.)])\s+(?=[A-Z])", s.description.strip())
        if len(sentences) < 2 or not any(x.startswith("Use it") for x in sentences[1:]):
            problems.append(f"{node_id}: description lacks a 'Use it ...' sentence after what it does")
        problems += [f"{node_id}.{i.id}: no tooltip" for i in s.inputs if not (i.tooltip or "").strip()]
        problems += [f"{node_id} output {o.display_name}: no tooltip" for o in s.outputs
                     if not (o.tooltip or "").strip()]
    assert not problems, "\n".join(problems)


def test_preset_nodes_govern_advanced_inputs_with_the_table_defaults(comfy):
    pack = _pack(comfy)
    presets, compat = pack.nodes.presets, pack.nodes.comfy_compat
    assert set(presets.PRESETS) == set(PRESET_NODES)
    for node_id in PRESET_NODES:
        cls = comfy.nodes.NODE_CLASS_MAPPINGS[node_id]
        inputs = {i.id: i for i in cls.define_schema().inputs}
        schema_inputs = cls.define_schema().inputs
        last = schema_inputs[-1 - len(AFTER_PRESET.get(node_id, ()))]   # the preset comes last but for later inputs
        assert [i.id for i in schema_inputs[len(schema_inputs) - len(AFTER_PRESET.get(node_id, ())):]] == \
            list(AFTER_PRESET.get(node_id, ()))
        assert last.id == "preset" and last.optional and last.default == "recommended"
        assert list(last.options) == presets.choices(node_id)
        assert inspect.signature(cls.execute).parameters["preset"].default == "custom"
        for key, value in presets.PRESETS[node_id]["recommended"].items():
            inp = inputs[key]
            assert compat.is_advanced(inp), f"{node_id}.{key} is governed by the preset but not advanced"
            assert inp.default == value, f"{node_id}.{key}: schema default {inp.default!r} != recommended {value!r}"
            options = getattr(inp, "options", None)
            for row in presets.PRESETS[node_id].values():
                if options is not None:
                    assert row[key] in options, (node_id, key, row[key])
                else:
                    lo, hi = getattr(inp, "min", None), getattr(inp, "max", None)
                    assert (lo is None or row[key] >= lo) and (hi is None or row[key] <= hi), (node_id, key)


def test_advanced_flag_reaches_object_info(comfy):
    """ComfyUI serves ``INPUT_TYPES()`` as /object_info: the flag is there on this ComfyUI
    (0.3.64: through the input's extra_dict; newer: its ``advanced`` field)."""
    _pack(comfy)
    spec = comfy.nodes.NODE_CLASS_MAPPINGS["MaceMassErase"].INPUT_TYPES()
    every = {**spec.get("required", {}), **spec.get("optional", {})}
    assert every["lora_null_space"][1].get("advanced") is True
    assert every["cfr_lambda"][1].get("advanced") is True
    assert "advanced" not in every["concepts"][1] and "advanced" not in every["preset"][1]
    json.dumps(spec, default=str)


def test_advanced_helper_in_both_api_shapes(comfy):
    compat = _pack(comfy).nodes.comfy_compat

    class Old:  # 0.3.64: no advanced field, an extra_dict merged by as_dict
        def __init__(self):
            self.extra_dict = {}

    class New:  # newer V3 API: Input(..., advanced=None)
        def __init__(self):
            self.extra_dict, self.advanced = {}, None

    old, new = compat.advanced(Old()), compat.advanced(New())
    assert old.extra_dict == {"advanced": True} and not hasattr(old, "advanced")
    assert new.advanced is True and new.extra_dict == {}
    assert compat.is_advanced(old) and compat.is_advanced(new) and not compat.is_advanced(Old())


def visible_inputs(comfy, node_id) -> list[str]:
    compat = comfy.pack_module.nodes.comfy_compat
    return [i.id for i in _schema(comfy, node_id).inputs if not compat.is_advanced(i)]


@pytest.mark.parametrize("node_id", JOB_NODES)
def test_common_jobs_fit_in_ten_visible_inputs(comfy, node_id):
    _pack(comfy)
    shown = visible_inputs(comfy, node_id)
    assert len(shown) <= MAX_VISIBLE, f"{node_id} shows {len(shown)} inputs: {shown}"


def _drop_preset(ui: dict) -> dict:
    """The workflow as saved before the preset input existed: no trailing preset value (nor the
    inputs added after it, ``AFTER_PRESET``)."""
    old = copy.deepcopy(ui)
    for n in old["nodes"]:
        if n["type"] in PRESET_NODES:
            values = n["widgets_values"][:len(n["widgets_values"]) - len(AFTER_PRESET.get(n["type"], ()))]
            assert values[-1] in ("recommended", "paper", "robust", "custom")
            n["widgets_values"] = values[:-1]
    return old


WITH_PRESET = [p for p in sorted((REPO / "workflows").glob("*.json"))
               if any(n["type"] in PRESET_NODES for n in json.loads(p.read_text())["nodes"])]


@pytest.mark.parametrize("path", WITH_PRESET, ids=lambda p: p.name)
def test_workflows_saved_before_the_preset_still_load(comfy, path):
    _pack(comfy)
    ui = json.loads(path.read_text())
    old = _drop_preset(ui)
    assert ch.check_ui_workflow(old) == []
    new_api, old_api = ch.ui_workflow_to_api(ui), ch.ui_workflow_to_api(old)
    for key, node in old_api.items():
        if node["class_type"] in PRESET_NODES:
            assert "preset" not in node["inputs"]  # runs as "custom": the values below, as before
            later = ("preset", *AFTER_PRESET.get(node["class_type"], ()))
            assert not set(later) & set(node["inputs"])    # the later inputs take execute's defaults
            want = {k: v for k, v in new_api[key]["inputs"].items() if k not in later}
            assert node["inputs"] == want
    assert ch.check_api_prompt(old_api) == []


def test_retarget_for_test_runs_the_capped_values():
    api = {"1": {"class_type": "MaceMassErase", "inputs": {"sampling_steps": 20, "preset": "recommended"}}}
    out = ch.retarget_for_test(api, "tiny.safetensors", max_steps=2)
    assert out["1"]["inputs"] == {"sampling_steps": 2, "preset": "custom"}


def test_help_pages_are_up_to_date(comfy):
    """web/docs/<node_id>.md = what scripts/build_node_docs.py writes from the schemas now."""
    _pack(comfy)
    spec = importlib.util.spec_from_file_location("_build_node_docs", REPO / "scripts" / "build_node_docs.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    classes = [comfy.nodes.NODE_CLASS_MAPPINGS[i] for i in comfy.pack_node_ids]
    presets, is_advanced = build.pack_modules(classes)
    pages = build.pages(classes, presets, is_advanced)
    assert sorted(pages) == sorted(f"{i}.md" for i in comfy.pack_node_ids)
    stale = build.stale_pages(pages)
    assert not stale, f"run `python scripts/build_node_docs.py`; out of date: {stale}"
    for name, text in pages.items():
        assert "## What it does" in text and "## Inputs" in text and "## Outputs" in text, name
