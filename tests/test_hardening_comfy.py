"""Integration (real ComfyUI): issue 11 hardening through the nodes a shared server exposes.

Paths: user-typed file names resolve only inside ComfyUI's folders; refusals never quote the
file or tell whether it exists. Numbers: NaN/inf/out-of-range inputs are refused up front,
naming the field. Files: non-finite files are never loaded, fused or applied.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from comfy_harness import load_tiny_checkpoint, make_tiny_sd15_checkpoint

pytestmark = pytest.mark.integration
SECRET = "TOP-SECRET-VALUE-42"


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    comfy.require_pack()
    path = make_tiny_sd15_checkpoint(tmp_path_factory.mktemp("tiny_hard") / "mace_tiny_hard.safetensors",
                                     clip_layers=1, seed=1)
    with torch.inference_mode():
        model, clip, vae = load_tiny_checkpoint(path, clip_layers=1)
    secret_dir = tmp_path_factory.mktemp("server_secrets")
    secret = secret_dir / "secrets.txt"
    secret.write_text(SECRET + "\n")
    return SimpleNamespace(model=model, clip=clip, vae=vae, pack=comfy.pack_module, comfy=comfy, secret=secret)


def mass_erase(env, run_name, concepts="ship", concept_file="", **over):
    node = env.pack.nodes.mass_erase_node.MaceMassErase
    args = dict(concepts=concepts, concept_file=concept_file, concept_type="object", anchor="", preserve="",
                builtin_preserve=False, run_name=run_name, cfr_lambda=1.0, preserve_scale=1.0, lora_steps=2,
                lora_lr=3e-2, images_per_concept=1, image_size=64, sampling_steps=1, seed=5, fusion_lambda=1e-3)
    args.update(over)
    with torch.inference_mode():
        return node.execute(env.model, env.clip, env.vae, **args)


def fuse(env, lora_files, model=None, **over):
    node = env.pack.nodes.fusion_node.MaceFuseLoras
    args = dict(lora_files=lora_files, concept_type="object", preserve="", lambda_=1e-3, preserve_scale=1.0,
                builtin_preserve=False)
    args.update(over)
    with torch.inference_mode():
        return node.execute(model or env.model, env.clip, **args)


# ---- 1. paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ABS", "../server_secrets/secrets.txt", "../../etc/passwd", "/etc/passwd",
                                  "LINK"])
def test_concept_file_outside_the_input_folder_is_refused(env, name):
    if name == "ABS":
        name = str(env.secret)
    if name == "LINK":
        link = env.comfy.input_dir / "leak.txt"
        if not link.exists():
            os.symlink(env.secret, link)
        name = "leak.txt"
    with pytest.raises(ValueError, match="concept_file") as err:
        mass_erase(env, "paths", concepts="", concept_file=name)
    assert SECRET not in str(err.value) and "refused" in str(err.value)


def test_concept_file_in_the_input_folder_is_read(env):
    (env.comfy.input_dir / "mine.txt").write_text("ship\n,\n")
    with pytest.raises(ValueError, match="mine.txt, line 2: empty phrase"):
        mass_erase(env, "paths", concepts="", concept_file="mine.txt")


def test_fuse_lora_files_outside_the_loras_folders_is_refused_alike(env):
    messages = []
    for name in (str(env.secret), str(env.secret) + ".missing", "../../../server_secrets/secrets.txt",
                 "../nothing/here.safetensors"):
        with pytest.raises(ValueError, match="lora_files, line 1") as err:
            fuse(env, name)
        assert SECRET not in str(err.value) and "refused" in str(err.value)
        messages.append(str(err.value).replace(name, "NAME"))
    assert messages[0] == messages[1] and messages[2] == messages[3]  # existence is not revealed
