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

import comfy_harness as ch
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
    return SimpleNamespace(model=model, clip=clip, vae=vae, pack=comfy.pack_module, comfy=comfy, secret=secret,
                           ckpt=path, tmp=tmp_path_factory.mktemp("hard_other"))


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


# ---- 2. numbers -------------------------------------------------------------------------------

def cfr(env, **over):
    node = env.pack.nodes.cfr_node.MaceRefineCrossAttention
    args = dict(concepts="ship", concept_type="object", anchor="", preserve="", lambda_=1.0, preserve_scale=1.0,
                builtin_preserve=False, erase_concept_tokens=True)
    args.update(over)
    with torch.inference_mode():
        return node.execute(env.model, env.clip, **args)


@pytest.mark.parametrize("over,field", [({"lambda_": float("nan")}, "lambda"), ({"lambda_": float("inf")}, "lambda"),
                                        ({"preserve_scale": float("nan")}, "preserve_scale"),
                                        ({"lambda_": -1.0}, "lambda")])
def test_cfr_node_refuses_non_finite_numbers_naming_the_field(env, over, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        cfr(env, **over)


@pytest.mark.parametrize("over,field", [({"lora_lr": float("nan")}, "lora_lr"), ({"seed": 2**64}, "seed"),
                                        ({"fusion_lambda": float("inf")}, "fusion_lambda"),
                                        ({"cfr_lambda": float("nan")}, "cfr_lambda")])
def test_mass_erase_refuses_bad_numbers_before_any_work(env, over, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        mass_erase(env, "numbers", **over)
    assert not (env.comfy.output_dir / "loras" / "mace_mass" / "numbers").exists()


def test_node_maxima_work_end_to_end(env):
    # CFR at its largest lambda / preserve_scale, training images at the largest seed (seed + i wraps)
    model, summary = cfr(env, lambda_=1e6, preserve_scale=1e6, preserve="car").result
    assert "CFR erased 1 concept" in summary
    node = env.pack.nodes.training_images_node.MaceTrainingImages
    with torch.inference_mode():
        images, _ = node.execute(env.model, env.clip, env.vae, "ship", "object", 2, 1, 7.5, 0xFFFFFFFFFFFFFFFF,
                                 64, 64, "euler", "normal", "").result
    assert images.shape[0] == 2 and bool(torch.isfinite(images).all())


def test_load_erasure_refuses_nan_strength_and_nan_files(env):
    from safetensors.torch import save_file

    model, _ = cfr(env).result
    save = env.pack.nodes.erasure_io_nodes.MaceSaveErasure
    load = env.pack.nodes.erasure_io_nodes.MaceLoadErasure
    with torch.inference_mode():
        path = save.execute(model, "loras/hard/nan_test", "fp32").result[0]
    name = os.path.relpath(path, env.comfy.output_dir / "loras")
    with pytest.raises(ValueError, match="^strength: "):
        load.execute(env.model, name, float("nan"), False)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="holds NaN or inf"):
        load.execute(env.model, name, 1.0, True)


# ---- 3. cancel ----------------------------------------------------------------------------------

def test_mass_erase_cancel_acts_during_cfr_encoding(env):
    """Cancel pressed while CFR encodes the first concept stops the run at the next concept."""
    calls = ch.cancel_at_first_encode(env.pack, lambda: mass_erase(env, "cancel_cfr",
                                                                   concepts="ship\ncar\ndog\ncat\nhorse"))
    assert len(calls) <= 3  # dim probe + first concept's anchor and phrase prompts, then the interrupt point
    folder = env.comfy.output_dir / "loras" / "mace_mass" / "cancel_cfr"
    assert not folder.exists() or not [f for f in os.listdir(folder) if f.endswith((".safetensors", ".tmp"))]


def test_cfr_and_fuse_nodes_report_progress_per_concept(env):
    import comfy.utils

    updates = []
    real = comfy.utils.ProgressBar.update_absolute

    def record(self, value, total=None, preview=None):
        updates.append((value, total))
        return real(self, value, total, preview)

    comfy.utils.ProgressBar.update_absolute = record
    try:
        cfr(env, concepts="ship\ncar\ndog", preserve="cat")
    finally:
        comfy.utils.ProgressBar.update_absolute = real
    assert len(updates) >= 4 and updates[-1][0] == updates[-1][1]


# ---- 4. resume ----------------------------------------------------------------------------------

def test_mass_erase_node_adds_and_reorders_without_retraining(env):
    first = mass_erase(env, "resume_node", concepts="ship")
    assert "1 trained, 0 reused" in first.result[1]
    more = mass_erase(env, "resume_node", concepts="car\nship")  # one concept added, order changed
    assert "1 trained, 1 reused" in more.result[1]
    folder = env.comfy.output_dir / "loras" / "mace_mass" / "resume-node"  # run_name is slugged
    assert sorted(f.split("-")[0] for f in os.listdir(folder)) == ["car", "ship"]


# ---- 5. files and bases -------------------------------------------------------------------------

def load_as(path, dtype):
    import comfy.sd

    out = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=False, output_clip=False, model_options={"dtype": dtype},
        te_model_options={"clip_l_model_config": {"num_hidden_layers": 1}})
    return out[0]


def test_same_checkpoint_in_another_dtype_is_the_same_base_and_other_checkpoints_are_not(env):
    model, _ = cfr(env).result
    save = env.pack.nodes.erasure_io_nodes.MaceSaveErasure
    load = env.pack.nodes.erasure_io_nodes.MaceLoadErasure
    with torch.inference_mode():
        path = save.execute(model, "loras/hard/dtype_test", "fp16").result[0]
        name = os.path.relpath(path, env.comfy.output_dir / "loras")
        for dtype in (torch.float16, torch.bfloat16):
            other_dtype = load_as(env.ckpt, dtype)
            out, info, _clip = load.execute(other_dtype, name, 1.0, False).result
            assert env.pack.nodes.comfy_model.get_record(out) is not None
        other = make_tiny_sd15_checkpoint(env.tmp / "other.safetensors", clip_layers=1, seed=7)
        other_model = load_as(other, torch.float32)
        with pytest.raises(ValueError, match="different base model"):
            load.execute(other_model, name, 1.0, False)


def test_saved_erasure_bytes_and_permissions(env):
    model, _ = cfr(env).result
    save = env.pack.nodes.erasure_io_nodes.MaceSaveErasure
    with torch.inference_mode():
        a = save.execute(model, "loras/hard/bytes", "fp16").result[0]
        model2, _ = cfr(env).result
        b = save.execute(model2, "loras/hard/bytes", "fp16").result[0]
    assert a != b and open(a, "rb").read() == open(b, "rb").read()
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(a).st_mode & 0o777 == 0o666 & ~umask


def test_fuse_refuses_a_lora_of_another_base_and_a_damaged_file(env):
    ops = env.pack.mace_ops
    cm = env.pack.nodes.comfy_model
    base = cm.effective_kv_weights(env.model)
    lora = ops.lora.KVLora.for_weights(base, seed=0)
    folder = env.comfy.output_dir / "loras" / "hard_fuse"
    info = {"concept": ["ship"], "steps": 1, "lr": 0.1, "seed": 0, "settings": {}}
    other = {k: torch.randn_like(v) for k, v in base.items()}
    ops.lora_file.save_concept_lora(str(folder / "other.safetensors"), lora, ops.fingerprint.weights_fingerprint(other),
                                    info)
    with pytest.raises(ValueError, match="other.safetensors: trained for a different base model"):
        fuse(env, "hard_fuse/other.safetensors")
    ops.lora_file.save_concept_lora(str(folder / "mine.safetensors"), lora, ops.fingerprint.weights_fingerprint(base),
                                    info)
    fuse(env, "hard_fuse/mine.safetensors")
    data = (folder / "mine.safetensors").read_bytes()
    (folder / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors: damaged or truncated"):
        fuse(env, "hard_fuse/cut.safetensors")


# ---- 6. text ------------------------------------------------------------------------------------

def test_phrase_erased_and_preserved_is_an_error(env):
    with pytest.raises(ValueError, match="preserve, line 1: 'ship' is also erased"):
        cfr(env, concepts="Ship, boat", preserve="SHIP")
    with pytest.raises(ValueError, match="preserve, line 1: 'boat' is also erased"):
        mass_erase(env, "overlap", concepts="ship, boat", preserve="boat")


def test_grayscale_images_are_accepted_and_two_channel_images_named(env):
    encode = env.pack.nodes.lora_train_node.encode_images
    with torch.inference_mode():
        lat = encode(env.vae, env.model, torch.rand(1, 64, 64, 1))
        assert lat.shape[0] == 1 and bool(torch.isfinite(lat).all())
        with pytest.raises(ValueError, match="images: 2 channels per pixel; give RGB"):
            encode(env.vae, env.model, torch.rand(1, 64, 64, 2))
        with pytest.raises(ValueError, match="images: holds NaN"):
            encode(env.vae, env.model, torch.full((1, 64, 64, 3), float("nan")))


def test_a_model_without_cross_attention_is_refused_naming_its_family(env):
    """SD3/Flux-style models (no attn2): the error names the family and the supported ones."""
    cm = env.pack.nodes.comfy_model

    class Flux:  # stands in for ComfyUI's supported_models.Flux config
        pass

    fake = SimpleNamespace(model=SimpleNamespace(model_config=Flux()), model_state_dict=lambda prefix=None: {
        "diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"Flux model.*no cross-attention.*SD1\.x, SD2\.x and the SDXL family"):
        cm.kv_keys(fake)
