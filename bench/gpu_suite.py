"""One benchmark of every stage on random-weight SD1.5, each next to its reference-style baseline.

Nothing is downloaded: the UNet is ComfyUI's own ``UNetModel`` with random N(0, 0.02) weights
(``bench.sd15.build_sd15``, loaded as a real ModelPatcher inside ``torch.inference_mode()`` as
the executor loads checkpoints), the text encoder is the 77 x 768 hash encoder, training latents
are random (image sampling is not timed). Sections, each in the same run as its baseline:

* ``cfr``: ``refine_cross_attention`` (shared d x d sums, one solve per layer) vs the reference's
  per-layer value tensors and float32 inverses (``mace_ops.per_layer.per_layer_cfr``; N <= 10).
* ``fusion``: ``fuse_loras`` streaming synthetic rank-1 LoRAs vs the per-layer reference fusion
  (``mace_ops.per_layer.per_layer_fusion``; N <= 10).
* ``lora``: one concept's LoRA at every dtype: ``full`` (backprop through the UNet every step, K
  and V: the reference's way) vs ``cached_queries`` (the pack's default): seconds per step (median
  after the first), seconds per concept (all steps, recording included) and peak memory above
  the loaded model (CUDA: max allocated; CPU: resident high-water mark).
* ``dynamic``: one LoRA trained with dynamic VRAM on and off from the same random UNet file and
  seed, for both training paths; the largest difference of the deltas ``up @ down`` relative to
  their size (expected: float noise, < 1e-3) and of the losses. Newer ComfyUI loads checkpoints as
  ``ModelPatcherDynamic`` on NVIDIA; the pack trains through a legacy private copy
  (``nodes.comfy_compat.static_patcher``); dynamic VRAM is enabled as upstream's ``main.py`` does
  (``enable_dynamic_vram``). On a ComfyUI without dynamic VRAM (0.3.64), or without CUDA, a row that
  says so.
* ``pipeline``: ``run_mass_erasure`` end to end (CFR -> LoRAs -> fusion) through ``ComfyDenoiser``,
  reference-style (full path, one concept after another) vs the default (cached queries, concepts
  batched).
* ``check``: the cost of ``MACE Erasure Check`` per image: sampling (``comfy.sample.sample``, the
  KSampler path the node uses, ``check_steps`` steps, CFG) and judging (``diffusion_classifier.classify``
  through ``ComfyDenoiser(prediction="eps")``, the node's batch of 8) at the workflow's 7 candidates
  and at a 10-concept erasure's 21 (10 erased + 10 kept + the anchor); then the derived minutes of
  a whole check (2 models x 3 sets x images per set x (sampling + judging)) for the workflow's
  default (12 images per set, 7 candidates) and for 10 concepts at 12 images per set.
* ``text_entry`` (``--text-entry``, not in the default run): CFR on a FLUX-sized text-entry projection
  (``txt_in``, 4096 -> 3072, 256-token T5 windows) for 1/10/100 concepts, seconds and peak memory
  (``bench/text_entry_cfr.py``, run as its own script; ``--small``: 1024 -> 768).

Full size (default): SD1.5 UNet, 512 x 512, 50 LoRA steps, CFR/fusion at 1/10/100 concepts, the
pipeline at 10 concepts, dtypes fp16/bf16/fp32 on CUDA (fp32/bf16 on CPU). ``--small``: ComfyUI's
tiny one-level SD1.5-layout UNet, 64 x 64, 6 steps, 4 templates, 1/2 concepts with 256-wide
text features for the closed forms, pipeline at 2: the same code
paths in well under 2 minutes on CPU (a default test runs it, so the script cannot rot).

    bash bench/gpu_suite.sh [--small] [--device auto|cpu|cuda] [--out FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import HashTextEncoder, Peak, concepts, environment, print_table, sd15_kv_weights, stream, write_json
from bench.sd15 import SD15_UNET, build_sd15, init_comfy
from mace_ops.per_layer import per_layer_cfr, per_layer_fusion

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass
class Scale:
    unet: str
    res: int
    steps: int
    counts: tuple[int, ...]
    baseline_max: int
    pipeline_concepts: int
    images: int
    templates: int  # object templates per concept (0: all 30)
    text_dim: int  # width of the closed forms' text features (768 = SD1.5)
    check_images: int = 4  # images timed per check case
    check_steps: int = 20  # sampling steps of the check's images (the node's default)
    check_draws: int = 8  # the judge's draws (the node's default)
    check_candidates: tuple[int, ...] = (7, 21)  # the workflow's candidates; a 10-concept erasure's

    def template_list(self):
        from mace_ops.templates import OBJECT_TEMPLATES

        return OBJECT_TEMPLATES[: self.templates] if self.templates else OBJECT_TEMPLATES


FULL = Scale("sd15", 512, 50, (1, 10, 100), 10, 10, 8, 0, 768)
SMALL = Scale("tiny", 64, 6, (1, 2), 2, 2, 2, 4, 256, check_images=1, check_steps=2, check_draws=1,
              check_candidates=(3, 8))
CHECK_SETS, CHECK_IMAGES_PER_SET = 3, 12  # the node's sets (erased, held-out, kept) and default images per set


# ---------------------------------------------------------------------------------------------- closed forms

def closed_forms(scale: Scale) -> list[dict]:
    from mace_ops.cfr import CFRConfig, refine_cross_attention
    from mace_ops.fusion import fuse_loras

    TEMPLATES = scale.template_list()
    enc, original, rows = HashTextEncoder(scale.text_dim), sd15_kv_weights(dim=scale.text_dim), []
    for n in scale.counts:
        cs = concepts(n)
        pair = {}
        for method in ("ours", "reference-style"):
            if method != "ours" and n > scale.baseline_max:
                rows.append({"section": "cfr", "case": f"{n} concepts", "method": method, "note": "not run (memory)"})
                continue
            with Peak("cpu") as p:
                if method == "ours":
                    cfr = refine_cross_attention(enc, original, cs, TEMPLATES, config=CFRConfig(lamb=1.0))
                    refined = cfr.weights
                else:
                    per_layer_cfr(enc, original, cs, TEMPLATES, 1.0)
            pair[method] = p.seconds
            rows.append({"section": "cfr", "case": f"{n} concepts", "method": method, "seconds": round(p.seconds, 3),
                         "peak_mb": round(p.mb, 1)})
        _ratio(rows, pair)
        pair = {}
        for method in ("ours", "reference-style"):
            if method != "ours" and n > scale.baseline_max:
                rows.append({"section": "fusion", "case": f"{n} concepts", "method": method,
                             "note": "not run (memory)"})
                continue
            with Peak("cpu") as p:
                if method == "ours":
                    fuse_loras(enc, refined, original, stream(cs, refined), TEMPLATES, lamb=1.0, total=n)
                else:
                    per_layer_fusion(enc, refined, stream(cs, refined), TEMPLATES, 1.0)
            pair[method] = p.seconds
            rows.append({"section": "fusion", "case": f"{n} concepts", "method": method,
                         "seconds": round(p.seconds, 3), "peak_mb": round(p.mb, 1)})
        _ratio(rows, pair)
    return rows


def _ratio(rows: list[dict], seconds: dict) -> None:
    """speedup = reference-style seconds / ours, on the 'ours' row of the pair just added."""
    if "ours" in seconds and "reference-style" in seconds:
        for r in reversed(rows):
            if r["method"] in ("ours", "cached_queries"):
                r["speedup"] = round(seconds["reference-style"] / max(seconds["ours"], 1e-9), 2)
                break


# ---------------------------------------------------------------------------------------------- LoRA + pipeline

def _unet_config(scale: Scale) -> dict:
    if scale.unet != "tiny":
        return SD15_UNET
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_harness import TINY_UNET_CONFIG

    return {**TINY_UNET_CONFIG, "use_checkpoint": False}


def _model(scale: Scale, dtype: torch.dtype):
    with torch.inference_mode():  # as the executor loads a checkpoint: inference tensors
        patcher, _ = build_sd15(0, _unet_config(scale), dtype)
    return patcher


def _latents(scale: Scale, n: int, device: str, seed: int = 0) -> torch.Tensor:
    side = scale.res // 8
    return torch.randn(n, 4, side, side, generator=torch.Generator().manual_seed(seed)).to(device)


def lora_rows(h, scale: Scale, dtypes: list[str], device: str) -> list[dict]:
    ops, nodes = h.pack_module.mace_ops, h.pack_module.nodes
    import comfy.model_management as mm

    rows = []
    concept = ops.concepts.Concept(("ship",), "ground", 1)
    latents = _latents(scale, scale.images, device)
    for name in dtypes:
        try:
            patcher = _model(scale, DTYPES[name])
        except Exception as err:  # noqa: BLE001 - a dtype this device cannot build is a row, not a crash
            rows.append({"section": "lora", "case": name, "method": "-", "note": f"not built: {err}"[:120]})
            continue
        pair = {}
        for path in ("full", "cached_queries"):
            cfg = ops.lora_train.LoraTrainConfig(steps=scale.steps, lr=1e-5, use_masks=False, path=path,
                                                 query_samples=_pool(ops, scale))
            den = nodes.comfy_denoiser.ComfyDenoiser(patcher, backward=path == "full")
            stamps = []
            try:
                den.load()
                with Peak(device) as p:
                    start = time.perf_counter()
                    out = ops.lora_train.train_concept_lora(
                        den, HashTextEncoder(), concept, scale.template_list(), latents, None, cfg,
                        progress=lambda i, n: (_sync(device), stamps.append(time.perf_counter())))
            except Exception as err:  # noqa: BLE001
                rows.append({"section": "lora", "case": name, "method": path, "note": f"failed: {err}"[:160]})
                continue
            finally:
                den.release()
                mm.unload_all_models()
            steps = [b - a for a, b in zip(stamps, stamps[1:])]
            method = "reference-style" if path == "full" else "cached_queries"
            pair["reference-style" if path == "full" else "ours"] = p.seconds
            rows.append({"section": "lora", "case": f"{name} {scale.res}px", "method": method,
                         "seconds": round(p.seconds, 3), "s_per_step": round(statistics.median(steps), 4),
                         "first_step_s": round(stamps[0] - start, 3), "peak_mb": round(p.mb, 1),
                         "steps": scale.steps, "loss_first": round(out.losses[0], 4),
                         "loss_last": round(out.losses[-1], 4)})
        _ratio(rows, pair)
        del patcher
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def pipeline_rows(h, scale: Scale, dtype: str, device: str) -> list[dict]:
    ops, nodes = h.pack_module.mace_ops, h.pack_module.nodes
    import comfy.model_management as mm
    from mace_ops.cfr import CFRConfig

    patcher = _model(scale, DTYPES[dtype])
    rows, pair = [], {}
    cs = concepts(scale.pipeline_concepts)
    enc = HashTextEncoder()
    for method, path, batch in (("reference-style", "full", 1), ("cached_queries", "cached_queries", 8)):
        lora = ops.lora_train.LoraTrainConfig(steps=scale.steps, lr=1e-5, use_masks=False, path=path,
                                              query_samples=_pool(ops, scale))
        settings = ops.pipeline.PipelineSettings("object", "ground", CFRConfig(lamb=1.0), lora, 1e-3, 1.0)
        den = nodes.comfy_denoiser.ComfyDenoiser(patcher, backward=path == "full")
        with tempfile.TemporaryDirectory() as folder:
            try:
                original = nodes.comfy_model.effective_kv_weights(patcher)
                with Peak(device) as p:
                    res = ops.pipeline.run_mass_erasure(
                        enc, den, original, cs, scale.template_list(), settings, folder,
                        lambda c: (_latents(scale, scale.images, device, seed=c.line), None), log=lambda s: None,
                        concept_batch=batch)
            finally:
                den.release()
                mm.unload_all_models()
        s = res.seconds
        pair["reference-style" if path == "full" else "ours"] = p.seconds
        rows.append({"section": "pipeline", "case": f"{len(cs)} concepts {dtype} {scale.res}px", "method": method,
                     "seconds": round(p.seconds, 2), "cfr_s": round(s.get("cfr", 0), 2),
                     "lora_s": round(s.get("lora", 0), 2), "fusion_s": round(s.get("fusion", 0), 2),
                     "peak_mb": round(p.mb, 1)})
    _ratio(rows, pair)
    return rows


def check_rows(h, scale: Scale, dtype: str, device: str) -> list[dict]:
    """Seconds per image of the erasure check's sampling and judging, and the derived minutes of a check."""
    ops, nodes = h.pack_module.mace_ops, h.pack_module.nodes
    import comfy.model_management as mm
    import comfy.sample

    patcher = _model(scale, DTYPES[dtype])
    enc, side, n = HashTextEncoder(), scale.res // 8, scale.check_images
    cond = lambda text: [[enc.encode([text])[0].features[None], {}]]  # noqa: E731
    latent = torch.zeros(1, 4, side, side)
    rows = []
    try:
        comfy.sample.sample(patcher, comfy.sample.prepare_noise(latent, 0), 1, 7.0, "euler", "normal",
                            cond("warm up"), cond(""), latent, disable_pbar=True, seed=0)  # loads the model
        _sync(device)
        start = time.perf_counter()
        for i in range(n):
            comfy.sample.sample(patcher, comfy.sample.prepare_noise(latent, i), scale.check_steps, 7.0, "euler",
                                "normal", cond(f"a painting number {i}"), cond(""), latent, disable_pbar=True, seed=i)
        _sync(device)
        sampling = (time.perf_counter() - start) / n
        rows.append({"section": "check", "case": f"sampling {dtype} {scale.res}px, {scale.check_steps} steps, per image",
                     "method": "KSampler path", "seconds": round(sampling, 3)})
        judging = {}
        for k in scale.check_candidates:
            contexts = torch.stack([e.features for e in enc.encode([f"a painting by artist {c}" for c in range(k)])])
            config = ops.diffusion_classifier.JudgeConfig(draws=scale.check_draws,
                                                          screen_draws=min(2, scale.check_draws), batch=8)
            latents = _latents(scale, n, device, seed=k)
            den = nodes.comfy_denoiser.ComfyDenoiser(patcher, backward=False, prediction="eps")
            try:
                den.load()
                _sync(device)
                start = time.perf_counter()
                j = ops.diffusion_classifier.classify(den, latents, contexts, torch.arange(k).repeat(n, 1),
                                                      torch.ones(n, dtype=torch.long), config, keep=(0,))
                _sync(device)
                judging[k] = (time.perf_counter() - start) / n
            finally:
                den.release()
            rows.append({"section": "check", "case": f"judging {k} candidates {dtype} {scale.res}px, {scale.check_draws} "
                         f"draws ({j.forwards / n:.0f} forwards), per image", "method": "diffusion classifier",
                         "seconds": round(judging[k], 3)})
        per_check = 2 * CHECK_SETS * CHECK_IMAGES_PER_SET / 60
        for label, k in (("workflow default", scale.check_candidates[0]), ("10 concepts", scale.check_candidates[-1])):
            rows.append({"section": "check", "case": f"one check, {label}: {CHECK_IMAGES_PER_SET} images per set, "
                         f"{k} candidates", "method": "derived", "seconds": round(per_check * 60 * (sampling + judging[k]), 1)})
    finally:
        mm.unload_all_models()
    return rows


def text_entry_rows(small: bool) -> list[dict]:
    """The ``text_entry`` section: ``bench.text_entry_cfr`` run as its own script (``--small``: its CPU
    size), its rows read back from its JSON."""
    with tempfile.TemporaryDirectory(prefix="mace-text-entry-") as tmp:
        out = os.path.join(tmp, "text_entry_cfr.json")
        subprocess.run([sys.executable, "-m", "bench.text_entry_cfr", "--out", out, *(["--small"] if small else [])],
                       cwd=REPO, check=True)
        return json.loads(Path(out).read_text())["rows"]


# ---------------------------------------------------------------------------------------------- dynamic VRAM

def enable_dynamic_vram() -> str | None:
    """Switch this process's loaders to dynamic VRAM; None, or why it cannot be done here."""
    import comfy.model_management as mm
    import comfy.model_patcher as mp

    dynamic = getattr(mp, "ModelPatcherDynamic", None)
    if dynamic is None:
        return "this ComfyUI has no dynamic VRAM (no ModelPatcherDynamic)"
    if not torch.cuda.is_available():
        return "dynamic VRAM needs CUDA"
    import comfy.memory_management as mem
    try:
        import comfy_aimdo.control as aimdo
        devices = list(mm.get_all_torch_devices())
        try:
            ok = aimdo.init_devices((d.index, 0) for d in devices)
        except TypeError:  # older comfy-aimdo protocol
            ok = aimdo.init_devices(d.index for d in devices)
    except Exception as err:  # noqa: BLE001 - a row, not a crash
        return f"comfy_aimdo did not initialise: {err}"
    if not ok:
        return "comfy_aimdo found no device"
    mp.CoreModelPatcher = dynamic
    mem.aimdo_enabled = True
    return None


def _load(path: str, dynamic: bool):
    import comfy.model_patcher as mp
    import comfy.sd

    keep = getattr(mp, "CoreModelPatcher", None)  # absent before dynamic VRAM: every load is legacy
    if keep is not None and not dynamic:
        mp.CoreModelPatcher = mp.ModelPatcher
    try:
        with torch.inference_mode():
            return comfy.sd.load_diffusion_model(path)
    finally:
        if keep is not None:
            mp.CoreModelPatcher = keep


def _train(h, patcher, path: str, scale, latents, concept, templates, pool: int):
    ops, nodes = h.pack_module.mace_ops, h.pack_module.nodes
    cfg = ops.lora_train.LoraTrainConfig(steps=scale.steps, lr=1e-4, use_masks=False, path=path, seed=0,
                                         query_samples=pool)
    den = nodes.comfy_denoiser.ComfyDenoiser(patcher, backward=path == "full")
    try:
        out = ops.lora_train.train_concept_lora(den, HashTextEncoder(), concept, templates, latents, None, cfg)
    finally:
        den.release()
    deltas = {k: (out.lora.up[k] @ out.lora.down[k]).detach().float().cpu() for k in out.lora.names}
    return deltas, out.losses


def dynamic_rows(h, scale, device: str, latents, pool: int, unet_config: dict | None = None,
                 enable=enable_dynamic_vram) -> list[dict]:
    """Rows of the ``dynamic`` section (see the module docstring and ``enable_dynamic_vram``). ``unet_config``: the random UNet's
    layout (None: full SD1.5); ``enable``: what turns dynamic VRAM on (a test passes a no-op, so
    that both runs are legacy and must agree exactly)."""
    import comfy.model_management as mm
    from safetensors.torch import save_file

    why = enable() if device == "cuda" or enable is not enable_dynamic_vram else "dynamic VRAM needs CUDA"
    if why is not None:
        return [{"section": "dynamic", "case": "-", "method": "-", "note": f"skipped: {why}"}]
    ops = h.pack_module.mace_ops
    concept = ops.concepts.Concept(("ship",), "ground", 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mace-dynamic-") as tmp:
        file = os.path.join(tmp, "unet.safetensors")
        with torch.inference_mode():
            patcher, _ = build_sd15(0, unet_config, torch.float16 if device == "cuda" else torch.float32)
            save_file({k: v.contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}, file)
        del patcher
        for path in ("cached_queries", "full"):
            got = {}
            for dynamic in (False, True):
                try:
                    model = _load(file, dynamic)
                    got[dynamic] = _train(h, model, path, scale, latents, concept, scale.template_list(), pool)
                except Exception as err:  # noqa: BLE001
                    rows.append({"section": "dynamic", "case": path, "method": "on" if dynamic else "off",
                                 "note": f"failed: {type(err).__name__}: {err}"[:200]})
                finally:
                    mm.unload_all_models()
            if len(got) == 2:
                (d_off, l_off), (d_on, l_on) = got[False], got[True]
                rel = max(float((d_on[k] - d_off[k]).abs().max()) / max(float(d_off[k].abs().max()), 1e-12)
                          for k in d_off)
                rows.append({"section": "dynamic", "case": path, "method": "on vs off",
                             "delta_rel_max": rel, "loss_abs_max": max(abs(a - b) for a, b in zip(l_on, l_off)),
                             "note": "same within float noise" if rel < 1e-3 else "DIFFERENT: check R1b"})
    return rows


def _pool(ops, scale: Scale) -> int:
    """The nodes' default query pool (never more samples than steps)."""
    return min(ops.lora_train.DEFAULT_QUERY_SAMPLES, scale.steps)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


COLUMNS = ["section", "case", "method", "seconds", "speedup", "s_per_step", "first_step_s", "peak_mb", "cfr_s",
           "lora_s", "fusion_s", "delta_rel_max", "loss_abs_max", "note"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny UNet, 64 px, few concepts: the CI run")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None)
    ap.add_argument("--sections", nargs="+", default=["closed", "lora", "pipeline", "dynamic", "check"],
                    choices=["closed", "lora", "pipeline", "dynamic", "check"])
    ap.add_argument("--res", type=int, default=None, help="override the image side (pixels, multiple of 8)")
    ap.add_argument("--steps", type=int, default=None, help="override the LoRA steps per concept")
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/gpu_suite[_small].json)")
    ap.add_argument("--text-entry", action="store_true", help="add the FLUX-sized text-entry CFR rows")
    args = ap.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    scale = SMALL if args.small else FULL
    if args.res is not None:
        if args.res < 8 or args.res % 8:
            raise SystemExit(f"--res must be a positive multiple of 8, got {args.res}")
        scale = dataclasses.replace(scale, res=args.res)
    if args.steps is not None:
        if args.steps < 2:
            raise SystemExit(f"--steps must be >= 2 (the first step is a warm-up), got {args.steps}")
        scale = dataclasses.replace(scale, steps=args.steps)
    dtypes = args.dtypes or (["fp16", "bf16", "fp32"] if device == "cuda" else ["fp32", "bf16"])
    out = args.out or f"bench/results/gpu_suite{'_small' if args.small else ''}.json"
    t0 = time.perf_counter()
    rows = []
    if "closed" in args.sections:
        rows += closed_forms(scale)
    if args.text_entry:
        rows += text_entry_rows(args.small)
    if {"lora", "pipeline", "dynamic", "check"} & set(args.sections):
        with tempfile.TemporaryDirectory(prefix="mace-gpu-suite-") as base:
            h = init_comfy(base, device)
            if "lora" in args.sections:
                rows += lora_rows(h, scale, dtypes, device)
            if "pipeline" in args.sections:
                rows += pipeline_rows(h, scale, "bf16" if device == "cuda" else "fp32", device)
            if "check" in args.sections:
                rows += check_rows(h, scale, "fp16" if device == "cuda" else "fp32", device)
            if "dynamic" in args.sections:
                rows += dynamic_rows(h, scale, device, _latents(scale, scale.images, device),
                                     _pool(h.pack_module.mace_ops, scale), _unet_config(scale))
    minutes = (time.perf_counter() - t0) / 60
    print_table(rows, COLUMNS)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device {name}, {'small' if args.small else 'full'} scale, {minutes:.1f} min")
    write_json(out, {"bench": "gpu_suite", "env": environment(), "device": name, "scale": dataclasses.asdict(scale),
                     "minutes": round(minutes, 2), "rows": rows,
                     "notes": "random weights, hash text encoder, random training latents (sampling not timed); "
                              "closed forms on CPU; speedup = reference-style seconds / ours"})


if __name__ == "__main__":
    main()
