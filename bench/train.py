"""Benchmark LoRA training: our K/V-LoRA attention-loss step vs a plain full-backprop step.

Both cases run on the same full-size SD1.5 UNet (ComfyUI's ``UNetModel``, 859.5 M parameters,
random N(0, 0.02) weights) loaded through ``comfy.sd.load_diffusion_model_state_dict``, so the
model is a real ``ModelPatcher`` (the UNETLoader path), in float32, batch 1, at the same
resolution:

* ``lora``: the pack's ``ComfyDenoiser`` over that MODEL and ``mace_ops.lora_train.
  train_concept_lora`` (rank 1 on the 32 attn2 to_k/to_v weights, attention loss with a mask,
  CFIS timesteps, AdamW on the 49,536 LoRA parameters only). The model is loaded inside
  ``torch.inference_mode()``, as ComfyUI's executor does.
* ``full``: what naive fine-tuning costs: every UNet parameter ``requires_grad``, the same
  ``BaseModel.apply_model`` forward, an MSE loss on the denoised output, ``backward()`` and an
  AdamW step on all parameters.

Each case runs in its own subprocess. Peak memory is the process's resident high-water mark
(VmHWM) reset (``/proc/self/clear_refs``) after the model is built, minus the resident size at
that moment: what training adds on top of the loaded model. On a GPU (``--device cuda``;
untested here) it is ``torch.cuda.max_memory_allocated`` over the model's own footprint.
On CPU the default resolution is reduced (128 x 128 images, 16 x 16 latents); on a GPU 512 x 512.

    python -m bench.train [--res 128] [--steps 4] [--lora-steps 8] [--device auto|cpu|cuda]
                          [--out bench/results/train.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import HashTextEncoder, environment, hwm_mb, print_table, reset_peak, rss_mb, trim, write_json
from bench.sd15 import build_sd15, init_comfy

REPO = Path(__file__).resolve().parents[1]
REF_LORA_SECONDS_PER_STEP = 1 / 3.4  # docs/mace.md §6: ~3.4 it/s on an unknown GPU, fp32, 512x512
LORA_STEPS_PER_CONCEPT = 50  # the reference's default (object / person / style)


# ---------------------------------------------------------------------------- the two cases

def _lora_case(h, patcher, latents, masks, steps, device):
    pack = h.pack_module
    ops = pack.mace_ops
    den = pack.nodes.comfy_denoiser.ComfyDenoiser(patcher)
    concept = ops.concepts.Concept(("ship",), "ground", 1)
    cfg = ops.lora_train.LoraTrainConfig(steps=steps, lr=1e-5, rank=1, sampler="cfis", use_masks=True)
    stamps = []
    start = _now()
    try:
        out = ops.lora_train.train_concept_lora(
            den, HashTextEncoder(), concept, ops.templates.OBJECT_TEMPLATES, latents, masks, cfg,
            progress=lambda i, n: (_sync(device), stamps.append(_now())),
        )
    finally:
        den.release()
    grads = [n for n, p in patcher.model.named_parameters() if p.grad is not None]
    if grads:
        raise RuntimeError(f"the model got gradients: {grads[:3]}")
    return start, stamps, {"trainable_params": out.lora.num_parameters(), "loss_first": out.losses[0],
                           "loss_last": out.losses[-1]}


def _full_case(h, patcher, latents, masks, steps, device):
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    base = patcher.model
    params = list(base.diffusion_model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    ms = base.model_sampling
    ctx = HashTextEncoder().encode(["a photo of a ship"])[0].features[None].to(device)
    gen = torch.Generator().manual_seed(1)
    stamps, losses, parts = [], [], {"forward_s": [], "backward_s": [], "optimizer_s": []}
    start = _now()
    for _ in range(steps):
        a = time.perf_counter()
        x0 = latents[:1]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = int(torch.randint(1000, (1,), generator=gen))
        sigma = ms.sigmas[t : t + 1].to(device)
        x_t = ms.noise_scaling(sigma, noise, x0)
        out = base.apply_model(x_t, sigma, c_crossattn=ctx)
        loss = torch.nn.functional.mse_loss(out.float(), x0)
        _sync(device)
        b = time.perf_counter()
        loss.backward()
        _sync(device)
        c = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        _sync(device)
        stamps.append(_now())
        for k, v in zip(parts, (b - a, c - b, stamps[-1][0] - c)):
            parts[k].append(v)
    split = {k: round(statistics.median(v[1:] or v), 2) for k, v in parts.items()}
    return start, stamps, {"trainable_params": sum(p.numel() for p in params),
                           "loss_first": losses[0], "loss_last": losses[-1], **split}


def _now() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): CPU time is less sensitive to a shared CPU."""
    return time.perf_counter(), time.process_time()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_case(method: str, res: int, steps: int, device: str) -> dict:
    base_dir = tempfile.mkdtemp(prefix="mace-bench-train-")
    try:
        h = init_comfy(base_dir, device)
        t0 = time.perf_counter()
        if method == "lora":  # as the executor loads a checkpoint: inference tensors
            with torch.inference_mode():
                patcher, n_params = build_sd15()
        else:
            patcher, n_params = build_sd15()
        build_s = time.perf_counter() - t0
        side = res // 8
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(2, 4, side, side, generator=g).to(device)
        masks = torch.zeros(2, side, side)
        masks[:, side // 4 : 3 * side // 4, side // 8 : 5 * side // 8] = 1.0
        masks = masks.to(device)
        trim()
        before = rss_mb()
        peak_ok = reset_peak()
        if device == "cuda":
            import comfy.model_management as mm

            mm.load_models_gpu([patcher], force_full_load=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            gpu_before = torch.cuda.memory_allocated() / 2**20
        fn = _lora_case if method == "lora" else _full_case
        start, stamps, info = fn(h, patcher, latents, masks, steps, device)
        durations = [b[0] - a[0] for a, b in zip([start] + stamps[:-1], stamps)]
        cpu = [b[1] - a[1] for a, b in zip([start] + stamps[:-1], stamps)]
        steady = durations[1:] or durations
        row = {
            "method": method, "device": device, "res": res, "latent": f"{side}x{side}", "steps": steps,
            "first_step_s": round(durations[0], 2), "s_per_step": round(statistics.median(steady), 2),
            "min_s_per_step": round(min(steady), 2),
            "cpu_s_per_step": round(statistics.median(cpu[1:] or cpu), 2),
            "step_times_s": [round(d, 3) for d in durations], "step_cpu_s": [round(d, 3) for d in cpu],
            "model_mb": round(before, 1), "build_s": round(build_s, 1), "unet_params": n_params,
            **info,
        }
        if device == "cuda":
            row["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20 - gpu_before, 1)
            row["peak_total_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        elif peak_ok:
            row["peak_mb"] = round(hwm_mb() - before, 1)
            row["peak_total_mb"] = round(hwm_mb(), 1)
        else:
            from bench.common import peak_rss_mb

            row["peak_mb"] = round(peak_rss_mb() - before, 1)
            row["peak_note"] = "ru_maxrss could not be reset: includes the model build"
        return row
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=int, default=None, help="image side in pixels (latent = res/8); "
                    "default 512 on a GPU, 128 on CPU")
    ap.add_argument("--steps", type=int, default=4, help="full-backprop steps (the first is a warm-up)")
    ap.add_argument("--lora-steps", type=int, default=8, help="LoRA steps (the first is a warm-up)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--methods", nargs="+", default=["lora", "full"], choices=("lora", "full"))
    ap.add_argument("--out", default="bench/results/train.json")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    res = args.res or (512 if device == "cuda" else 128)
    if res % 8:
        raise SystemExit(f"--res must be a multiple of 8, got {res}")
    if args.case:
        print(json.dumps(run_case(args.case, res, args.steps, device)))
        return
    rows = []
    for method in args.methods:
        steps = args.lora_steps if method == "lora" else args.steps
        cmd = [sys.executable, "-m", "bench.train", "--case", method, "--res", str(res), "--steps",
               str(steps), "--device", device]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            sys.stderr.write(out.stderr[-4000:])
            rows.append({"method": method, "res": res, "error": f"exit {out.returncode}"})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    lora = next((r for r in rows if r.get("method") == "lora" and "s_per_step" in r), None)
    full = next((r for r in rows if r.get("method") == "full" and "s_per_step" in r), None)
    if lora and full:
        lora["time_ratio_full_over_lora"] = round(full["s_per_step"] / lora["s_per_step"], 2)
        lora["min_time_ratio_full_over_lora"] = round(full["min_s_per_step"] / lora["min_s_per_step"], 2)
        lora["cpu_time_ratio_full_over_lora"] = round(full["cpu_s_per_step"] / lora["cpu_s_per_step"], 2)
        lora["memory_ratio_full_over_lora"] = round(full["peak_mb"] / max(lora["peak_mb"], 1.0), 2)
    print_table(rows, ["method", "device", "res", "latent", "steps", "first_step_s", "s_per_step", "min_s_per_step",
                       "cpu_s_per_step", "peak_mb", "model_mb", "trainable_params", "time_ratio_full_over_lora",
                       "min_time_ratio_full_over_lora", "cpu_time_ratio_full_over_lora",
                       "memory_ratio_full_over_lora"])
    if full and "forward_s" in full:
        print(f"full-backprop step split (median): forward {full['forward_s']} s, backward {full['backward_s']} s, "
              f"AdamW {full['optimizer_s']} s")
    per_concept = None
    if lora:
        per_concept = {
            "steps": LORA_STEPS_PER_CONCEPT,
            "seconds": round(LORA_STEPS_PER_CONCEPT * lora["s_per_step"], 1),
            "at": f"{device}, {res}x{res}",
            "reference_gpu_seconds": round(LORA_STEPS_PER_CONCEPT * REF_LORA_SECONDS_PER_STEP, 1),
        }
        print(f"LoRA training per concept ({LORA_STEPS_PER_CONCEPT} steps, {device} {res}x{res}): "
              f"~{per_concept['seconds']} s  (reference, GPU 512x512: ~{per_concept['reference_gpu_seconds']} s)")
    write_json(args.out, {
        "bench": "train", "env": environment(), "rows": rows, "lora_per_concept": per_concept,
        "notes": ("full-size random-weight SD1.5 UNet (ComfyUI UNetModel via load_diffusion_model_state_dict), "
                  "fp32, batch 1; s_per_step / min_s_per_step = median / minimum of the steps after the first (the "
                  "minimum is the less contended figure on a shared CPU); cpu_s_per_step = median process CPU "
                  "seconds (user + sys, all threads) per step; peak_mb = resident "
                  "high-water mark above the loaded model (CPU) or max CUDA allocation above it (GPU)"),
    })


if __name__ == "__main__":
    main()
