"""Integration (real ComfyUI): one file policy for every node (issue 34).

Every file-name input of every node in ``nodes.NODES`` is found from the schemas; each must be
registered in ``nodes.paths.FILE_INPUTS`` (so a new node's file input cannot skip the policy),
and each gets the hostile set through the node's own ``execute``: absolute paths, '..', '~',
symlinks leading out of the folder, blank and hidden names, NUL bytes, a .pt target ending in
.safetensors. Every one is refused before any work, with a message that starts with the field,
never echoes a server path, and reads the same for a missing file as for one outside.
"""
from __future__ import annotations

import os
import re

import pytest

pytestmark = pytest.mark.integration
SECRET = "TOP-SECRET-34"
FILEISH = re.compile(r"path|file|prefix|dir|folder|(^|_)name$")
NOT_FILES = {"sampler_name"}  # sampler choices, not files


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    comfy.require_pack()
    secret_dir = tmp_path_factory.mktemp("server_private")
    for name in ("secret.txt", "secret.pt", "secret.safetensors", "victim.txt"):
        (secret_dir / name).write_text(SECRET)
    out, inp = comfy.output_dir, comfy.input_dir
    loras = out / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    links = {inp / "leak.txt": secret_dir / "secret.txt", inp / "leak.pt": secret_dir / "secret.pt",
             loras / "leak.safetensors": secret_dir / "secret.safetensors", out / "evil.pt": secret_dir / "victim.txt",
             out / "outlink": secret_dir, inp / "outlink": secret_dir, loras / "outlink": secret_dir}
    for link, target in links.items():
        if not os.path.lexists(link):
            os.symlink(target, link)
    return comfy, secret_dir


def file_inputs(pack):
    for cls in pack.nodes.NODES:
        schema = cls.define_schema()
        for inp in schema.inputs:
            if FILEISH.search(inp.id) and inp.id not in NOT_FILES:
                yield cls, schema.node_id, inp.id


def test_every_file_input_is_registered(env):
    comfy, _ = env
    pack = comfy.pack_module
    found = {(node, field) for _cls, node, field in file_inputs(pack)}
    registered = {(node, field) for node, fields in pack.nodes.paths.FILE_INPUTS.items() for field in fields}
    assert found == registered, f"unregistered: {found - registered}; stale: {registered - found}"
    assert all(cls.__name__ == cls.define_schema().node_id for cls in pack.nodes.NODES)
    assert len(found) >= 8


HOSTILE = {
    "common": ["ABS", "../server_private/secret{ext}", "sub/../../../x{ext}", "~/secret{ext}", "outlink/secret{ext}",
               "x\x00{ext}"],
    "text_file": ["leak.txt"],
    "lora_lines": ["leak.safetensors", "outlink", "outlink/secret.safetensors"],
    "lora_file": ["leak.safetensors", "outlink/secret.safetensors", "secret.pt"],
    "pt_read": ["leak.pt", "outlink/secret.pt"],
    "pt_write": ["evil.pt", "outlink/victim.pt", "x.safetensors", "", " ", ".hidden.pt", "\u200b.pt", "sub/"],
    "save_prefix": ["outlink/x", "", " ", "loras/", "loras/.hidden", "\u200b"],
    "run_name": ["a/b", "..", "~", "", "\u200b", "/tmp"],
}


def call(cls, field, value):
    """``cls.execute`` with schema defaults (None for models, images, ...), ``field`` = ``value``."""
    kwargs = {inp.id: getattr(inp, "default", None) for inp in cls.define_schema().inputs
              if not getattr(inp, "optional", False)}
    kwargs[field] = value
    return cls.execute(**kwargs)


EXT = {"text_file": ".txt", "lora_lines": ".safetensors", "lora_file": ".safetensors", "pt_read": ".pt",
       "pt_write": ".pt", "save_prefix": "", "run_name": ""}


def hostile_cases(pack):
    for cls, node, field in file_inputs(pack):
        kind = pack.nodes.paths.FILE_INPUTS[node][field]
        for value in HOSTILE["common"] + HOSTILE[kind]:
            yield cls, node, field, kind, value.replace("{ext}", EXT[kind])


def test_hostile_names_are_refused_on_every_file_input(env):
    comfy, secret_dir = env
    pack = comfy.pack_module
    before = sorted(os.listdir(secret_dir))
    n = 0
    for cls, node, field, kind, value in hostile_cases(pack):
        value = str(secret_dir / f"secret{EXT[kind] or '.txt'}") if value == "ABS" else value
        with pytest.raises(ValueError) as err:
            call(cls, field, value)
        msg = str(err.value)
        where = f"{node}.{field} = {value!r}: {msg}"
        assert msg.startswith(field), where
        assert SECRET not in msg and str(secret_dir) not in msg.replace(value, ""), where
        assert not (EXT[kind] and value.endswith(EXT[kind])) or "must end with" not in msg, where  # the path rule acted
        assert str(comfy.output_dir) not in msg and str(comfy.base_dir) not in msg, where
        n += 1
    assert n > 60
    assert sorted(os.listdir(secret_dir)) == before
    assert all((secret_dir / f).read_text() == SECRET for f in before)  # nothing overwritten


@pytest.mark.parametrize("node,field,outside,missing", [
    ("MaceLoadUNetPt", "path", "leak.pt", "nothing.pt"),
    ("MaceLoadErasure", "erasure_name", "leak.safetensors", "nothing.safetensors"),
    ("MaceMassErase", "concept_file", "leak.txt", "nothing.txt"),
    ("MaceFuseLoras", "lora_files", "leak.safetensors", "nothing.safetensors"),
])
def test_missing_and_outside_read_alike(env, node, field, outside, missing):
    comfy, _ = env
    cls = next(c for c in comfy.pack_module.nodes.NODES if c.__name__ == node)
    a = str(pytest.raises(ValueError, call, cls, field, outside).value)
    b = str(pytest.raises(ValueError, call, cls, field, missing).value)
    assert a.replace(outside, "NAME") == b.replace(missing, "NAME")
    assert "loras folders or the loras folders" not in a


def test_unet_pt_nodes_save_and_load_inside_the_folders(env, tiny_ckpt):
    """Save UNet .pt writes <output>/<path> and its companion; Load finds it by the same name."""
    import torch

    from comfy_harness import load_tiny_checkpoint

    comfy, _ = env
    pack = comfy.pack_module
    model, clip, _vae = load_tiny_checkpoint(tiny_ckpt, clip_layers=1)
    with torch.inference_mode():
        erased = pack.nodes.cfr_node.MaceRefineCrossAttention.execute(
            model, clip, "ship", "object", "", "", 0.1, 1.0, False, True).args[0]
        written = pack.nodes.unet_pt_nodes.MaceSaveUNetPt.execute(erased, " policy/u.pt ", "fp32").args[0]
    assert written == os.path.realpath(comfy.output_dir / "policy" / "u.pt")
    assert (comfy.output_dir / "policy" / "u.safetensors").is_file()
    loaded, info = pack.nodes.unet_pt_nodes.MaceLoadUNetPt.execute(model, "policy/u.pt").args
    assert '"changed": 8' in info and pack.nodes.comfy_model.get_record(loaded) is not None
