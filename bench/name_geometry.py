"""Why linear K/V edits cannot separate 100 erased names from the rest in toy world v2, and how
concept-specific the MACE LoRAs are (the numbers behind the README's issue-16 section).

* Geometry of the name-token features ("a photo of <name>", the name's last token): the share of
  centred variance in the top k singular directions; R^2 of an additive colour + shape + place fit;
  how much of a retained name's feature lies outside the span of the first N erased names.
* LoRA specificity (10 names, the paper's LoRA and with ``lora_preserve`` 10): relative K/V change
  |ΔW c| / |W c| on the LoRA's own name token, on the other erased names, on the retained names'
  tokens and over every position of retained prompts (mean over LoRAs and weights).

    python -m bench.name_geometry          # ~2 min on one core; writes docs/results/name_geometry.json
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


def geometry(F: torch.Tensor) -> dict:
    Fc = F - F.mean(0)
    energy = torch.linalg.svdvals(Fc) ** 2
    cum = (energy.cumsum(0) / energy.sum()).tolist()
    look = torch.tensor(vocab.APPEARANCE)
    # full-rank design: one-hots without each attribute's first value, plus a constant
    X = torch.cat([torch.nn.functional.one_hot(look[:, j]).double()[:, 1:] for j in range(3)]
                  + [torch.ones(len(F), 1).double()], 1)
    fit = X @ torch.linalg.pinv(X) @ F
    r2 = 1 - float((F - fit).pow(2).sum() / Fc.pow(2).sum())
    retained = F[150:]
    outside = {}
    for n in (1, 10, 50, 100):
        A = F[:n]
        proj = A.T @ torch.linalg.lstsq(A.T, retained.T).solution
        outside[n] = float(((retained.T - proj).norm(dim=0) / retained.norm(dim=1)).mean())
    return {"variance_in_top_k": {k: round(cum[k - 1], 4) for k in (5, 10, 18, 30)},
            "additive_attribute_r2": round(r2, 4),
            "retained_residual_outside_span_of_erased": {k: round(v, 4) for k, v in outside.items()}}


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
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    world = evaluate.load_world()
    enc = world.text_encoder
    preserve, retained, _ = erase.preserve_and_retained("name")
    task = erase.Task("name", tuple(vocab.NAMES[:10]), tuple(preserve))
    feats = {"erased": name_features(enc, task.erase), "retained": name_features(enc, retained),
             "retained_prompts": torch.cat([e.features for e in enc.encode([f"a photo of {n}" for n in retained])]).double()}
    out = {"bench": "name_geometry", "world": world.metadata,
           "geometry": geometry(name_features(enc, vocab.NAMES)),
           "lora_relative_kv_change_10_names": {
               "paper_lora": lora_specificity(world, task, erase.mace_setting("reference"), feats),
               "lora_preserve_10": lora_specificity(world, task, erase.mace_setting("reference", lora_preserve=10.0),
                                                    feats)}}
    write_json(args.out, out)
    print(out["geometry"], out["lora_relative_kv_change_10_names"], sep="\n")


if __name__ == "__main__":
    main()
