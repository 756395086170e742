"""The paper's protocol on a real checkpoint, headless: erase with the pack's nodes, then MACE Erasure Check.

Runs an API prompt through ComfyUI's own executor (``headless.runner``): CheckpointLoaderSimple ->
MACE Refine Cross-Attention (``--method cfr``) or MACE Mass Erase (``--method mace``: CFR -> one
LoRA per concept -> fusion) -> MACE Erasure Check against the unedited model, and writes the
check's rows (``bench.mass_quality``'s schema: Acc_e, Acc_g, Acc_s, H with SEs and n, before and
after) with the settings to ``<out>/sd_eval.json``; the check's own JSON (every image's verdict)
and nothing else lands in ``<out>/mace_checks/``.

Concept files: one concept per line, synonyms comma separated (as the nodes read them); ``--held-out``
lines are ``nickname, paraphrase -> concept``. No weights are downloaded: give a checkpoint file.

    python -m bench.sd_eval --checkpoint sd-v1-4.safetensors --erase celebs10.txt --keep celebs_keep.txt \\
        --type person --anchor "a person" --images 25 --out results/sd_eval_cfr
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench.common import environment, write_json

METHODS = ("cfr", "mace")


def read_list(path: str | None, flag: str) -> str:
    if not path:
        return ""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"{flag}: {path!r} is not a file")
    return p.read_text(encoding="utf-8")


def build_prompt(args, ckpt_name: str, erase: str, keep: str, held_out: str) -> dict:
    """checkpoint -> CFR | Mass Erase -> Erasure Check (base = the checkpoint's own MODEL)."""
    ckpt = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}
    common = {"model": ["ckpt", 0], "clip": ["ckpt", 1], "concepts": erase, "concept_type": args.type,
              "anchor": args.anchor, "preserve": keep, "builtin_preserve": True}
    if args.method == "cfr":
        edit = {"class_type": "MaceRefineCrossAttention",
                "inputs": {**common, "lambda_": args.lamb, "preserve_scale": 1.0}}
    else:
        edit = {"class_type": "MaceMassErase",
                "inputs": {**common, "vae": ["ckpt", 2], "concept_file": "", "run_name": "sd_eval",
                           "cfr_lambda": args.lamb, "preserve_scale": 1.0, "lora_steps": args.lora_steps,
                           "lora_lr": 0.0, "images_per_concept": 8, "image_size": args.size,
                           "sampling_steps": args.steps, "seed": args.seed, "fusion_lambda": 1e-3}}
    check = {"class_type": "MaceErasureCheck", "inputs": {
        "base_model": ["ckpt", 0], "clip": ["ckpt", 1], "erased_model": ["erase", 0], "vae": ["ckpt", 2],
        "concepts": erase, "held_out": held_out, "keep": keep, "concept_type": args.type, "anchor": args.anchor,
        "images_per_set": args.images, "seed": args.seed, "steps": args.steps, "cfg": args.cfg,
        "width": args.size, "height": args.size, "sampler_name": args.sampler, "scheduler": args.scheduler,
        "draws": args.draws, "other_candidates": read_list(args.others, "--others")}}
    return {"ckpt": ckpt, "erase": edit, "check": check}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint file (SD1.x / SD2.x / SDXL)")
    ap.add_argument("--erase", required=True, help="file: the concepts to erase")
    ap.add_argument("--keep", required=True, help="file: the concepts to keep")
    ap.add_argument("--held-out", default=None, help="file: held-out words, 'word, word -> concept' per line")
    ap.add_argument("--others", default=None, help="file: extra look-alikes for the judge")
    ap.add_argument("--method", choices=METHODS, default="cfr")
    ap.add_argument("--type", choices=("object", "person", "style"), default="person")
    ap.add_argument("--anchor", default="", help="'' = the type's default")
    ap.add_argument("--lamb", type=float, default=1.0, help="CFR lambda")
    ap.add_argument("--lora-steps", type=int, default=0, help="MACE LoRA steps (0 = the type's default)")
    ap.add_argument("--images", type=int, default=25, help="images per set (erased, held-out, kept) and model")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--scheduler", default="karras")
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--comfyui", default=None, help="ComfyUI checkout (default $COMFYUI_PATH, ~/ComfyUI)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    ap.add_argument("--out", default="bench/results/sd_eval", help="output folder")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        raise SystemExit(f"--checkpoint: {args.checkpoint!r} is not a file")
    erase, keep = read_list(args.erase, "--erase"), read_list(args.keep, "--keep")
    held_out = read_list(args.held_out, "--held-out")
    from headless.bootstrap import bootstrap
    from headless.runner import run_prompt

    ckpt = os.path.abspath(args.checkpoint)
    env = bootstrap(args.comfyui, extra_model_dirs={"checkpoints": [os.path.dirname(ckpt)]}, custom_nodes="pack",
                    cpu=True if args.cpu else None)
    fp = env.folder_paths
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    previous = fp.get_output_directory()
    fp.set_output_directory(out)
    t0 = time.perf_counter()
    try:
        res = run_prompt(build_prompt(args, os.path.basename(ckpt), erase, keep, held_out), quiet=True)
    finally:
        fp.set_output_directory(previous)
    if not res.success:
        raise SystemExit(f"sd_eval: the run failed: {res.error_summary}")
    check_json = ((res.history.get("outputs") or {}).get("check") or {}).get("text", [""])[0].splitlines()[-1]
    data = json.loads(Path(check_json).read_text())
    report = {"bench": "sd_eval", "env": environment(), "device": str(env.device), "checkpoint": ckpt,
              "method": args.method, "settings": {k: v for k, v in vars(args).items() if k != "checkpoint"},
              "minutes": round((time.perf_counter() - t0) / 60, 2), "check_json": check_json,
              "rows": [{**r, "method": "none" if r["method"] == "none" else args.method} for r in data["rows"]]}
    write_json(os.path.join(out, "sd_eval.json"), report)
    print(data["rows"])
    return report


if __name__ == "__main__":
    main()
