"""The pack imports the newest ComfyUI V3 API that exists (``nodes/comfy_compat.py``).

Plain tests drive :func:`import_newest_api` with fake modules; the integration tests load the
whole pack afresh in real ComfyUI with ``comfy_api.v0_0_2`` hidden (today's ComfyUI may drop
it) and with ``comfy_api.latest`` hidden (older builds), and check all nodes still load.
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import sys
import types
import uuid

import pytest

import comfy_harness as ch

COMPAT = ch.REPO_ROOT / "nodes" / "comfy_compat.py"


def _api_module(io_names=None):
    io_names = _IO_NAMES if io_names is None else io_names
    mod = types.ModuleType("api")
    mod.io = types.SimpleNamespace(**{n: object() for n in io_names})
    mod.ComfyExtension = object
    return mod


def _load_compat(monkeypatch):
    """comfy_compat.py loaded from its file with a fake ``comfy_api.latest`` (no ComfyUI)."""
    pkg = types.ModuleType("comfy_api")
    pkg.__path__ = []
    monkeypatch.setitem(sys.modules, "comfy_api", pkg)
    monkeypatch.setitem(sys.modules, "comfy_api.latest", _api_module(_ALL_NAMES))
    spec = importlib.util.spec_from_file_location(f"_compat_{uuid.uuid4().hex}", COMPAT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_ALL_NAMES = ("ComfyNode", "Schema", "NodeOutput", "Model", "Clip", "Vae", "Image", "Mask", "String",
              "Int", "Float", "Boolean", "Combo", "ClipVision")
_IO_NAMES = _ALL_NAMES


def _importer(available):
    def imp(name):
        if name not in available:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return available[name]
    return imp


def test_newest_api_is_preferred_and_older_ones_are_fallbacks(monkeypatch):
    c = _load_compat(monkeypatch)
    assert c.API_MODULE == "comfy_api.latest"
    assert tuple(c.IO_NAMES) == _ALL_NAMES
    both = {"comfy_api.latest": _api_module(), "comfy_api.v0_0_2": _api_module()}
    assert c.import_newest_api(importer=_importer(both))[0] == "comfy_api.latest"
    no_v002 = {"comfy_api.latest": _api_module()}
    assert c.import_newest_api(importer=_importer(no_v002))[0] == "comfy_api.latest"
    no_latest = {"comfy_api.v0_0_2": _api_module()}
    assert c.import_newest_api(importer=_importer(no_latest))[0] == "comfy_api.v0_0_2"
    # a `latest` that lost something we use is skipped, not half-used
    broken_latest = {"comfy_api.latest": _api_module(_ALL_NAMES[:-1]),
                     "comfy_api.v0_0_3": _api_module()}
    assert c.import_newest_api(importer=_importer(broken_latest))[0] == "comfy_api.v0_0_3"


def test_no_usable_api_is_one_clear_error(monkeypatch):
    c = _load_compat(monkeypatch)
    with pytest.raises(ImportError) as ei:
        c.import_newest_api(importer=_importer({"comfy_api.latest": _api_module(("Schema",))}))
    msg = str(ei.value)
    assert "ComfyUI >= 0.3.64" in msg and "lacks ComfyNode" in msg and "comfy_api.v0_0_2: " in msg


def test_key_patch_entries_of_old_and_new_comfyui(monkeypatch):
    import torch

    c = _load_compat(monkeypatch)
    w = torch.ones(2)
    weight, convert, patches = c.split_key_patch_entry([(w, None), "p1"])
    assert weight is w and convert(w) is w and patches == ["p1"]
    weight, convert, patches = c.split_key_patch_entry((w,))  # older ComfyUI: bare tensor
    assert weight is w and convert(w, inplace=True) is w and patches == []


# ---------------------------------------------------------------------------------------------
# Real ComfyUI: load the whole pack afresh with one API module hidden
# ---------------------------------------------------------------------------------------------

def _load_pack_fresh(comfy):
    name = f"mace_fresh_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(
        name, ch.REPO_ROOT / "__init__.py", submodule_search_locations=[str(ch.REPO_ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        nodes_pkg = importlib.import_module(f"{name}.nodes")
        ext = asyncio.run(mod.comfy_entrypoint())
        node_list = asyncio.run(ext.get_node_list())
        return nodes_pkg, node_list
    finally:
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            sys.modules.pop(k, None)


@pytest.mark.parametrize("hidden, expected", [
    (("comfy_api.v0_0_2",), "comfy_api.latest"),
    (("comfy_api.latest", "comfy_api.v0_0_3"), "comfy_api.v0_0_2"),
])
def test_pack_loads_with_an_api_version_hidden(comfy, monkeypatch, hidden, expected):
    comfy.require_pack()
    importlib.import_module("comfy_api.v0_0_2")  # cached before `latest` is hidden
    for h in hidden:
        monkeypatch.setitem(sys.modules, h, None)  # `import h` now raises ImportError
    nodes_pkg, node_list = _load_pack_fresh(comfy)
    assert nodes_pkg.comfy_compat.API_MODULE == expected
    assert len(node_list) == len(comfy.pack_node_ids) == len(nodes_pkg.NODES)  # every node, in either API
    for cls in node_list:  # every schema builds with the chosen API
        assert cls.GET_SCHEMA() is not None


def test_stock_lora_key_map_still_reads_our_erasure_keys(comfy, tiny_ckpt):
    """What the erasure files rely on: the stock loader maps ``diffusion_model.<module>`` to the
    attn2 K/V weight and reads ``.diff`` / ``.lora_up`` entries as patches."""
    import torch
    import comfy.lora

    model, _clip, _vae = ch.load_tiny_checkpoint(tiny_ckpt, clip_layers=1)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    kv = [k for k in model.model_state_dict() if k.endswith(".attn2.to_k.weight")]
    assert kv
    module = kv[0][: -len(".weight")]
    assert key_map.get(module) == kv[0]
    shape = model.model_state_dict()[kv[0]].shape
    sd = {module + ".diff": torch.zeros(shape)}
    patches = comfy.lora.load_lora(sd, {module: kv[0]})
    assert patches[kv[0]][0] == "diff"


def test_locale_labels_every_renamed_input(comfy):
    """The frontend (1.27) shows an input's id, not its ``display_name``; locales/en/nodeDefs.json
    (served by ComfyUI's /i18n) gives the label for every input whose display name differs."""
    import json

    comfy.require_pack()
    labels = json.loads((ch.REPO_ROOT / "locales" / "en" / "nodeDefs.json").read_text())
    want = {}
    for node_id in comfy.pack_node_ids:
        schema = comfy.nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        for inp in schema.inputs:
            if inp.display_name and inp.display_name != inp.id:
                want[(node_id, inp.id)] = inp.display_name
    assert want, "no renamed inputs found (lambda_ -> lambda expected)"
    have = {(n, i): v.get("name") for n, d in labels.items() for i, v in d.get("inputs", {}).items()}
    assert have == want


# ---------------------------------------------------------------------------------------------
# Newer ComfyUI shapes, with fakes that follow upstream's signatures (no ComfyUI needed)
# ---------------------------------------------------------------------------------------------

def test_private_user_directory_in_both_shapes(monkeypatch, tmp_path):
    c = _load_compat(monkeypatch)
    old = types.SimpleNamespace(get_user_directory=lambda: str(tmp_path))  # 0.3.64
    assert c.private_user_directory("mace_cache", old) == str(tmp_path / "mace_cache")
    new = types.SimpleNamespace(get_user_directory=lambda: str(tmp_path),  # later: not served over HTTP
                                get_system_user_directory=lambda name="system": str(tmp_path / f"__{name}"))
    assert c.private_user_directory("mace_cache", new) == str(tmp_path / "__mace_cache")


class _Patcher:
    def __init__(self, dynamic=None, delegate=None):
        if dynamic is not None:
            self.is_dynamic = lambda: dynamic
        if delegate is not None:
            self.get_non_dynamic_delegate = delegate
        self.model = object()

    def clone(self):
        out = _Patcher()
        out.model = self.model
        return out


def test_static_patcher_clones_legacy_and_demotes_dynamic(monkeypatch):
    c = _load_compat(monkeypatch)
    for legacy in (_Patcher(), _Patcher(dynamic=False)):  # 0.3.64 has no is_dynamic at all
        out = c.static_patcher(legacy)
        assert out is not legacy and out.model is legacy.model
    static = _Patcher(dynamic=False)
    assert c.static_patcher(_Patcher(dynamic=True, delegate=lambda: static)) is static


@pytest.mark.parametrize("delegate, reason", [
    (None, "offers no non-dynamic delegate"),
    (lambda: (_ for _ in ()).throw(RuntimeError("cached_patcher_init is not initialized")), "cached_patcher_init"),
    (lambda: _Patcher(dynamic=True), "delegate is dynamic too"),
])
def test_static_patcher_refuses_naming_the_flag(monkeypatch, delegate, reason):
    c = _load_compat(monkeypatch)
    with pytest.raises(c.DynamicVramUnsupported, match=f"^unet: .*{reason}.*--disable-dynamic-vram"):
        c.static_patcher(_Patcher(dynamic=True, delegate=delegate), "unet")


def test_check_core_names_every_missing_method(monkeypatch):
    c = _load_compat(monkeypatch)
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    patcher_mod = types.ModuleType("comfy.model_patcher")
    patcher_mod.ModelPatcher = type("ModelPatcher", (), {m: (lambda self: None) for m in c.PATCHER_METHODS
                                                         if m != "add_weight_wrapper"})
    lora = types.ModuleType("comfy.lora")
    for f in c.LORA_FUNCTIONS:
        setattr(lora, f, lambda *a: None)
    comfy.model_patcher, comfy.lora = patcher_mod, lora
    for name, mod in (("comfy", comfy), ("comfy.model_patcher", patcher_mod), ("comfy.lora", lora)):
        monkeypatch.setitem(sys.modules, name, mod)
    with pytest.raises(c.ComfyUIIncompatible, match=r"lacks ModelPatcher\.add_weight_wrapper \("):
        c.check_core()


def test_input_checks_are_cached_per_node_type_not_per_run(comfy):
    """ComfyUI runs ``execute`` on a new locked clone of the node class every time; the schema cache
    must hit for those clones and hold one entry per node type."""
    from comfy_api.internal import lock_class, shallow_clone_class

    comfy.require_pack()
    validation = comfy.pack_module.nodes.validation
    cls = comfy.nodes.NODE_CLASS_MAPPINGS["MaceRefineCrossAttention"]
    validation._SCHEMA_CACHE.clear()
    for _ in range(5):
        validation.check_inputs(lock_class(shallow_clone_class(cls)), {})
    validation.check_inputs(cls, {})
    assert len(validation._SCHEMA_CACHE) == 1
    with pytest.raises(ValueError, match="lambda"):  # still checks
        validation.check_inputs(lock_class(shallow_clone_class(cls)), {"lambda_": float("nan")})


def test_quantised_weights_come_back_dequantised(monkeypatch):
    """Newer ComfyUI's fp8/nvfp4 checkpoints hold ``comfy.quant_ops.QuantizedTensor`` weights; the
    pack reads them dequantised (0.3.64 has no such module: weights pass unchanged)."""
    import torch

    c = _load_compat(monkeypatch)
    w = torch.ones(2)
    assert c.plain_weight(w) is w  # no comfy.quant_ops here
    quant = types.ModuleType("comfy.quant_ops")

    class QuantizedTensor:  # the upstream contract the pack uses: isinstance + dequantize()
        def dequantize(self):
            return torch.full((2,), 3.0)

    quant.QuantizedTensor = QuantizedTensor
    monkeypatch.setitem(sys.modules, "comfy.quant_ops", quant)
    assert c.plain_weight(w) is w
    weight, _convert, patches = c.split_key_patch_entry([(QuantizedTensor(), None), "p"])
    assert torch.equal(weight, torch.full((2,), 3.0)) and patches == ["p"]
