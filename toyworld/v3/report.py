"""Report the shipped toy world v3: prompt following, the scorer on ground truth, the name geometry.

    python -m toyworld.v3.report [--out docs/results/toyworld_v3.json]     # ~4 min on 2 threads

Prompt following over all 1,200 names (one prompt each) and their nicknames, and 10 prompts per
style; the scorer's accuracy on procedural ground truth (clean and augmented); and the geometry of
the frozen text encoder's name tokens next to v2's (``bench.name_geometry.world_geometry``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import evaluate, scorer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/results/toyworld_v3.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bench.name_geometry import world_geometry
    t0 = time.time()
    world = evaluate.load_world()
    report = {"generator": world.metadata, "probe": world.probe_metadata,
              "scorer_ground_truth": scorer.probe_accuracy(world.probe, n=2048, seed=4321),
              "scorer_ground_truth_augmented": scorer.probe_accuracy(world.probe, n=2048, seed=4322, augmented=True),
              "prompt_following": evaluate.prompt_following(world),
              "geometry": world_geometry("v3", world.text_encoder),
              "sampling": {"ddim_steps": evaluate.DEFAULT_STEPS, "cfg": evaluate.DEFAULT_CFG},
              "seconds": None}
    report["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["prompt_following"], indent=1))
    print(json.dumps(report["scorer_ground_truth"]))
    print(json.dumps(report["geometry"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
