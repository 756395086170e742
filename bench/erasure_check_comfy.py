"""Seconds per image of ``MACE Erasure Check`` in real ComfyUI on the tiny SD1.5-layout checkpoint.

The node as a user runs it (``nodes.erasure_check_node``), on the test suite's tiny random-weight
checkpoint (``tests/comfy_harness.make_tiny_sd15_checkpoint``: a one-level UNet, 1-layer CLIP,
TAESD), CPU: the workflow's candidates (the anchor, 1 erased concept, 3 kept, 2 others = 7), 8
draws, 2 images per set; the sampling steps and image size are flags. The per-image seconds of
sampling (each model) and of judging come from the node's own JSON. What a real SD1.5 costs per
image is ``bash bench/gpu_suite.sh`` (section ``check``).

    python -m bench.erasure_check_comfy --out docs/results/erasure_check_comfy.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import environment, write_json

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--images", type=int, default=2, help="images per set")
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/erasure_check_comfy.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_harness import init_comfyui, load_tiny_checkpoint, make_tiny_sd15_checkpoint  # type: ignore

    with tempfile.TemporaryDirectory(prefix="mace-check-") as base:
        h = init_comfyui(base)
        h.require_pack()
        path = make_tiny_sd15_checkpoint(Path(base) / "tiny.safetensors", clip_layers=1, seed=0)
        node = h.pack_module.nodes.erasure_check_node.MaceErasureCheck
        with torch.inference_mode():
            model, clip, vae = load_tiny_checkpoint(path, clip_layers=1)
            erased = model.clone()
            keys = [k for k in erased.model_state_dict() if k.endswith("attn2.to_k.weight")]
            erased.add_patches({k: ("diff", (0.1 * torch.randn_like(erased.model_state_dict()[k]),)) for k in keys})
            t0 = time.perf_counter()
            out = node.execute(model, clip, erased, vae, "van gogh, vincent van gogh", "gogh -> van gogh",
                               "claude monet\npablo picasso\nrembrandt", "style", "art", args.images, 0, args.steps,
                               7.0, args.size, args.size, "euler", "normal", args.draws,
                               "paul cezanne\npaul gauguin")
            total = time.perf_counter() - t0
        data = json.loads(Path(out.result[2]).read_text())
    print(out.result[0])
    write_json(args.out, {"bench": "erasure_check_comfy", "env": environment(), "checkpoint": "tiny SD1.5 layout",
                          "settings": {**vars(args), "candidates": len(data["candidates"])},
                          "seconds_per_image": {k: round(v, 3) for k, v in data["seconds_per_image"].items()},
                          "seconds_total": round(total, 1), "images": 2 * 3 * args.images})


if __name__ == "__main__":
    main()
