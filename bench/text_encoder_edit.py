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
* ``ff_last2``: the last two layers' MLPs (131 k); ``ff_last_in``: the last MLP's input layer (33 k);
* ``layers``: every transformer layer and the final LayerNorm (265 k; not the token table or
  the position embeddings).

Two options separate capacity from generalisation: ``--oracle`` preserves the retained set itself
(an upper reference, not a method); ``--synthetic K`` adds K prompts per step to the preservation
term whose name slot holds a random embedding drawn from N(mu, Sigma) of the named words' token
embeddings (erased + preserve list): stand-ins for the names nobody listed, no held-out word used.

``--split validation`` is where settings are chosen: the preserve list's first half is kept and
its second half scored, so the benchmark's retained set is never looked at until a setting is
run once on ``--split evaluation``. ``--mine M`` keeps, of M x K stand-ins drawn per step, the K
the edit moves most (hard negatives). ``--stand-ins jitter`` draws them around the named words
instead (``jittered_words``) and ``--exclude Q`` redraws any that lies nearer an erased name than
the named words lie to one another (``erased_neighbourhood``, quantile Q). ``--keep K`` preserves
only the first K names of the split's preserve list; ``--keep-aliases`` adds their nicknames to it
(a user listing the other names of the people to keep). ``--kv`` fits the pack's K/V stages (CFR +
prior, or full MACE) on top of the edited encoder, as a pipeline would. ``--kind style`` does the
same for styles.

Not a method of the pack (it would edit CLIP, and this world's names are one token each): a
measurement of where the ceiling lies. ``--runs`` picks (part, β) pairs. The prompt sets and seeds are ``bench.mass_quality``'s,
so its rows compare directly. ~4 min per (part, count) on one core.
"""
from __future__ import annotations

import copy
import time

import torch

from bench.common import (check_count, environment, markdown_table, plotted_kind, print_table, reference_rows,
                          saved_rows, toy_v2_args, toy_v2_parser, toy_v2_setup, write_json)
from bench.plot import save_h_and_acc_s
from toyworld.v1 import diffusion
from toyworld.v1.evaluate import ToyWorld
from toyworld.v2 import erase, evaluate

PARTS = {
    "ff_last": "the last text layer's MLP",
    "ff_last2": "the last two text layers' MLPs",
    "ff_last_in": "the last text layer's MLP, its first (input) layer only",
    "layers": "every text layer + final LayerNorm (not the token table or positions)",
}
# The pack's K/V stages run on top of the edited encoder (its features are what CFR / fusion see):
KV_STAGES = {
    "none": "the text-encoder edit alone",
    "cfr_prior": "then CFR + caption prior (erase.cfr_erase, prior_weight 1)",
    "full": "then full MACE, the pack's recommended settings (erase.mace_erase)",
}
COLUMNS = ["kind", "part", "kv", "rank", "split", "kept", "aliases", "concepts", "steps", "lr", "beta", "beta_s", "synthetic", "stand_ins", "jitter", "exclude", "mine", "oracle", "H", "acc_e", "acc_g", "acc_s", "se_s", "integrity", "fd", "seconds"]


def trainable(text_encoder, part: str) -> list[torch.nn.Parameter]:
    n = len(text_encoder.layers)
    last, second = f"layers.{n - 1}.", f"layers.{n - 2}."
    prefixes = {"ff_last": (last + "ff.",), "ff_last2": (second + "ff.", last + "ff."),
                "ff_last_in": (last + "ff.0.",), "layers": ("layers.", "ln_final.")}[part]
    keep = lambda n: n.startswith(prefixes)  # noqa: E731
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


def jittered_words(world, task: erase.Task, seed: int, scale: float):
    """A sampler of ``k`` token embeddings drawn around the named words (erased + preserve list): a
    named word's embedding plus N(0, scale² Sigma), Sigma that of the named words (``scale`` 1 is
    ``synthetic_words``' spread, centred on a name instead of on their mean): stand-ins nearer the
    names, where the unnamed ones lie (``exclude`` keeps them off the erased names themselves)."""
    table = world.model.text.tok.weight.detach().double()
    e = table[[world.model.vocab.TOKEN_ID[w] for w in task.erase + task.preserve]]
    cov = torch.cov(e.T) + 1e-4 * torch.eye(e.shape[1], dtype=torch.float64)
    chol, gen = torch.linalg.cholesky(cov), torch.Generator().manual_seed(seed + 3)
    return lambda k: (e[torch.randint(len(e), (k,), generator=gen)]
                      + scale * torch.randn(k, e.shape[1], generator=gen, dtype=torch.float64) @ chol.T).float()


def slot_stand_ins(world, task: erase.Task, words, gen: torch.Generator):
    """A sampler of ``k`` stand-in prompts (token embeddings, template index): one of the anchor's
    templates, drawn by ``gen``, with ``words(k)``'s embedding in the anchor's slot."""
    x_t = diffusion.ids_tensor([t.format(task.anchor) for t in task.templates], world.model.vocab)
    slot = (x_t == world.model.vocab.TOKEN_ID[task.anchor]).int().argmax(1)      # the anchor word's position

    def draw(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        it = torch.randint(len(x_t), (k,), generator=gen)
        emb = world.model.text.tok(x_t[it]).clone()
        emb[torch.arange(k), slot[it]] = words(k)
        return emb, it
    return draw


def template_features(world, task: erase.Task, words) -> torch.Tensor:
    """The base features of ``words`` in each of the task's templates, (T, words, L·D)."""
    with torch.no_grad():
        f = world.model.text(diffusion.ids_tensor([t.format(w) for w in words for t in task.templates],
                                                  world.model.vocab))
    return f.view(len(words), len(task.templates), -1).transpose(0, 1)


def named_spacing(world, task: erase.Task) -> tuple[torch.Tensor, torch.Tensor]:
    """(the erased names' prompts' base features per template (T, N, L·D), each erased prompt's
    distance to the nearest *other* named word's prompt in the same template (T·N,); erased +
    preserve list, named words only)."""
    n = len(task.erase)
    f = template_features(world, task, list(task.erase) + list(task.preserve))
    d = torch.cdist(f[:, :n], f)                                        # (T, erased, words)
    d[:, torch.arange(n), torch.arange(n)] = float("inf")
    return f[:, :n].contiguous(), d.min(2).values.flatten()


def erased_neighbourhood(world, task: erase.Task, quantile: float):
    """(``named_spacing``'s erased features, radius): the ``quantile`` of the named words' spacing.
    A stand-in nearer an erased name than that is nearer than the named words are to one another:
    preserving it would fight the erasure."""
    f_e, spacing = named_spacing(world, task)
    return f_e, torch.quantile(spacing, quantile).item()


def nearest_erased(f: torch.Tensor, t: torch.Tensor, f_e: torch.Tensor) -> torch.Tensor:
    """Each row of ``f`` (k, L·D): its distance to the nearest erased prompt of its own template
    ``t`` among ``f_e`` (T, N, L·D). In one template the words before the slot give equal features,
    so this is the distance from the slot on."""
    near = torch.empty(len(f))
    for tt in t.unique():
        near[t == tt] = torch.cdist(f[t == tt], f_e[tt]).min(1).values
    return near


def off_erased(draw, base_of, f_e: torch.Tensor, radius: float, tries: int = 50):
    """``draw`` (k -> (inputs, template index)) redrawn until ``k`` stand-ins lie at least ``radius``
    from every erased prompt of their template (base features ``base_of``)."""
    def draw_off(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        kept, n = [], 0
        for _ in range(tries):
            x, t = draw(2 * k)
            with torch.no_grad():
                far = nearest_erased(base_of(x).flatten(1), t, f_e) >= radius
            kept.append((x[far], t[far]))
            n += int(far.sum())
            if n >= k:
                return tuple(torch.cat(v)[:k] for v in zip(*kept))
        raise RuntimeError(f"fewer than {k} of {tries} x {2 * k} stand-ins lie {radius:.3g} or more from the erased "
                           "names; lower exclude or widen the stand-ins")
    return draw_off


def last_ff_inputs(text, ids: torch.Tensor) -> torch.Tensor:
    """The residual stream entering the last layer's MLP (B, L, dim): what ``ff_last`` acts on (the
    input of that layer's ``ln2``, caught by a hook on the encoder's own forward)."""
    caught = []
    hook = text.layers[-1].ln2.register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
    try:
        text(ids)
    finally:
        hook.remove()
    return caught[0]


def analogy_inputs(world, task: erase.Task, seed: int):
    """A sampler of ``k`` stand-in residuals at the last MLP's input: r(a) + r(b) − r(c), with a from
    the preserve list and b ≠ c any named words (erased + preserve list), in one template: the
    arithmetic that makes "other names" out of the named ones where features add up by attribute
    (``ff_last`` only). ``a`` is a kept word because names' features share most of their length,
    so r(a) + r(b) − r(c) lies near r(a): with an erased ``a`` the stand-in would undo the erasure."""
    words = task.preserve + task.erase
    if len(task.preserve) < 1 or len(words) < 3:
        raise ValueError("stand_ins 'analogy' needs a preserve list and at least 3 named words")
    ids = diffusion.ids_tensor([t.format(w) for w in words for t in task.templates], world.model.vocab)
    with torch.no_grad():
        r = last_ff_inputs(world.model.text, ids).view(len(words), len(task.templates), *ids.shape[1:], -1)
    gen = torch.Generator().manual_seed(seed + 2)

    def draw(k: int) -> torch.Tensor:
        a = torch.randint(len(task.preserve), (k,), generator=gen)
        b = torch.randint(len(words) - 1, (k,), generator=gen)
        b = b + (b >= a).long()                                         # b != a
        c = torch.randint(len(words) - 2, (k,), generator=gen)
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        c = c + (c >= lo).long()
        c = c + (c >= hi).long()                                        # c != a, b
        t = torch.randint(len(task.templates), (k,), generator=gen)
        return r[a, t] + r[b, t] - r[c, t], t
    return draw


def edit_text_encoder(world, task: erase.Task, part: str, *, steps: int, beta: float = 1.0, lr: float = 1e-3,
                      batch: int = 512, seed: int = 0, synthetic: int = 0, synthetic_beta: float | None = None,
                      mine: int = 1, stand_ins: str = "gaussian", jitter: float = 1.0, exclude: float = 0.0):
    """A copy of the world's text encoder with ``part`` fitted to the objective above; ``synthetic`` > 0
    adds that many prompts per step to the preservation term whose concept slot holds a
    ``synthetic_words`` embedding (the anchor's templates, the slot's features kept as they were),
    weighted by ``synthetic_beta`` (``beta`` when None). ``mine`` > 1 draws that many times more
    stand-ins each step and keeps the ``synthetic`` the current edit moves most (hard negatives).
    ``stand_ins`` "analogy" draws them as ``analogy_inputs`` instead (part ``ff_last`` only),
    "jitter" as ``jittered_words`` of spread ``jitter``. ``exclude`` > 0 redraws every stand-in
    nearer an erased name (same template, base features) than ``erased_neighbourhood``'s radius at
    that quantile (0 = keep all)."""
    if stand_ins == "analogy" and part != "ff_last":
        raise ValueError(f"stand_ins 'analogy' acts on the last MLP's input: part must be ff_last, not {part!r}")
    beta_s = beta if synthetic_beta is None else synthetic_beta
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
    # Stand-ins: draw(k) -> inputs, and the features the base and the edited encoder give them.
    if synthetic and stand_ins == "analogy":    # residuals at the last MLP's input, compared as features
        draw = analogy_inputs(world, task, seed)
        ln2, out, ff0 = text.layers[-1].ln2, text.ln_final, world.model.text.layers[-1].ff   # ln2, out untrained
        base_of = lambda r: out(r + ff0(ln2(r)))                     # noqa: E731
        edited_of = lambda r: out(r + text.layers[-1].ff(ln2(r)))    # noqa: E731
    elif synthetic:                             # the anchor's templates, a drawn embedding in its slot
        words = jittered_words(world, task, seed, jitter) if stand_ins == "jitter" else synthetic_words(world, task, seed)
        draw = slot_stand_ins(world, task, words, gen)
        base_of, edited_of = world.model.text.forward_embeddings, text.forward_embeddings
    if synthetic and exclude > 0:               # stand-ins off the erased names' neighbourhoods
        draw = off_erased(draw, base_of, *erased_neighbourhood(world, task, exclude))
    for _ in range(steps):
        ie, ip = torch.randint(len(x_e), (batch,), generator=gen), torch.randint(len(x_p), (batch,), generator=gen)
        loss = (text(x_e[ie]) - y_t[ie % len(x_t)]).pow(2).mean() + beta * (text(x_p[ip]) - y_p[ip]).pow(2).mean()
        if synthetic:
            x_s = draw(synthetic * mine)[0]
            with torch.no_grad():
                y_s = base_of(x_s)
                if mine > 1:    # the stand-ins the edit moves most so far
                    worst = (edited_of(x_s) - y_s).pow(2).flatten(1).sum(1).topk(synthetic).indices
                    x_s, y_s = x_s[worst], y_s[worst]
            loss = loss + beta_s * (edited_of(x_s) - y_s).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return text.eval().requires_grad_(False)


def low_rank(text, base, rank: int):
    """``text`` with each edited matrix replaced by ``base``'s plus the rank-``rank`` truncated SVD of
    its change (what a LoRA of that rank carries; vectors — biases, norms — kept whole, as a LoRA
    file's ``.diff_b``); ``rank`` 0 returns ``text`` itself."""
    if not rank:
        return text
    out, ref = copy.deepcopy(text), base.state_dict()
    with torch.no_grad():
        for name, p in out.named_parameters():
            delta = p - ref[name]
            if p.dim() == 2 and delta.abs().max() > 0 and rank < min(p.shape):
                u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)
                p.copy_(ref[name] + ((u[:, :rank] * sv[:rank]) @ vh[:rank]).to(p.dtype))
    return out


def kv_stage(world, task: erase.Task, stage: str):
    """K/V weights of the pack's ``stage`` fitted on ``world`` (the edited one), or None for "none"."""
    if stage == "none":
        return None
    if stage == "cfr_prior":
        return erase.cfr_erase(world, task, prior_weight=1.0).weights
    return erase.mace_erase(world, task, **erase.mace_setting("recommended")).fused


def with_text_encoder(world, text) -> ToyWorld:
    model = copy.copy(world.model)          # shares the UNet; only ``text`` differs
    model._modules = dict(world.model._modules, text=text)
    return ToyWorld(model, world.probe, world.metadata, world.probe_metadata)


SPLITS = ("evaluation", "validation")


def split_names(split: str, preserve: tuple[str, ...], retained: tuple[str, ...]) -> tuple[tuple, tuple]:
    """(preserve list, retained set) of ``split``: the benchmark's own, or the validation split that
    halves its preserve list (the first half preserved, the second scored) so settings are chosen
    without the retained set."""
    if split == "evaluation":
        return preserve, retained
    half = len(preserve) // 2
    return preserve[:half], preserve[half:]


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


def save_plot(path: str, rows: list[dict]) -> None:
    """H and Acc_s against the number of erased concepts: each (part, beta), then the reference rows
    (``rows`` of one kind)."""
    kind = plotted_kind(rows)
    labelled = []
    for r in rows + [{**r, "part": r["method"]} for r in reference_rows(kind, {r["concepts"] for r in rows})]:
        label = (f"TE {r['part']} b={r['beta']:g}" + (" oracle" if r.get("oracle") else "")
                 + ((" +synthetic" if r.get("stand_ins") in (None, "gaussian") else f" +{r['stand_ins']}")
                    + (f" {r['jitter']:g}" if r.get("jitter") else "") if r.get("synthetic") else "")
                 + (f" excl {r['exclude']:g}" if r.get("exclude") else "")
                 + ("" if r.get("kv", "none") == "none" else f" +{r['kv']}")
                 + (f" rank {r['rank']}" if r.get("rank") else "")) if "beta" in r else r["part"]
        labelled.append((label, r))
    save_h_and_acc_s(path, labelled, "toy v2: text-encoder edits vs the pack, H", kind)


def main(argv=None) -> None:
    ap = toy_v2_parser(__doc__)
    ap.add_argument("--kind", choices=("name", "style"), default="name", help="what is erased")
    ap.add_argument("--counts", type=int, nargs="+", default=None,
                    help="numbers of erased concepts (default: 10 100 names, 5 10 styles)")
    ap.add_argument("--runs", nargs="+", default=["ff_last:1", "layers:1", "ff_last:10"],
                    help="PART:BETA pairs (parts: " + ", ".join(PARTS) + "; BETA weighs the preservation term)")
    ap.add_argument("--steps", type=int, nargs="+", default=[400, 800], help="training steps per count")
    ap.add_argument("--n", type=int, default=200, help="prompts per set (erased, held-out words, retained)")
    ap.add_argument("--synthetic", type=int, default=0,
                    help="synthetic stand-in names per step in the preservation term (synthetic_words); 0 = none")
    ap.add_argument("--stand-ins", choices=("gaussian", "jitter", "analogy"), default="gaussian",
                    help="gaussian: token embeddings from N(mu, Sigma) of the named words (synthetic_words); "
                         "jitter: a named word's embedding + N(0, JITTER^2 Sigma) (jittered_words); "
                         "analogy: r(a) + r(b) - r(c) of three named words at the last MLP's input "
                         "(analogy_inputs; part ff_last only)")
    ap.add_argument("--jitter", type=float, default=None,
                    help="--stand-ins jitter: the spread in units of the named words' Sigma (default 1)")
    ap.add_argument("--exclude", type=float, default=0.0,
                    help="redraw stand-ins nearer an erased name than this quantile of the named words' "
                         "nearest-neighbour distances (erased_neighbourhood), e.g. 0.1; 0 = keep all")
    ap.add_argument("--mine", type=int, default=1,
                    help="draw MINE x --synthetic stand-ins per step and keep the --synthetic the edit moves most "
                         "(hard negatives); 1 = no mining")
    ap.add_argument("--synthetic-beta", type=float, default=None,
                    help="weight of the synthetic stand-ins' term (default: the run's BETA)")
    ap.add_argument("--kv", nargs="+", default=["none"], choices=list(KV_STAGES),
                    help="the pack's K/V stages fitted on top of each edited encoder: " +
                         "; ".join(f"{k}: {v}" for k, v in KV_STAGES.items()))
    ap.add_argument("--ranks", type=int, nargs="+", default=[0],
                    help="also score each edit cut to these LoRA ranks (truncated SVD of each matrix's change, "
                         "low_rank); 0 = the full edit")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    ap.add_argument("--split", choices=SPLITS, default="evaluation",
                    help="evaluation: the benchmark's split (preserve list names 100-149 / styles 10-14, "
                         "retained 150-199 / 15-19); validation: settings are chosen here, away from the "
                         "retained set (the preserve list's first half kept, its second half scored: names "
                         "100-124 / 125-149, styles 10-11 / 12-14; the retained set unseen)")
    ap.add_argument("--keep", type=int, default=None,
                    help="preserve only the split's first KEEP preserve-list names (how retention grows with the "
                         "list a user writes; the scored set unchanged); default: all of them")
    ap.add_argument("--keep-aliases", action="store_true",
                    help="also preserve the nicknames of the preserve list's names (their other names)")
    ap.add_argument("--oracle", action="store_true",
                    help="preserve the retained set itself instead of the preserve list (an upper reference, "
                         "as bench.mace_variants' oracle: it separates capacity from generalisation)")
    ap.add_argument("--plot", default=None, help="also write a PNG of H and Acc_s against the count")
    ap.add_argument("--plot-only", action="store_true", help="redraw --plot from --out's JSON, no training")
    ap.add_argument("--plot-with", nargs="*", default=[], help="more JSON files of this bench whose rows join the plot")
    args = toy_v2_args(ap, argv, out="bench/results/text_encoder_edit.json")
    if args.plot_only:
        save_plot(args.plot, saved_rows(args.plot, [args.out, *args.plot_with]))
        return
    if args.synthetic_beta is not None and not args.synthetic_beta >= 0:
        raise SystemExit("--synthetic-beta: must be >= 0")
    if any(r < 0 for r in args.ranks):
        raise SystemExit("--ranks: each must be >= 0 (0 = the full edit)")
    if args.mine < 1:
        raise SystemExit("--mine: must be >= 1")
    if args.jitter is not None and args.stand_ins != "jitter":
        raise SystemExit("--jitter: acts on --stand-ins jitter only")
    if args.jitter is not None and not args.jitter > 0:
        raise SystemExit("--jitter: must be > 0")
    jitter = 1.0 if args.jitter is None else args.jitter
    if not 0 <= args.exclude < 1:
        raise SystemExit("--exclude: a quantile in [0, 1) (0 = keep every stand-in)")
    for flag, given in (("--mine", args.mine > 1), ("--stand-ins", args.stand_ins != "gaussian"),
                        ("--synthetic-beta", args.synthetic_beta is not None), ("--exclude", args.exclude > 0)):
        if given and not args.synthetic:   # each acts on the stand-ins: without them it would do nothing
            raise SystemExit(f"{flag}: needs --synthetic K > 0 (it acts on the synthetic stand-ins)")
    if not args.lr > 0:
        raise SystemExit("--lr: must be > 0")
    runs = [parse_run(r) for r in args.runs]
    if args.stand_ins == "analogy" and any(part != "ff_last" for part, _ in runs):
        raise SystemExit("--stand-ins analogy: acts on the last MLP's input; every --runs part must be ff_last")
    kind = args.kind
    counts = args.counts or ([10, 100] if kind == "name" else [5, 10])
    if len(args.steps) not in (1, len(counts)):
        raise SystemExit(f"--steps: give one value or one per count ({len(counts)})")
    toy = toy_v2_setup(args, kind)
    pool = erase.vocab.NAMES if kind == "name" else erase.vocab.STYLES
    world, preserve, retained = toy.world, *split_names(args.split, toy.preserve, toy.retained)
    if args.keep is not None:
        if args.oracle:
            raise SystemExit("--keep: cuts the preserve list, which --oracle replaces by the retained set; drop one")
        if not 1 <= args.keep <= len(preserve):
            raise SystemExit(f"--keep: {args.keep} outside 1..{len(preserve)} (the {args.split} split's preserve list)")
        preserve = preserve[:args.keep]
    if args.keep_aliases:
        if args.oracle:
            raise SystemExit("--keep-aliases: extends the preserve list, which --oracle replaces; drop one")
        if kind != "name":
            raise SystemExit("--keep-aliases: names have nicknames; with --kind style drop it")
        preserve = tuple(preserve) + tuple(a for n in preserve for a in erase.vocab.NICKNAMES[n])
    rows, t_start = [], time.time()
    for i, count in enumerate(counts):
        check_count(count, toy.most, "--counts")
        steps = args.steps[i if len(args.steps) > 1 else 0]
        task = erase.Task(kind, tuple(pool[:count]), tuple(retained if args.oracle else preserve))
        _, base_ret = evaluate.mass_metrics(world, kind, task.erase, retained, n_erased=args.n, n_retained=args.n)
        for part, beta in runs:
            t0 = time.perf_counter()
            text = edit_text_encoder(world, task, part, steps=steps, beta=beta, lr=args.lr, synthetic=args.synthetic,
                                     synthetic_beta=args.synthetic_beta, mine=args.mine, stand_ins=args.stand_ins,
                                     jitter=jitter, exclude=args.exclude)
            seconds = time.perf_counter() - t0
            cuts = {r: with_text_encoder(world, low_rank(text, world.model.text, r)) for r in args.ranks}  # one SVD each
            for rank, stage in ((r, st) for r in args.ranks for st in args.kv):
                edited = cuts[rank]
                t1 = time.perf_counter()
                weights = kv_stage(edited, task, stage)
                kv_seconds = time.perf_counter() - t1
                m, _ = evaluate.mass_metrics(edited, kind, task.erase, retained, kv_weights=weights,
                                             base_retained=base_ret, n_erased=args.n, n_retained=args.n)
                rows.append({"part": part, "kv": stage, "rank": rank, "split": args.split,
                             "kept": len(task.preserve), "aliases": args.keep_aliases, **m.row(), "steps": steps,
                             "lr": args.lr, "beta": beta,
                             "beta_s": beta if args.synthetic_beta is None else args.synthetic_beta,
                             "oracle": args.oracle, "synthetic": args.synthetic, "mine": args.mine,
                             "stand_ins": args.stand_ins if args.synthetic else None,
                             "jitter": jitter if args.stand_ins == "jitter" else None,
                             "exclude": args.exclude,
                             "seconds": round(seconds + kv_seconds, 1),
                             "what": PARTS[part] + ("" if stage == "none" else "; " + KV_STAGES[stage])})
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
