"""SDXL's pooled text path on the tiny SDXL-layout model: how much of a concept's effect it
carries, and what CFR alone vs CFR + the pooled edit (``edit_pooled``) leave of it.  The CFR
node's ``edit_pooled`` default (off) comes from this run's held-out numbers.

Real ComfyUI (``$COMFYUI_PATH``), the tests' tiny random-weight SDXL-layout checkpoint
(``tests/comfy_harness.make_tiny_checkpoint``, KOALA_700M layout, CLIP-L + bigG at 3 layers).
The MACE CFR node runs on the concept "van gogh" (style templates, anchor "", preserve
"claude monet"), once with ``edit_pooled`` off and once on.  Evaluation prompts: *held out*, the
30 object templates filled with the concept, the empty anchor and the preserved phrase; and
*in sample*, the 30 style templates the edits were fitted on.
Each prompt gets the context and pooled embedding CLIPTextEncode gives it and SDXL's real
``y = encode_adm(pooled, 64x64)``; the UNet's denoised output f at t = 300 and 600 on one
seeded latent and noise per template, shared by the prompts of that template (ComfyUI's
``apply_model``, patches applied):

* pooled share   = |f(ctx_a, y_c) - f(ctx_a, y_a)| / |f(ctx_c, y_c) - f(ctx_a, y_a)|   (base model)
* residual(m)    = |f_m(ctx_c, y_c) - f(ctx_a, y_a)| / |f(ctx_c, y_c) - f(ctx_a, y_a)|
* drift(m)       = |f_m(q) - f(q)| / |f(q) - f(ctx_a, y_a)|   for the preserved prompts q

Means with standard errors over templates x timesteps (n = 60 each).  Random weights: the numbers
say what the pooled path *can* carry in SDXL's layout, not how much real SDXL's does.

    nice python -m bench.pooled [--out docs/results/pooled_sdxl.json]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCEPT, PRESERVE, TIMESTEPS = "van gogh", "claude monet", (300, 600)


def _stats(xs):
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {"mean": round(m, 4), "se": round(sd / math.sqrt(n), 4), "n": n}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "pooled_sdxl.json"))
    args = ap.parse_args(argv)
    sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]
    import comfy_harness as ch

    h = ch.init_comfyui()
    import comfy.model_management as mm

    from bench.common import environment, write_json

    pack = h.pack_module
    templates = pack.mace_ops.templates
    path = ch.make_tiny_checkpoint(os.path.join(tempfile.mkdtemp(), "tiny_sdxl.safetensors"), "sdxl", seed=0)
    cfr = pack.nodes.cfr_node.MaceRefineCrossAttention
    t0 = time.time()
    with torch.inference_mode():
        base, clip, _vae = ch.load_tiny_checkpoint(path)
        models = {"base": base}
        for name, pooled in (("cfr", False), ("cfr+pooled", True)):
            models[name] = cfr.execute(base, clip, CONCEPT, "style", "", PRESERVE, 1.0, 1.0, False, True,
                                       edit_pooled=pooled).result[0]
        results = {}
        for split, kind in (("held_out", "object"), ("in_sample", "style")):
            results[split] = evaluate(models, clip, base, templates, templates.templates_for(kind), mm)
    result = {
        "what": "tiny random-weight SDXL layout (KOALA_700M detection, CLIP-L + bigG 3 layers); CFR on 'van gogh' "
                "(style templates, anchor '', preserve 'claude monet'); evaluated on the object templates "
                "(held_out) and on the style templates the edits were fit on (in_sample); t = 300, 600",
        **results,
        "seconds": round(time.time() - t0, 1),
        "environment": environment(),
    }
    for split in ("held_out", "in_sample"):
        r = result[split]
        print(f"[{split}] pooled share of the concept's effect (base): {r['pooled_share']['mean']:.3f} "
              f"+- {r['pooled_share']['se']:.3f} (n={r['pooled_share']['n']})")
        print(f"{'model':<12} {'residual':>16} {'preserve drift':>16}")
        for m in models:
            a, d = r["residual"][m], r["preserve_drift"][m]
            print(f"{m:<12} {a['mean']:>9.3f} +- {a['se']:.3f} {d['mean']:>9.3f} +- {d['se']:.3f}")
    write_json(args.out, result)


def evaluate(models, clip, base, templates, evals, mm) -> dict:
    groups = {g: [templates.fill(t, p) for t in evals] for g, p in
              (("concept", CONCEPT), ("anchor", ""), ("preserve", PRESERVE))}
    enc = {}
    for g, prompts in groups.items():
        enc[g] = []
        for p in prompts:
            cond, pooled = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
            y = base.model.encode_adm(pooled_output=pooled, width=64, height=64)
            enc[g].append((cond.float(), y.float()))
    gen = torch.Generator().manual_seed(0)
    latents = [torch.randn(1, 4, 8, 8, generator=gen) for _ in evals]
    sampling = base.get_model_object("model_sampling")

    def outputs(mp, pairs):
        dynamic = getattr(mp, "is_dynamic", lambda: False)()  # a dynamic-VRAM patcher asserts on forced patching
        mm.load_models_gpu([mp], force_full_load=True, force_patch_weights=not dynamic)
        out = {}
        for i, t in enumerate(TIMESTEPS):
            sigma = sampling.sigmas[t].reshape(1)
            for (key, (ctx, y)) in pairs:
                k = key[1]
                noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1000 * i + k))
                x = sampling.noise_scaling(sigma, noise, latents[k])
                out[(key, t)] = mp.model.apply_model(x, sigma, c_crossattn=ctx, y=y).float()
        mm.unload_all_models()
        return out

    n = len(evals)
    plain = [((g, k), enc[g][k]) for g in groups for k in range(n)]
    mixed = [(("mixed", k), (enc["anchor"][k][0], enc["concept"][k][1])) for k in range(n)]
    f = {name: outputs(mp, plain + (mixed if name == "base" else [])) for name, mp in models.items()}
    share, residual, drift = [], {m: [] for m in models}, {m: [] for m in models}
    fb = f["base"]
    for t in TIMESTEPS:
        for k in range(n):
            effect = (fb[(("concept", k), t)] - fb[(("anchor", k), t)]).norm()
            share.append(float((fb[(("mixed", k), t)] - fb[(("anchor", k), t)]).norm() / effect))
            q_scale = (fb[(("preserve", k), t)] - fb[(("anchor", k), t)]).norm()
            for m in models:
                residual[m].append(float((f[m][(("concept", k), t)] - fb[(("anchor", k), t)]).norm() / effect))
                drift[m].append(float((f[m][(("preserve", k), t)] - fb[(("preserve", k), t)]).norm() / q_scale))
    return {"pooled_share": _stats(share), "residual": {m: _stats(v) for m, v in residual.items()},
            "preserve_drift": {m: _stats(v) for m, v in drift.items()}}


if __name__ == "__main__":
    main()
