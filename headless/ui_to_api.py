"""UI-format workflow (what the ComfyUI frontend saves) -> API-format prompt, and workflow lints.

Plain Python: nothing here imports ComfyUI.  Node definitions come from ``node_info``: either
``{class_name: node_class}`` (``nodes.NODE_CLASS_MAPPINGS``; the default once ComfyUI has been
imported, see :func:`comfy_node_classes`) or ``/object_info`` JSON.

* :func:`ui_workflow_to_api` -- convert, the way the frontend would queue it.
* :func:`check_ui_workflow` -- unknown node types, mistyped/dangling links, wrong widget-value
  counts, unconnected required sockets, subgraphs.
* :func:`check_api_prompt` -- the same kind of lint for an API-format prompt.
* :func:`load_workflow` -- read a JSON file and tell the two formats apart.

The test harness (``tests/comfy_harness.py``) re-exports these, so there is one copy.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping


def comfy_node_classes() -> dict[str, type]:
    """``nodes.NODE_CLASS_MAPPINGS`` of the ComfyUI imported in this process.

    Raises ``RuntimeError`` when ComfyUI has not been imported (pass ``node_info=`` instead).
    """
    mod = sys.modules.get("nodes")
    mapping = getattr(mod, "NODE_CLASS_MAPPINGS", None)
    if not isinstance(mapping, dict):
        raise RuntimeError("ComfyUI is not imported in this process: initialise it first "
                           "(headless.bootstrap.bootstrap) or pass node_info=")
    return dict(mapping)


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
_UPLOAD_OPTS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
MODE_MUTED, MODE_BYPASS = 2, 4


@dataclass
class _Spec:
    inputs: list[tuple[str, Any, dict]]      # (name, type, options) in required+optional order
    outputs: list[str]


def _node_specs(node_info, only=None) -> dict[str, _Spec]:
    """Accept NODE_CLASS_MAPPINGS-like ``{name: cls}`` or ``/object_info`` JSON.  ``only``: the
    node types needed (INPUT_TYPES of other nodes is not called: it may list folders)."""
    if node_info is None:
        node_info = comfy_node_classes()
    specs = {}
    for name, v in node_info.items():
        if only is not None and name not in only:
            continue
        if isinstance(v, Mapping):  # /object_info entry
            inp = v.get("input", {})
            order = v.get("input_order")
            items = []
            for sec in ("required", "optional"):
                d = inp.get(sec, {}) or {}
                keys = (order or {}).get(sec, list(d.keys()))
                for k in keys:
                    if k in d:
                        items.append((k,) + _split(d[k]))
            specs[name] = _Spec(items, list(v.get("output", [])))
        else:
            it = v.INPUT_TYPES()
            items = []
            for sec in ("required", "optional"):
                for k, spec in (it.get(sec) or {}).items():
                    items.append((k,) + _split(spec))
            specs[name] = _Spec(items, list(getattr(v, "RETURN_TYPES", ()) or ()))
    return specs


def _split(spec) -> tuple[Any, dict]:
    if isinstance(spec, (list, tuple)):
        typ = spec[0] if spec else "*"
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
        return typ, dict(opts)
    return spec, {}


def _type_name(typ) -> str:
    return "COMBO" if isinstance(typ, (list, tuple)) else str(typ)


def _is_widget(typ, opts) -> bool:
    if opts.get("forceInput"):
        return False
    return _type_name(typ) in WIDGET_TYPES


def _n_widget_values(name, typ, opts) -> int:
    tn = _type_name(typ)
    n = 1
    if tn == "INT":
        if opts.get("control_after_generate", name in ("seed", "noise_seed")):
            n += 1
    elif tn == "COMBO":
        if opts.get("control_after_generate"):
            n += 1
        if any(opts.get(k) for k in _UPLOAD_OPTS):
            n += 1
    return n


def _links_by_id(ui) -> dict[int, tuple]:
    out = {}
    for l in ui.get("links", []) or []:
        if isinstance(l, Mapping):
            t = (l["id"], l["origin_id"], l["origin_slot"], l["target_id"], l["target_slot"],
                 l.get("type"))
        else:
            t = tuple(l[:6])
        out[int(t[0])] = t
    return out


def _types_match(a, b) -> bool:
    a, b = str(a), str(b)
    if a == b or "*" in (a, b):
        return True
    return bool(set(a.split(",")) & set(b.split(",")))


def ui_workflow_to_api(ui_json: Mapping | str | os.PathLike, node_info=None) -> dict:
    """Convert a UI-format workflow (what the frontend saves) to an API-format prompt.

    ``node_info``: ``{class_name: node_class}`` (e.g. ``nodes.NODE_CLASS_MAPPINGS``; default:
    the initialised harness's) or ``/object_info`` JSON.  Widget values are mapped onto the
    widget inputs in INPUT_TYPES order (required, then optional), skipping socket-only inputs
    and the extra ``control_after_generate`` value after ``seed``/``noise_seed`` INT widgets.
    Linked inputs (including widgets converted to sockets) become ``[from_node, from_slot]``.
    Muted nodes (mode 2) and Notes are dropped; bypassed nodes (mode 4) and Reroutes are
    passed through; PrimitiveNode values are copied into their targets.
    Subgraphs/group nodes are not supported (:func:`check_ui_workflow` reports them).
    """
    ui = _load_ui(ui_json)
    specs = _node_specs(node_info, _ui_types(ui))
    links = _links_by_id(ui)
    by_id = {int(n["id"]): n for n in ui.get("nodes", [])}

    def resolve(from_node: int, from_slot: int, want_type=None, seen=None):
        """Follow Reroute / bypassed nodes back to a real source; None for a Primitive."""
        seen = seen or set()
        n = by_id.get(int(from_node))
        if n is None or int(from_node) in seen:
            return None
        seen.add(int(from_node))
        typ = n.get("type")
        if typ == "PrimitiveNode":
            return ("primitive", n)
        if typ == "Reroute" or n.get("mode") == MODE_BYPASS:
            ins = n.get("inputs") or []
            out_type = None
            outs = n.get("outputs") or []
            if from_slot < len(outs):
                out_type = outs[from_slot].get("type")
            cands = [i for i in ins if i.get("link") is not None]
            if typ != "Reroute":
                cands = [i for i in cands if _types_match(i.get("type"), out_type or want_type)]
            if not cands:
                return None
            l = links[int(cands[0]["link"])]
            return resolve(l[1], l[2], want_type, seen)
        if n.get("mode") == MODE_MUTED:
            return None
        return (str(int(from_node)), int(from_slot))

    api: dict[str, dict] = {}
    for n in ui.get("nodes", []):
        typ = n.get("type")
        if typ in FRONTEND_ONLY or n.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        if typ not in specs:
            raise KeyError(f"node {n.get('id')}: unknown node type {typ!r}")
        spec = specs[typ]
        inputs: dict[str, Any] = {}
        wv = n.get("widgets_values")
        if isinstance(wv, Mapping):
            for name, t, o in spec.inputs:
                if _is_widget(t, o) and name in wv:
                    inputs[name] = wv[name]
        else:
            wv = list(wv or [])
            i = 0
            for name, t, o in spec.inputs:
                if not _is_widget(t, o):
                    continue
                if i < len(wv):
                    inputs[name] = wv[i]
                i += _n_widget_values(name, t, o)
        for inp in n.get("inputs") or []:
            if inp.get("link") is None:
                continue
            l = links.get(int(inp["link"]))
            if l is None:
                continue
            src = resolve(l[1], l[2], inp.get("type"))
            if src is None:  # muted / dangling source: a widget keeps its own value
                continue
            if src[0] == "primitive":
                pv = src[1].get("widgets_values") or []
                if pv:
                    inputs[inp["name"]] = pv[0]
                continue
            inputs[inp["name"]] = [src[0], src[1]]
        entry = {"class_type": typ, "inputs": inputs}
        if n.get("title"):
            entry["_meta"] = {"title": n["title"]}
        api[str(int(n["id"]))] = entry
    return api


def _ui_types(ui) -> set:
    return {n.get("type") for n in ui.get("nodes", []) or []}


def _load_ui(ui_json) -> dict:
    if isinstance(ui_json, (str, os.PathLike)) and not str(ui_json).lstrip().startswith("{"):
        with open(ui_json, encoding="utf-8") as fh:
            return json.load(fh)
    if isinstance(ui_json, str):
        return json.loads(ui_json)
    return dict(ui_json)


def check_ui_workflow(ui_json, node_info=None) -> list[str]:
    """Problems in a UI-format workflow: unknown node types, links whose type does not match
    the declared output/input type, dangling links, wrong widget-value counts, unconnected
    required sockets, subgraphs.  An empty list means it looks loadable and runnable."""
    ui = _load_ui(ui_json)
    specs = _node_specs(node_info, _ui_types(ui))
    problems: list[str] = []
    by_id = {int(n["id"]): n for n in ui.get("nodes", [])}
    links = _links_by_id(ui)
    if (ui.get("definitions") or {}).get("subgraphs"):
        problems.append("workflow contains subgraphs (not supported by ui_workflow_to_api)")

    for n in ui.get("nodes", []):
        nid, typ = n.get("id"), n.get("type")
        if typ in FRONTEND_ONLY:
            continue
        if typ not in specs:
            problems.append(f"node {nid}: unknown node type {typ!r}")
            continue
        spec = specs[typ]
        names = {nm for nm, _, _ in spec.inputs}
        wv = n.get("widgets_values")
        if wv is not None and not isinstance(wv, Mapping):
            want = sum(_n_widget_values(nm, t, o) for nm, t, o in spec.inputs if _is_widget(t, o))
            # A workflow saved before optional widgets were added at the end lacks their values;
            # the frontend (and ui_workflow_to_api) then use the defaults.
            required = set(_required_names(spec, node_info, typ))
            ok, count = {want}, 0
            for nm, t, o in spec.inputs:
                if not _is_widget(t, o):
                    continue
                if nm not in required and all(nm2 not in required for nm2 in _later_widgets(spec, nm)):
                    ok.add(count)
                count += _n_widget_values(nm, t, o)
            if len(wv) not in ok:
                problems.append(f"node {nid} ({typ}): {len(wv)} widgets_values, expected {want}")
        linked = set()
        for inp in n.get("inputs") or []:
            if inp.get("name") not in names:
                problems.append(f"node {nid} ({typ}): input {inp.get('name')!r} is not declared")
            if inp.get("link") is not None:
                linked.add(inp.get("name"))
        if n.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        for nm, t, o in spec.inputs:
            if nm in linked or _is_widget(t, o):
                continue
            if any(nm == k for k in _required_names(spec, node_info, typ)):
                problems.append(f"node {nid} ({typ}): required input {nm!r} is not connected")

    for lid, (_, fn, fs, tn, ts, ltype) in links.items():
        src, dst = by_id.get(int(fn)), by_id.get(int(tn))
        if src is None or dst is None:
            problems.append(f"link {lid}: refers to a missing node ({fn} -> {tn})")
            continue
        if src.get("type") in specs:
            outs = specs[src["type"]].outputs
            if fs >= len(outs):
                problems.append(f"link {lid}: node {fn} ({src['type']}) has no output slot {fs}")
            elif ltype is not None and not _types_match(outs[fs], ltype):
                problems.append(f"link {lid}: type {ltype} but node {fn} ({src['type']}) output "
                                f"{fs} is {outs[fs]}")
        if dst.get("type") in specs:
            dins = dst.get("inputs") or []
            if ts >= len(dins):
                problems.append(f"link {lid}: node {tn} ({dst['type']}) has no input slot {ts}")
                continue
            iname = dins[ts].get("name")
            decl = {nm: t for nm, t, _ in specs[dst["type"]].inputs}
            if iname in decl:
                dt = _type_name(decl[iname])
                if ltype is not None and not _types_match(dt, ltype):
                    problems.append(f"link {lid}: type {ltype} into node {tn} ({dst['type']}) "
                                    f"input {iname!r} of type {dt}")
                if src.get("type") in specs and fs < len(specs[src["type"]].outputs):
                    st = specs[src["type"]].outputs[fs]
                    if not _types_match(st, dt):
                        problems.append(f"link {lid}: {src['type']} output {st} -> {dst['type']}"
                                        f".{iname} ({dt})")
            if dins[ts].get("link") != lid:
                problems.append(f"link {lid}: node {tn} input slot {ts} points at link "
                                f"{dins[ts].get('link')}")
    return problems


def _later_widgets(spec: _Spec, name: str) -> list[str]:
    """Widget inputs declared after ``name``."""
    names = [nm for nm, t, o in spec.inputs if _is_widget(t, o)]
    return names[names.index(name) + 1:]


def _required_names(spec: _Spec, node_info, typ) -> list[str]:
    if node_info is None:
        node_info = comfy_node_classes()
    v = node_info[typ]
    if isinstance(v, Mapping):
        return list((v.get("input", {}).get("required") or {}).keys())
    return list((v.INPUT_TYPES().get("required") or {}).keys())


# --------------------------------------------------------------------------------------------
# API-format prompts
# --------------------------------------------------------------------------------------------

def is_api_prompt(data) -> bool:
    """``{node_id: {"class_type": ..., "inputs": {...}}, ...}`` (non-empty)."""
    return (isinstance(data, Mapping) and len(data) > 0
            and all(isinstance(v, Mapping) and isinstance(v.get("class_type"), str)
                    for v in data.values()))


def is_ui_workflow(data) -> bool:
    return isinstance(data, Mapping) and isinstance(data.get("nodes"), list)


def load_workflow(path_or_json) -> tuple[str, dict]:
    """Read a workflow file (or JSON text / dict): ``("ui", workflow)`` or ``("api", prompt)``.

    Also accepts the body of a ``POST /prompt`` (``{"prompt": {...}, ...}``).  Raises
    ``ValueError`` for anything else.
    """
    data = _load_ui(path_or_json)
    if is_ui_workflow(data):
        return "ui", data
    if isinstance(data, Mapping) and is_api_prompt(data.get("prompt")):
        return "api", {str(k): dict(v) for k, v in data["prompt"].items()}
    if is_api_prompt(data):
        return "api", {str(k): dict(v) for k, v in data.items()}
    raise ValueError("not a ComfyUI workflow: expected the UI format (an object with a 'nodes' "
                     "list) or the API format ({node_id: {'class_type': ..., 'inputs': {...}}})")


def _is_link(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def check_api_prompt(prompt: Mapping, node_info=None) -> list[str]:
    """Problems in an API-format prompt: unknown class types, links to missing nodes or output
    slots, link types that do not match the declared input type, missing required inputs.
    (Widget values are checked by ComfyUI's own ``execution.validate_prompt``.)"""
    specs = _node_specs(node_info, {n.get("class_type") for n in prompt.values()})
    problems: list[str] = []
    for nid, node in prompt.items():
        typ = node.get("class_type")
        if typ not in specs:
            problems.append(f"node {nid}: unknown node type {typ!r}")
            continue
        spec = specs[typ]
        decl = {nm: t for nm, t, _ in spec.inputs}
        inputs = node.get("inputs") or {}
        for name, value in inputs.items():
            if not _is_link(value):
                continue
            src = prompt.get(str(value[0]))
            if src is None:
                problems.append(f"node {nid} ({typ}) input {name!r}: links to missing node {value[0]}")
                continue
            stype = src.get("class_type")
            if stype not in specs:
                continue
            outs = specs[stype].outputs
            if value[1] >= len(outs) or value[1] < 0:
                problems.append(f"node {nid} ({typ}) input {name!r}: node {value[0]} ({stype}) has "
                                f"no output slot {value[1]}")
            elif name in decl and not _types_match(outs[value[1]], _type_name(decl[name])):
                problems.append(f"node {nid} ({typ}) input {name!r} ({_type_name(decl[name])}): "
                                f"linked to {stype} output {value[1]} ({outs[value[1]]})")
        for name in _required_names(spec, node_info, typ):
            if name not in inputs:
                problems.append(f"node {nid} ({typ}): required input {name!r} is missing")
    return problems


def node_input_types(class_type: str, node_info=None) -> dict[str, str]:
    """``{input name: type name}`` (required, then optional; COMBO for option lists) of a node
    type; empty when the type is unknown."""
    spec = _node_specs(node_info, {class_type}).get(class_type)
    return {} if spec is None else {nm: _type_name(t) for nm, t, _ in spec.inputs}
