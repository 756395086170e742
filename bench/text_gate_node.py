"""MACE Text Gate (compiled) in real ComfyUI on the tests' tiny random-weight checkpoints: what one
run costs with a cold and a warm caption cache, and how much it moves the conditioning of prompts
with and without the concept.

Real ComfyUI (``$COMFYUI_PATH``), a fresh base directory (so the first run's cache is cold), the
tiny SD1.5 (CLIP-L, 2 layers), SD2.x (OpenCLIP-H, 3) and SDXL (CLIP-L + bigG, 3) layouts of
``tests/comfy_harness``. The node runs with its defaults and the pack's 1,000 general captions on
"van gogh" (style, anchor "art", preserve "claude monet"), twice: cold, then warm (the captions'
residuals read from ``<user>/mace_cache``). The change of a prompt's conditioning is
|c_gated − c| / |c| over the whole 77-token window (CLIPTextEncode's output), on four sets:

* concept, in sample:  the 30 style templates filled with "van gogh" (what the gate is fitted on)
* concept, held out:   the 30 object templates filled with "van gogh"
* preserved:           the 30 style templates filled with "claude monet"
* other captions:      30 general captions after the 1,000 the gate is calibrated on

Means with standard errors over the prompts (n = 30 each). Random weights: the numbers say the
mechanism runs and where it opens in these layouts, not what it does on real SD.

    nice python -m bench.text_gate_node [--out docs/results/text_gate_node.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATE = {"concepts": "van gogh", "concept_type": "style", "anchor": "", "preserve": "claude monet",
        "builtin_preserve": False, "quantile": 0.999}
FAMILIES = {"sd15": {"te_layers": 2}, "sd2": {}, "sdxl": {}}
CAPTIONS, N = 1000, 30


def _cond(clip, text):
    return clip.encode_from_tokens(clip.tokenize(text)).float()


def _change(clip, gated, text) -> float:
    """|c_gated - c| / |c| of ``text``'s conditioning."""
    c = _cond(clip, text)
    return float((_cond(gated, text) - c).norm() / c.norm())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "text_gate_node.json"))
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    args = ap.parse_args(argv)
    sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]
    import comfy_harness as ch

    h = ch.init_comfyui()
    from bench.common import environment, stats, write_json

    pack = h.pack_module
    pack.nodes.prior_input.PRIOR_CAPTIONS = CAPTIONS          # the node's default (the harness cuts it for tests)
    templates, prior = pack.mace_ops.templates, pack.mace_ops.prior
    fill = templates.fill
    sets = {
        "concept_in_sample": [fill(t, "van gogh") for t in templates.templates_for("style")][:N],
        "concept_held_out": [fill(t, "van gogh") for t in templates.templates_for("object")][:N],
        "preserved": [fill(t, "claude monet") for t in templates.templates_for("style")][:N],
        "other_captions": prior.general_captions(CAPTIONS + N)[CAPTIONS:],
    }
    node = pack.nodes.text_gate_node.MaceTextGate
    rows, t_all = [], time.time()
    for family in args.families:
        path = ch.make_tiny_checkpoint(os.path.join(tempfile.mkdtemp(), f"tiny_{family}.safetensors"), family,
                                       seed=0, **FAMILIES[family])
        with torch.inference_mode():
            _model, clip, _vae = ch.load_tiny_checkpoint(path)
            seconds = []
            for _ in ("cold", "warm"):
                t0 = time.perf_counter()
                gated, summary = node.execute(clip, **GATE).result
                seconds.append(round(time.perf_counter() - t0, 2))
            change = {name: stats([_change(clip, gated, p) for p in prompts]) for name, prompts in sets.items()}
        row = {"family": family, "seconds_cold": seconds[0], "seconds_warm": seconds[1],
               "cold_over_warm": round(seconds[0] / seconds[1], 1), "change": change,
               "summary": summary.splitlines()[:-1]}
        rows.append(row)
        print(family, {k: row[k] for k in ("seconds_cold", "seconds_warm", "cold_over_warm")},
              {k: (v["mean"], v["se"]) for k, v in change.items()}, flush=True)
    write_json(args.out, {"what": __doc__.split("\n\n")[0], "gate": GATE, "captions": CAPTIONS, "rows": rows,
                          "seconds": round(time.time() - t_all, 1), "environment": environment()})


if __name__ == "__main__":
    main()
