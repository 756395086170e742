"""MACE Refine Cross-Attention (CFR) on FLUX.1 and SD3.5's text-entry projection in real ComfyUI, on the
tests' tiny random-weight checkpoints: how far the concept prompts' projected conditioning moves
toward the anchor's, and how much preserved and unseen prompts' moves.

Real ComfyUI (``$COMFYUI_PATH``), the tiny FLUX.1-dev, FLUX.1-schnell and SD3.5 layouts of
``tests/dit_fixtures`` (FLUX: T5 64 wide into ``txt_in``; SD3.5: CLIP-L|G padded to 4096 and T5 4096
wide into ``context_embedder``). The node runs as the shipped ``erase_style_cfr_flux/sd35`` workflows
set it ("van gogh, vincent van gogh", style, anchor "art", preserve "claude monet / pablo picasso /
rembrandt" + the 20 built-in prompts, lambda 1, preserve_scale 1, concept tokens remapped), once
with the caption prior off (prior_weight 0) and once at the node's default (prior_weight 1, the
pack's 1,000 general captions; at SD3's 4096 width their sums cost minutes of CPU). With W the projection's weight before and W' after, b its bias, c a
prompt's conditioning (what the projection reads, every position) and a the anchor prompt's
(the same template with "art"), on the positions CFR pairs (``alignment.align_encoded``, concept
tokens included):

* toward_anchor = 1 - |W'c - Wa| / |Wc - Wa|   (0: unmoved, 1: the anchor's projected conditioning)
* change        = |(W' - W)c| / |Wc + b|        (whole window)

on four sets of n = 30 prompts: the concept in the 30 style templates (in sample), in the 30 object
templates (held out), a preserved painter ("claude monet", style templates) and 30 general captions
the node never saw (the 30 after the prior's 1,000). Means with standard errors over the prompts. Random weights: the numbers say the
edit lands where it should in these layouts, not what it does to real images.

    nice python -m bench.text_entry_node [--out docs/results/text_entry_node.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFR = {"concepts": "van gogh, vincent van gogh", "concept_type": "style", "anchor": "art",
       "preserve": "claude monet\npablo picasso\nrembrandt", "lambda_": 1.0, "preserve_scale": 1.0,
       "builtin_preserve": True, "erase_concept_tokens": True}
PRIOR_WEIGHTS = (0.0, 1.0)
CAPTIONS = 1000  # the node's PRIOR_CAPTIONS
FAMILIES = ("flux_dev", "flux_schnell", "sd35")
N = 30


def _checkpoint(df, family: str) -> str:
    path = os.path.join(tempfile.mkdtemp(), f"tiny_{family}.safetensors")
    if family == "sd35":
        return str(df.make_tiny_sd35_checkpoint(path))
    return str(df.make_tiny_flux_checkpoint(path, schnell=family == "flux_schnell"))


def _measure(pack, node, model, clip, family, prior_weight, sets, align) -> dict:
    from bench.common import stats     # imported late, as main imports the bench helpers after ComfyUI

    with torch.inference_mode():
        t0 = time.perf_counter()
        erased, summary = node.execute(model, clip, **CFR, prior_weight=prior_weight).result
        seconds = round(time.perf_counter() - t0, 2)
        entry = pack.nodes.comfy_text_entry.text_entry(model)
        (key,) = entry.keys
        W = pack.nodes.comfy_model.effective_weights(model, [key])[key].double()
        W2 = W + pack.nodes.comfy_model.get_record(erased).deltas[key].double()
        b = model.model.state_dict()[key[: -len("weight")] + "bias"].double().cpu()
        enc = entry.text_encoder(clip)
        result = {}
        for name, pairs in sets.items():
            change, toward = [], []
            for prompt, anchor in pairs:
                if anchor is None:
                    (o,) = enc.encode([prompt])
                else:
                    o, a = enc.encode([prompt, anchor])
                    pos = align(o, a, True)
                    c, e = o.features[list(pos.old)].double(), a.features[list(pos.new)].double()
                    toward.append(1.0 - float((c @ W2.T - e @ W.T).norm() / (c @ W.T - e @ W.T).norm()))
                c = o.features.double()
                change.append(float((c @ (W2 - W).T).norm() / (c @ W.T + b).norm()))
            result[name] = {"change": stats(change), **({"toward_anchor": stats(toward)} if toward else {})}
    row = {"family": family, "config": type(model.model.model_config).__name__, "projection": key,
           "width": [int(W.shape[1]), int(W.shape[0])], "prior_weight": prior_weight, "seconds": seconds,
           "sets": result, "summary": summary.splitlines()[0]}
    print(family, prior_weight, seconds,
          {k: {m: (v["mean"], v["se"]) for m, v in r.items()} for k, r in result.items()}, flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "text_entry_node.json"))
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    args = ap.parse_args(argv)
    sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]
    import comfy_harness as ch
    import dit_fixtures as df

    h = ch.init_comfyui()
    df.install_tiny_dit_hook()
    from bench.common import environment, write_json

    pack = h.pack_module
    pack.nodes.prior_input.PRIOR_CAPTIONS = CAPTIONS  # the node's default (the harness cuts it for tests)
    tpl, prior, align = pack.mace_ops.templates, pack.mace_ops.prior, pack.mace_ops.alignment.align_encoded
    style, objects = tpl.templates_for("style")[:N], tpl.templates_for("object")[:N]
    sets = {
        "concept_in_sample": [(tpl.fill(t, "van gogh"), tpl.fill(t, CFR["anchor"])) for t in style],
        "concept_held_out": [(tpl.fill(t, "van gogh"), tpl.fill(t, CFR["anchor"])) for t in objects],
        "preserved": [(tpl.fill(t, "claude monet"), None) for t in style],
        "other_captions": [(c, None) for c in prior.general_captions(CAPTIONS + N)[CAPTIONS:]],
    }
    node = pack.nodes.cfr_node.MaceRefineCrossAttention
    rows, t_all = [], time.time()
    for family in args.families:
        with torch.inference_mode():
            model, clip, _vae = ch.load_tiny_checkpoint(_checkpoint(df, family))
        for prior_weight in PRIOR_WEIGHTS:
            rows.append(_measure(pack, node, model, clip, family, prior_weight, sets, align))
    write_json(args.out, {"what": __doc__.split("\n\n")[0], "cfr": CFR, "n": N, "rows": rows,
                          "seconds": round(time.time() - t_all, 1), "environment": environment()})


if __name__ == "__main__":
    main()
