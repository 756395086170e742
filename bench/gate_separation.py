"""Can any threshold of the ACE-style gate tell erased names from retained ones? (toy world v2)

The gate opens concept i's null-out on a prompt when the prompt's largest cosine to i's prototypes
(``mace_ops.ace.prompt_peaks``) exceeds tau_i. This compares the shared floor's settings
(``ACEConfig.open_rate``: 1 = no floor, the per-concept quantile alone; 0.05 = the pack's default),
sweeps a margin added to tau_i (``ACEConfig.margin``; the pack's default is 0) and reports, per
number of erased names:

* ``nick_open``: fraction of the erased names' *nickname* prompts (never given to the method) on
  which the concept's own gate opens (peak > tau_i) — what erasing them needs (high is good);
* ``retained_open``: fraction of the 50 retained names' prompts (never given to the method) on
  which *any* erased concept's gate opens — what damages them (low is good);
* ``cv_open``: the same "any gate opens" rate estimated without the retained set: tau fitted on half
  the preserve names (and the captions), measured on the other half, both ways (2-fold, by name);
  the per-concept quantile is approximated there by the 0.999 quantile over name groups.

Prompts: every name template with each word (12 per word). Not an image metric: a gate that opens
on a retained name does not always change its image, so read this beside ``bench.mass_quality``.

``--site last_mlp_input`` reads the gate at the last text layer's MLP input instead of the encoder's
output (``LastMlpInput``): the residual there, centred as that layer's ``ln2`` does before it scales.
A hidden unit of that MLP computes w·x + b of ``ln2``'s output, so with w = p / gamma it computes
the cosine to a prototype p there exactly (``mace_ops.text_gate``; the standardised residual has a
fixed norm). The rates read here bound what a gate *compiled into* that MLP (a thresholded ramp of
two units per concept, a weight edit a stock loader could carry) could decide. Its H cannot exceed
HM(1, nick_open, 1 - retained_open), even if every opened prompt were erased perfectly.

    python -m bench.gate_separation     # docs/results/gate_separation.json (~2 min)
    python -m bench.gate_separation --site last_mlp_input --out docs/results/gate_separation_mlp_input.json
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from bench.common import environment, markdown_table, toy_v2_args, toy_v2_parser, toy_v2_setup, write_json
from mace_ops.ace import ACEConfig, prompt_peaks, shared_floor
from mace_ops.text_gate import centred
from toyworld.v1.adapters import ToyResiduals
from toyworld.v2 import erase, vocab

COLUMNS = ["site", "concepts", "open_rate", "margin", "nick_open", "retained_open", "cv_open", "mean_tau", "h_bound"]
SITES = ("output", "last_mlp_input")


class LastMlpInput(ToyResiduals):
    """The toy encoder read at its last layer's MLP input: the residual entering that layer's ``ln2``,
    centred over the width (``mace_ops.text_gate.centred``: where a compiled unit reads cosines)."""

    def encode(self, prompts):
        return centred(super().encode(prompts))


def at_site(world, site: str):
    """``world`` itself, or a stand-in whose ``text_encoder`` reads ``site`` (all a gate fit needs)."""
    return world if site == "output" else SimpleNamespace(text_encoder=LastMlpInput(world.model))


def h_bound(nick_open: float, retained_open: float) -> float:
    """HM(1, nick_open, 1 - retained_open): the H of a gate with these decisions that erased every
    prompt it opened on perfectly and never touched one it stayed closed on."""
    parts = (1.0, nick_open, 1.0 - retained_open)
    return 0.0 if min(parts) <= 0 else 3 / sum(1 / p for p in parts)


def peaks(world, gate, words):
    """(words, templates, n): every name template filled with each word."""
    prompts = [t.format(n=w) for w in words for t in vocab.NAME_TEMPLATES]
    p = prompt_peaks(gate, world.text_encoder.encode(prompts))
    return p.reshape(len(words), len(vocab.NAME_TEMPLATES), -1)


def measure(world, preserve, retained, count, open_rates, margins):
    """Rows for ``count`` erased names: one gate per open rate; they differ only in their thresholds,
    so every prompt's peaks are computed once."""
    task = erase.Task("name", tuple(vocab.NAMES[:count]), tuple(preserve))
    gates = [erase.ace_erase(world, task, config=ACEConfig(open_rate=a)) for a in open_rates]
    gate = gates[0]
    assert all(torch.equal(g.prototypes, gate.prototypes) for g in gates), "open_rate changed the prototypes"
    tpls = task.templates
    kept = torch.stack([prompt_peaks(gate, world.text_encoder.encode([t.replace("{}", w) for t in tpls])).amax(0)
                        for w in list(preserve) + [task.anchor]])                       # (names, n)
    captions = prompt_peaks(gate, world.text_encoder.encode(erase.prior_captions())).amax(0)
    nick = peaks(world, gate, [vocab.NICKNAMES[n][0] for n in task.erase])
    own = nick[torch.arange(count), :, torch.arange(count)]                              # (count, T)
    ret = peaks(world, gate, list(retained))
    perm = torch.randperm(len(kept) - 1, generator=torch.Generator().manual_seed(0))
    folds = (perm[: len(perm) // 2], perm[len(perm) // 2:])
    rows = []
    for open_rate, fitted in zip(open_rates, gates):
        for margin in margins:
            tau = fitted.thresholds + margin
            cv = []
            for fit, held in (folds, folds[::-1]):
                groups = kept[torch.cat([fit, torch.tensor([len(kept) - 1])])]
                floor = shared_floor(groups, list(range(len(groups))), open_rate)
                t = torch.maximum(torch.quantile(groups, 0.999, 0), captions).clamp(min=floor) + margin
                cv.append(float(((kept[held] - t).amax(-1) > 0).float().mean()))
            nick_open = float((own > tau[:, None]).float().mean())
            retained_open = float(((ret - tau).amax(-1) > 0).float().mean())
            rows.append({"concepts": count, "open_rate": open_rate, "margin": margin,
                         "nick_open": round(nick_open, 3), "retained_open": round(retained_open, 3),
                         "h_bound": round(h_bound(nick_open, retained_open), 3),
                         "cv_open": round(sum(cv) / 2, 3), "mean_tau": round(float(tau.mean()), 4),
                         "n_nick": own.numel(), "n_retained": ret.shape[0] * ret.shape[1]})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    ap = toy_v2_parser(__doc__)
    ap.add_argument("--counts", type=int, nargs="*", default=[10, 50, 100])
    ap.add_argument("--margins", type=float, nargs="*", default=[0.0, 0.01, 0.02, 0.03, 0.04])
    ap.add_argument("--open-rates", type=float, nargs="*", default=[1.0, 0.05])
    ap.add_argument("--site", choices=SITES, default="output",
                    help="where the gate reads the text: output (the K/V inputs, the pack's gate) or "
                         "last_mlp_input (what a gate compiled into the last text MLP could read; LastMlpInput)")
    args = toy_v2_args(ap, argv, out="bench/results/gate_separation.json", threads=2)
    setup = toy_v2_setup(args)
    world, preserve, retained = at_site(setup.world, args.site), setup.preserve, setup.retained
    t0, rows = time.time(), []
    for count in args.counts:
        rows += [{"site": args.site, **r} for r in measure(world, preserve, retained, count, args.open_rates,
                                                           args.margins)]
    write_json(args.out, {"bench": "gate_separation", "env": environment(), "world": setup.world.metadata,
                          "minutes": round((time.time() - t0) / 60, 1), "rows": rows})
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
