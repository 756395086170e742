"""Report the shipped toy world v2: the base model's prompt following and the probe's accuracy.

    python -m toyworld.v2.report [--out docs/results/toyworld_v2.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import evaluate, scorer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/results/toyworld_v2.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    world = evaluate.load_world()
    report = {"generator": world.metadata, "probe": world.probe_metadata,
              "probe_ground_truth": scorer.probe_accuracy(world.probe, n=2048, seed=4321),
              "probe_ground_truth_augmented": scorer.probe_accuracy(world.probe, n=2048, seed=4322, augmented=True),
              "prompt_following": evaluate.prompt_following(world),
              "sampling": {"ddim_steps": evaluate.DEFAULT_STEPS, "cfg": evaluate.DEFAULT_CFG},
              "seconds": None}
    report["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["prompt_following"], indent=1))
    print(json.dumps(report["probe_ground_truth"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
