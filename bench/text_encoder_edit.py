"""Is the K/V locus what caps mass erasure here? A text-encoder edit, measured (issue 16).

Every method of the pack edits cross-attention K/V *linearly* in the text encoder's output
features, and in toy world v2 a retained name's feature lies 96% inside the span of 100 erased
ones (``bench.name_geometry``): no such edit keeps the retained names at 100 (even ``oracle``,
CFR preserving the retained set itself, reaches only H 0.82 at 10 names). This bench fine-tunes a
part of the text encoder instead, which is nonlinear in the token, on CFR's objective moved into
feature space:

    min_θ  mean_e ||f_θ(e) − f_0(e[concept → anchor])||²  +  β · mean_p ||f_θ(p) − f_0(p)||²

e: MACE's templated prompts of the erased names; p: what CFR + prior preserves (the preserve
list's templated prompts, the anchor's, the caption prior); f_0 the shipped encoder. No retained
name and no nickname is seen. Adam, 512 + 512 prompts per step, fixed seeds. Parts:

* ``ff_last``: the last layer's MLP (66 k parameters);
* ``layers``: every transformer layer and the final LayerNorm (265 k; not the token table or
  the position embeddings).

Two options separate capacity from generalisation: ``--oracle`` preserves the retained set itself
(an upper reference, not a method); ``--synthetic K`` adds K prompts per step to the preservation
term whose name slot holds a random embedding drawn from N(mu, Sigma) of the named words' token
embeddings (erased + preserve list): stand-ins for the names nobody listed, no held-out word used.

Not a method of the pack (it would edit CLIP, and this world's names are one token each): a
measurement of where the ceiling lies. ``--runs`` picks (part, β) pairs. The prompt sets and seeds are ``bench.mass_quality``'s,
so its rows compare directly. ~4 min per (part, count) on one core.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from bench.common import (check_count, environment, markdown_table, print_table, toy_v2_args, toy_v2_parser,
                          toy_v2_setup, write_json)
from bench.plot import save_panels
from toyworld.v1 import diffusion
from toyworld.v1.evaluate import ToyWorld
from toyworld.v2 import erase, evaluate

PARTS = {
    "ff_last": "the last text layer's MLP",
    "layers": "every text layer + final LayerNorm (not the token table or positions)",
}
COLUMNS = ["part", "concepts", "steps", "beta", "oracle", "H", "acc_e", "acc_g", "acc_s", "se_s", "integrity", "fd", "seconds"]


def trainable(text_encoder, part: str) -> list[torch.nn.Parameter]:
    last = f"layers.{len(text_encoder.layers) - 1}.ff."
    keep = (lambda n: n.startswith(last)) if part == "ff_last" else (lambda n: n.startswith(("layers.", "ln_final.")))
    return [p for n, p in text_encoder.named_parameters() if keep(n)]


def synthetic_words(world, task: erase.Task, seed: int):
    """A sampler of ``k`` token embeddings from N(mu, Sigma) of the given words' embeddings (erased +
    preserve list: what the user named, no held-out word): stand-ins for names nobody listed."""
    table = world.model.text.tok.weight.detach().double()
    ids = [world.model.vocab.TOKEN_ID[w] for w in task.erase + task.preserve]
    e = table[ids]
    mu, cov = e.mean(0), torch.cov(e.T) + 1e-4 * torch.eye(e.shape[1], dtype=torch.float64)
    chol, gen = torch.linalg.cholesky(cov), torch.Generator().manual_seed(seed + 1)
    return lambda k: (mu + torch.randn(k, e.shape[1], generator=gen, dtype=torch.float64) @ chol.T).float()


def edit_text_encoder(world, task: erase.Task, part: str, *, steps: int, beta: float = 1.0, lr: float = 1e-3,
                      batch: int = 512, seed: int = 0, synthetic: int = 0):
    """A copy of the world's text encoder with ``part`` fitted to the objective above; ``synthetic`` > 0
    adds that many prompts per step to the preservation term whose concept slot holds a
    ``synthetic_words`` embedding (the anchor's templates, the slot's features kept as they were)."""
    vocab = world.model.vocab
    erase_prompts = [t.format(c) for c in task.erase for t in task.templates]   # template index = i % T
    keep_prompts = task.preserve_prompts() + erase.prior_captions()
    x_e, x_p = (diffusion.ids_tensor(p, vocab) for p in (erase_prompts, keep_prompts))
    x_t = diffusion.ids_tensor([t.format(task.anchor) for t in task.templates], vocab)   # the anchor's, once
    with torch.no_grad():
        y_t, y_p = world.model.text(x_t), world.model.text(x_p)
    text = copy.deepcopy(world.model.text).requires_grad_(False)
    params = trainable(text, part)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    if synthetic:
        draw = synthetic_words(world, task, seed)
        slot = (x_t == vocab.TOKEN_ID[task.anchor]).int().argmax(1)      # the anchor word's position
    for _ in range(steps):
        ie, ip = torch.randint(len(x_e), (batch,), generator=gen), torch.randint(len(x_p), (batch,), generator=gen)
        loss = (text(x_e[ie]) - y_t[ie % len(x_t)]).pow(2).mean() + beta * (text(x_p[ip]) - y_p[ip]).pow(2).mean()
        if synthetic:
            it = torch.randint(len(x_t), (synthetic,), generator=gen)
            emb = world.model.text.tok(x_t[it]).clone()
            emb[torch.arange(synthetic), slot[it]] = draw(synthetic)
            with torch.no_grad():
                y_s = world.model.text.forward_embeddings(emb)
            loss = loss + beta * (text.forward_embeddings(emb) - y_s).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return text.eval().requires_grad_(False)


def with_text_encoder(world, text) -> ToyWorld:
    model = copy.copy(world.model)          # shares the UNet; only ``text`` differs
    model._modules = dict(world.model._modules, text=text)
    return ToyWorld(model, world.probe, world.metadata, world.probe_metadata)


def parse_run(text: str) -> tuple[str, float]:
    part, _, beta = text.partition(":")
    if part not in PARTS:
        raise SystemExit(f"--runs: {text!r}: unknown part {part!r}; choose from {', '.join(PARTS)}")
    try:
        value = float(beta or 1.0)
    except ValueError:
        raise SystemExit(f"--runs: {text!r}: BETA must be a number, e.g. ff_last:10") from None
    if not value >= 0:
        raise SystemExit(f"--runs: {text!r}: BETA must be >= 0")
    return part, value


RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
# The same seeds' rows of the pack's methods, drawn beside the text-encoder edits: file -> methods.
REFERENCES = {"mass_quality.json": ("full", "cfr_prior"), "mass_quality_ace.json": ("ace",)}


def reference_rows(counts) -> list[dict]:
    """``REFERENCES``' name rows at ``counts`` (those whose files are present), tagged with ``part``."""
    out = []
    for name, methods in REFERENCES.items():
        path = RESULTS / name
        if path.is_file():
            out += [{**r, "part": r["method"]} for r in json.loads(path.read_text())["rows"]
                    if r["kind"] == "name" and r["method"] in methods and r["concepts"] in counts]
    return out


def save_plot(path: str, rows: list[dict]) -> None:
    """H and Acc_s against the number of erased names: each (part, beta), then the reference rows."""
    series_h, series_s = {}, {}
    for r in rows + reference_rows({r["concepts"] for r in rows}):
        label = (f"TE {r['part']} b={r['beta']:g}" + (" oracle" if r.get("oracle") else "")
                 + (" +synthetic" if r.get("synthetic") else "")) if "beta" in r else r["part"]
        series_h.setdefault(label, []).append((r["concepts"], r["H"], r["se_H"] or 0.0))
        series_s.setdefault(label, []).append((r["concepts"], r["acc_s"], r["se_s"]))
    save_panels(path, [
        {"title": "toy v2: text-encoder edits vs the pack, H", "x_label": "number of erased names",
         "y_label": "H (higher is better)", "series": series_h},
        {"title": "retained-name accuracy Acc_s", "x_label": "number of erased names",
         "y_label": "Acc_s (higher is better)", "series": series_s}], size=(600, 380))
    print(f"wrote {path}")


def main(argv=None) -> None:
    ap = toy_v2_parser(__doc__)
    ap.add_argument("--counts", type=int, nargs="+", default=[10, 100], help="numbers of erased names")
    ap.add_argument("--runs", nargs="+", default=["ff_last:1", "layers:1", "ff_last:10"],
                    help="PART:BETA pairs (parts: " + ", ".join(PARTS) + "; BETA weighs the preservation term)")
    ap.add_argument("--steps", type=int, nargs="+", default=[400, 800], help="training steps per count")
    ap.add_argument("--n", type=int, default=200, help="prompts per set (erased, held-out words, retained)")
    ap.add_argument("--synthetic", type=int, default=0,
                    help="synthetic stand-in names per step in the preservation term (synthetic_words); 0 = none")
    ap.add_argument("--oracle", action="store_true",
                    help="preserve the retained set itself instead of the preserve list (an upper reference, "
                         "as bench.mace_variants' oracle: it separates capacity from generalisation)")
    ap.add_argument("--plot", default=None, help="also write a PNG of H and Acc_s against the count")
    ap.add_argument("--plot-only", action="store_true", help="redraw --plot from --out's JSON, no training")
    ap.add_argument("--plot-with", nargs="*", default=[], help="more JSON files of this bench whose rows join the plot")
    args = toy_v2_args(ap, argv, out="bench/results/text_encoder_edit.json")
    if args.plot_only:
        if not args.plot:
            raise SystemExit("--plot-only: give --plot PATH for the PNG")
        files = [args.out, *args.plot_with]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise SystemExit(f"--plot-only: {', '.join(missing)} does not exist; run the bench first (or pass --out)")
        save_plot(args.plot, [r for f in files for r in json.loads(Path(f).read_text())["rows"]])
        return
    if len(args.steps) not in (1, len(args.counts)):
        raise SystemExit(f"--steps: give one value or one per count ({len(args.counts)})")
    runs = [parse_run(r) for r in args.runs]
    toy = toy_v2_setup(args)
    world, preserve, retained = toy.world, toy.preserve, toy.retained
    rows, t_start = [], time.time()
    for i, count in enumerate(args.counts):
        check_count(count, toy.most, "--counts")
        steps = args.steps[i if len(args.steps) > 1 else 0]
        task = erase.Task("name", tuple(erase.vocab.NAMES[:count]), tuple(retained if args.oracle else preserve))
        _, base_ret = evaluate.mass_metrics(world, "name", task.erase, retained, n_erased=args.n, n_retained=args.n)
        for part, beta in runs:
            t0 = time.perf_counter()
            text = edit_text_encoder(world, task, part, steps=steps, beta=beta, synthetic=args.synthetic)
            seconds = time.perf_counter() - t0
            m, _ = evaluate.mass_metrics(with_text_encoder(world, text), "name", task.erase, retained,
                                         base_retained=base_ret, n_erased=args.n, n_retained=args.n)
            rows.append({"part": part, **m.row(), "steps": steps, "beta": beta, "oracle": args.oracle,
                         "synthetic": args.synthetic,
                         "seconds": round(seconds, 1),
                         "what": PARTS[part]})
            print({k: rows[-1][k] for k in COLUMNS}, f"[{(time.time() - t_start) / 60:.1f} min]", flush=True)
    print()
    print_table(rows, COLUMNS)
    write_json(args.out, {"bench": "text_encoder_edit", "env": environment(), "world": world.metadata,
                          "minutes": round((time.time() - t_start) / 60, 1), "n_per_set": args.n,
                          "parts": PARTS, "rows": rows})
    if args.plot:
        save_plot(args.plot, rows)
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
