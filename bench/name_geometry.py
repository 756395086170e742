"""Whether a linear K/V edit can separate erased names from the rest — the name-token geometry of
toy worlds v2 and v3 — and how concept-specific the MACE LoRAs are in v2.

* Geometry of the name-token features ("a photo of <name>", the name's last token): the share of
  centred variance in the top k singular directions; R^2 of an additive fit on the attribute words
  (v2: colour + shape + place; v3: colour, its only attribute word); how much of a retained name's
  feature lies outside / inside the span of the first N erased names (``span_measures``).
* LoRA specificity (10 names, the paper's LoRA and with ``lora_preserve`` 10): relative K/V change
  |ΔW c| / |W c| on the LoRA's own name token, on the other erased names, on the retained names'
  tokens and over every position of retained prompts (mean over LoRAs and weights).

    python -m bench.name_geometry          # ~2 min on one core; writes docs/results/name_geometry.json
    python -m bench.name_geometry --worlds v2 v3 --out docs/results/world_geometry.json
                                           # the geometry alone, both worlds side by side (~1 min)
"""
from __future__ import annotations

import argparse
import glob
import tempfile

import torch

from bench.common import write_json
from mace_ops.lora_file import load_concept_lora
from toyworld.v2 import erase, evaluate, vocab


def name_features(enc, names, template="a photo of {}"):
    out = []
    for n in names:
        prompt = template.format(n)
        out.append(enc.encode([prompt])[0].features[len(enc.tokenize(prompt))])  # the name's last token
    return torch.stack(out).double()


def span_measures(erased: torch.Tensor, retained: torch.Tensor) -> dict:
    """How much of each retained feature the span of the erased ones holds, averaged: the residual
    norm outside the span over the feature's norm (``outside``, the v2 bench's number) and the share
    of its energy inside the span (``energy_inside``)."""
    proj = erased.T @ torch.linalg.lstsq(erased.T, retained.T).solution           # (d, R)
    outside = (retained.T - proj).norm(dim=0) / retained.norm(dim=1)
    return {"outside": round(float(outside.mean()), 4), "energy_inside": round(float((1 - outside ** 2).mean()), 4)}


def geometry(F: torch.Tensor, attributes: torch.Tensor, retained: slice, counts=(1, 10, 50, 100)) -> dict:
    """Name-token geometry: centred variance in the top-k directions; R^2 of an additive fit on the
    attribute words (``attributes``: (N, k) value indices, one column per attribute); the span of the
    first n names against the ``retained`` ones, uncentred (as the UNet reads them) and centred
    (the mean over all names removed, i.e. what tells names apart)."""
    Fc = F - F.mean(0)
    energy = torch.linalg.svdvals(Fc) ** 2
    cum = (energy.cumsum(0) / energy.sum()).tolist()
    # full-rank design: one-hots without each attribute's first value, plus a constant
    X = torch.cat([torch.nn.functional.one_hot(attributes[:, j]).double()[:, 1:] for j in range(attributes.shape[1])]
                  + [torch.ones(len(F), 1).double()], 1)
    fit = X @ torch.linalg.pinv(X) @ F
    r2 = 1 - float((F - fit).pow(2).sum() / Fc.pow(2).sum())
    spans = {n: span_measures(F[:n], F[retained]) for n in counts}
    spans_c = {n: span_measures(Fc[:n], Fc[retained]) for n in counts}
    return {"names": len(F), "retained": len(F[retained]), "dims": F.shape[1],
            "variance_in_top_k": {k: round(cum[k - 1], 4) for k in (5, 10, 18, 30, 100) if k <= len(cum)},
            "additive_attribute_r2": round(r2, 4),
            "retained_residual_outside_span_of_erased": {k: v["outside"] for k, v in spans.items()},
            "retained_energy_inside_span_of_erased": {k: v["energy_inside"] for k, v in spans.items()},
            "centred_retained_energy_inside_span_of_erased": {k: v["energy_inside"] for k, v in spans_c.items()}}


def load_world(world_name: str):
    if world_name == "v2":
        return evaluate.load_world()
    from toyworld.v3 import evaluate as v3_evaluate
    return v3_evaluate.load_world()


def world_geometry(world_name: str, enc) -> dict:
    """``geometry`` of every name of a world: v2 (attributes colour, shape, place; retained = names
    150-199) or v3 (attribute: colour, the only attribute word; retained = names 1000-1199)."""
    if world_name == "v2":
        return geometry(name_features(enc, vocab.NAMES), torch.tensor(vocab.APPEARANCE), slice(150, 200))
    from toyworld.v3 import vocab as v3
    return geometry(name_features(enc, v3.NAMES), torch.tensor(v3.COLOR_OF).view(-1, 1), slice(1000, 1200))


def lora_specificity(world, task, setting: dict, feats: dict) -> dict:
    W0 = world.kv_weights()
    with tempfile.TemporaryDirectory() as d:
        erase.mace_erase(world, task, lora_dir=d, **setting)
        rows = {"own_name_token": [], "other_erased_names": [], "retained_name_tokens": [],
                "all_positions_of_retained_prompts": []}
        for path in sorted(glob.glob(d + "/*.safetensors")):
            lora = load_concept_lora(path)
            i = task.erase.index(lora.info["concept"][0])
            others = torch.cat([feats["erased"][:i], feats["erased"][i + 1:]])
            for k, D in lora.deltas().items():
                D, W = D.double(), W0[k].double()
                rel = lambda C: float(((C @ D.T).norm(dim=1) / (C @ W.T).norm(dim=1)).mean())  # noqa: E731
                rows["own_name_token"].append(rel(feats["erased"][i:i + 1]))
                rows["other_erased_names"].append(rel(others))
                rows["retained_name_tokens"].append(rel(feats["retained"]))
                rows["all_positions_of_retained_prompts"].append(rel(feats["retained_prompts"]))
    return {k: round(sum(v) / len(v), 4) for k, v in rows.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/results/name_geometry.json")
    ap.add_argument("--worlds", nargs="+", choices=("v2", "v3"), default=None,
                    help="only the name-token geometry of these worlds (no LoRA specificity)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.worlds:
        out = {"bench": "name_geometry", "worlds": {}}
        for w in args.worlds:
            world = load_world(w)
            out["worlds"][w] = {"world": world.metadata, "geometry": world_geometry(w, world.text_encoder)}
            print(w, out["worlds"][w]["geometry"])
        write_json(args.out, out)
        return
    world = evaluate.load_world()
    enc = world.text_encoder
    preserve, retained, _ = erase.preserve_and_retained("name")
    task = erase.Task("name", tuple(vocab.NAMES[:10]), tuple(preserve))
    feats = {"erased": name_features(enc, task.erase), "retained": name_features(enc, retained),
             "retained_prompts": torch.cat([e.features for e in enc.encode([f"a photo of {n}" for n in retained])]).double()}
    out = {"bench": "name_geometry", "world": world.metadata,
           "geometry": world_geometry("v2", enc),
           "lora_relative_kv_change_10_names": {
               "paper_lora": lora_specificity(world, task, erase.mace_setting("reference"), feats),
               "lora_preserve_10": lora_specificity(world, task, erase.mace_setting("reference", lora_preserve=10.0),
                                                    feats)}}
    write_json(args.out, out)
    print(out["geometry"], out["lora_relative_kv_change_10_names"], sep="\n")


if __name__ == "__main__":
    main()
