"""Which gate shape and temperature? The ACE-style gate's response to a prompt's similarity s (toy world v2).

The gate of concept i is g(s) with s the prompt's largest cosine to i's prototypes and tau_i its
threshold (``mace_ops.ace``):

* ``sigmoid`` (the first gate): sigmoid((s - tau_i) / T), 1/2 at the threshold, so every concept
  gives a prompt below its threshold a partial gate, and with many concepts they add up;
* ``ramp`` (the default): tanh(max(0, s - tau_i) / T), exactly 0 at and below the threshold.

Each configuration is the same fitted gate (thresholds, prototypes and directions do not depend on
the shape or T) evaluated with the celebrity protocol (``evaluate.mass_metrics``, n = 200 per set,
the seeds of ``bench.mass_quality``). Also ``retained_gate``: the mean, over the retained set's
prompts, of the summed gate over all concepts at the last position (what the retained names get).

    python -m bench.gate_shape       # docs/results/gate_shape.json (~6 min, 2 cores)
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from bench.common import environment, markdown_table, toy_v2_args, toy_v2_parser, toy_v2_setup, write_json
from toyworld.v2 import erase, evaluate, vocab

COLUMNS = ["kind", "concepts", "gate", "temperature", "H", "se_H", "acc_e", "acc_g", "acc_s", "fd", "retained_gate"]
CONFIGS = (("sigmoid", 0.02), ("sigmoid", 0.005), ("ramp", 0.02), ("ramp", 0.01), ("ramp", 0.005))


def main(argv=None) -> None:
    ap = toy_v2_parser(__doc__)
    ap.add_argument("--counts", type=int, nargs="*", default=[100], help="numbers of erased names")
    ap.add_argument("--style-counts", type=int, nargs="*", default=[10], help="numbers of erased styles")
    args = toy_v2_args(ap, argv, out="bench/results/gate_shape.json", threads=2)
    world = toy_v2_setup(args).world
    t0, rows = time.time(), []
    for kind, counts in (("name", args.counts), ("style", args.style_counts)):
        preserve, retained, _ = erase.preserve_and_retained(kind)
        pool = vocab.NAMES if kind == "name" else vocab.STYLES
        for count in counts:
            task = erase.Task(kind, tuple(pool[:count]), tuple(preserve))
            fitted = erase.ace_erase(world, task)
            kept = evaluate.prompt_sets(kind, task.erase, retained)[2]
            feats = torch.stack([e.features.float() for e in world.text_encoder.encode(kept.prompts)])
            for shape, temperature in CONFIGS:
                gate = replace(fitted, shape=shape, temperature=temperature)
                m, _ = evaluate.mass_metrics(world, kind, task.erase, retained, context_transform=gate)
                rows.append({"kind": kind, "concepts": count, "gate": shape, "temperature": temperature,
                             **{k: v for k, v in m.row().items() if k not in ("kind", "concepts")},
                             "retained_gate": round(float(gate.gates(feats)[:, -1].sum(-1).mean()), 4)})
                print({k: rows[-1][k] for k in COLUMNS}, f"[{(time.time() - t0) / 60:.1f} min]", flush=True)
    write_json(args.out, {"bench": "gate_shape", "env": environment(), "world": world.metadata,
                          "minutes": round((time.time() - t0) / 60, 1), "rows": rows})
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
