#!/usr/bin/env python3
"""Train the toy text-to-image world (generator + probe) and write the shipped weights.

Reproducible for a given ``--seed`` and number of steps (``--steps``); with ``--minutes`` the
run stops on wall time, and the steps reached are recorded in the metadata. One CPU thread.

Writes (atomically) into ``toyworld/v1/weights/``:
  toyworld.safetensors  EMA generator weights (fp16, cast back to fp32 on load) + metadata
  probe.safetensors     shape/style/colour CNN probe (fp16) + metadata
  train_log.txt         loss curve and periodic evaluations
A resumable training state (model, EMA, optimizer, step) goes to ``--state`` (default
``out/toyworld_train_state.safetensors``, git-ignored; tensors + JSON, no pickle, see
``toyworld/train_state.py``); ``--resume`` continues from it.

Usage: python scripts/train_toyworld.py --minutes 40
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from toyworld.v1 import checkpoint, data, diffusion, scorer, vocab  # noqa: E402
from toyworld.v1.model import T2I  # noqa: E402
from toyworld.train_args import add_training_args  # noqa: E402
from toyworld.train_log import Logger  # noqa: E402
from toyworld.train_state import load_state, save_state  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, minutes=40.0)
    p.add_argument("--probe-steps", type=int, default=600)
    p.add_argument("--eval-every", type=float, default=5.0, help="minutes between evaluations/checkpoints")
    p.add_argument("--eval-prompts", type=int, default=8, help="prompts per colour in periodic evaluations")
    p.add_argument("--out", type=Path, default=checkpoint.WEIGHTS_DIR)
    p.add_argument("--state", type=Path, default=ROOT / "out" / "toyworld_train_state.safetensors")
    p.add_argument("--resume", action="store_true", help="continue from --state")
    p.add_argument("--skip-probe", action="store_true", help="keep an existing probe.safetensors")
    p.add_argument("--probe-only", action="store_true", help="(re)train only the probe, then stop")
    return p.parse_args(argv)


def eval_prompts(per_color: int, synonyms: bool, seed: int):
    """Fixed evaluation prompts: per colour, random template/shape/style (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    prompts, colors, shapes, styles = [], [], [], []
    for ci, cname in enumerate(vocab.COLORS):
        for j in range(per_color):
            word = vocab.SYNONYMS[cname][j % 2] if synonyms else cname
            s = int(torch.randint(0, 4, (1,), generator=gen))
            st = int(torch.randint(0, 4, (1,), generator=gen))
            tpl = vocab.CAPTION_TEMPLATES[int(torch.randint(0, 3, (1,), generator=gen))]
            prompts.append(vocab.caption(tpl, word, vocab.SHAPES[s], vocab.STYLES[st]))
            colors.append(ci), shapes.append(s), styles.append(st)
    return prompts, torch.tensor(colors), torch.tensor(shapes), torch.tensor(styles)


@torch.no_grad()
def quick_eval(model: T2I, probe, per_color: int) -> str:
    model.eval()
    parts = []
    for syn in (False, True):
        prompts, colors, shapes, styles = eval_prompts(per_color, syn, seed=777 + syn)
        imgs = diffusion.sample(model, prompts, steps=10, cfg=7.0, seed=4242 + syn)
        acc = (scorer.hue_colors(imgs) == colors).float().mean().item()
        tag = "syn" if syn else "main"
        parts.append(f"colour_{tag} {acc:.3f}")
        if probe is not None and not syn:
            pred = probe.predict(imgs)
            parts.append(f"shape {(pred['shape'] == shapes).float().mean().item():.3f}")
            parts.append(f"style {(pred['style'] == styles).float().mean().item():.3f}")
    return " ".join(parts)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    log = Logger(out / "train_log.txt", append=args.resume or args.probe_only)
    log(f"args {vars(args)} torch {torch.__version__} data {data.DATA_VERSION}")

    # ---------------------------------------------------------------- probe
    probe_path = out / checkpoint.PROBE_FILE
    if args.skip_probe and probe_path.is_file():
        probe = scorer.Probe()
        probe.load_state_dict(checkpoint.load_state_dict(probe_path, "probe")[0])
        probe.eval()
        log(f"probe kept: {probe_path}")
    else:
        t0 = time.time()
        probe = scorer.train_probe(steps=args.probe_steps, seed=args.seed + 1, log=log)
        acc = scorer.probe_accuracy(probe)
        acc_aug = scorer.probe_accuracy(probe, augmented=True)
        log(f"probe trained in {time.time() - t0:.1f}s; held-out GT acc {acc}; augmented {acc_aug}")
        checkpoint.save_state_dict(probe.state_dict(), probe_path, {
            "seed": args.seed + 1, "steps": args.probe_steps, "data_version": data.DATA_VERSION,
            "torch_version": torch.__version__, "gt_acc_color": acc["color"], "gt_acc_shape": acc["shape"],
            "gt_acc_style": acc["style"], "format": "toyworld-probe-v2"})
    if args.probe_only:
        log(f"wrote {probe_path}")
        return

    # ---------------------------------------------------------------- generator
    torch.manual_seed(args.seed)  # generator init independent of the probe training above
    model = T2I()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    gen = torch.Generator().manual_seed(args.seed)
    step, elapsed = 0, 0.0
    if args.resume:
        st = load_state(args.state)
        model.load_state_dict(st["model"]), ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"]), sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"]), torch.set_rng_state(st["torch_rng"])
        step, elapsed = st["step"], st["elapsed"]
        log(f"resumed from {args.state} at step {step}, {elapsed / 60:.1f} min")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"generator parameters {n_params}")

    budget = args.minutes * 60.0
    t_start = time.time() - elapsed
    last_eval = time.time()
    loss_ema = None

    def save(final: bool) -> None:
        meta = {"seed": args.seed, "steps": step, "minutes": f"{(time.time() - t_start) / 60:.2f}",
                "data_version": data.DATA_VERSION, "torch_version": torch.__version__,
                "ema_decay": args.ema, "batch": args.batch, "lr": args.lr, "params": n_params,
                "format": "toyworld-t2i-v1", "final": final}
        checkpoint.save_state_dict(ema.state_dict(), out / checkpoint.GENERATOR_FILE, meta)
        save_state({"model": model.state_dict(), "ema": ema.state_dict(),
                    "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "step": step, "elapsed": time.time() - t_start}, args.state)

    def done() -> bool:
        if args.steps is not None:
            return step >= args.steps
        return time.time() - t_start >= budget

    model.train()
    while not done():
        batch = data.sample_batch(args.batch, gen)
        ids = diffusion.ids_tensor(batch.captions)
        t = torch.randint(0, diffusion.NUM_TRAIN_TIMESTEPS, (args.batch,), generator=gen)
        noise = torch.randn(batch.images.shape, generator=gen)
        x_t = diffusion.add_noise(batch.images, noise, t)
        pred = model(x_t, t, model.encode_text(ids))
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 100 == 0:
            log(f"step {step} loss {loss.item():.4f} loss_avg {loss_ema:.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} min {(time.time() - t_start) / 60:.2f}")
        if time.time() - last_eval >= args.eval_every * 60 and not done():
            log(f"eval step {step}: {quick_eval(ema, probe, args.eval_prompts)}")
            save(final=False)
            last_eval = time.time()
            model.train()

    save(final=True)
    log(f"final step {step} minutes {(time.time() - t_start) / 60:.2f}: {quick_eval(ema, probe, args.eval_prompts)}")
    log(f"wrote {out / checkpoint.GENERATOR_FILE} and {probe_path}")


if __name__ == "__main__":
    main()
