"""Train toy world v2 (generator + probe) and write the shipped weights. Seeded and resumable.

    python -m toyworld.v2.train --minutes 80            # generator (stops on wall time)
    python -m toyworld.v2.train --probe-only            # the probe alone (can run beside it)
    python -m toyworld.v2.train --minutes 20 --resume   # continue a run

One CPU thread per process. Reproducible for a given ``--seed`` and ``--steps``; with
``--minutes`` the steps reached are recorded in the metadata. Writes atomically into
``toyworld/v2/weights/``: ``toyworld_v2.safetensors`` (EMA generator, fp16), ``probe_v2.safetensors``
and ``train_log.txt``. The resume state (model, EMA, AdamW moments, RNG states, step) is one
safetensors file (``toyworld.train_state``; default ``out/toyworld_v2_state.safetensors``): no pickle.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from ..train_args import add_training_args
from ..train_log import Logger
from ..train_state import load_state, save_state
from ..v1 import checkpoint, diffusion
from ..v1.evaluate import ToyWorld
from . import data, evaluate, scorer, vocab
from .model import build_model

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, minutes=80.0)
    p.add_argument("--fg-weight", type=float, default=5.0,
                   help="loss weight of the object's pixels relative to the background (1 = plain MSE)")
    p.add_argument("--high-noise-weight", type=float, default=1.0,
                   help="per-sample loss weight clamp(1/SNR(t), 1, this): > 1 stresses the noisy steps that decide "
                        "where and what the object is (1 = off)")
    p.add_argument("--probe-steps", type=int, default=800)
    p.add_argument("--probe-only", action="store_true", help="train only the probe, then stop")
    p.add_argument("--eval-every", type=float, default=10.0, help="minutes between evaluations/checkpoints")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=evaluate.WEIGHTS_DIR)
    p.add_argument("--state", type=Path, default=ROOT / "out" / "toyworld_v2_state.safetensors")
    p.add_argument("--resume", action="store_true", help="continue from --state")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from these generator weights (EMA file); parameters it lacks keep their init")
    p.add_argument("--note", default="", help="free text stored in the weights' metadata (e.g. a resumed run's history)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- resume state (no pickle)
def save_resume_state(path: Path, model, ema, opt, gen: torch.Generator, step: int, elapsed: float) -> None:
    save_state({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step, "elapsed": elapsed}, path)


def load_resume_state(path: Path, model, ema, opt, gen: torch.Generator) -> tuple[int, float]:
    st = load_state(path)
    model.load_state_dict(st["model"]), ema.load_state_dict(st["ema"]), opt.load_state_dict(st["opt"])
    gen.set_state(st["gen"]), torch.set_rng_state(st["torch_rng"])
    return int(st["step"]), float(st["elapsed"])


# ----------------------------------------------------------------------------- evaluation during training
@torch.no_grad()
def quick_eval(model, probe_path: Path, per_name: int = 1) -> str:
    if not probe_path.is_file():
        return "(no probe yet)"
    world = ToyWorld(model, evaluate.load_probe(probe_path))
    names = list(vocab.NAMES[::2])  # 100 names
    main = evaluate.score_set(world, evaluate.name_prompts(names, per_name, seed=11))
    nick = evaluate.score_set(world, evaluate.name_prompts(names, per_name, seed=12, nicknames=True))
    sty = evaluate.score_set(world, evaluate.style_prompts(list(vocab.STYLES), 3, seed=13))
    return (f"identity {main.identity_acc:.3f} nickname {nick.identity_acc:.3f} style {sty.style_acc:.3f} "
            f"integrity {main.integrity:.3f} (n {main.n}/{nick.n}/{sty.n})")


def train_probe(args, log) -> None:
    t0 = time.time()
    probe = scorer.train_probe(steps=args.probe_steps, seed=args.seed + 1, log=log)
    acc = scorer.probe_accuracy(probe)
    acc_aug = scorer.probe_accuracy(probe, augmented=True)
    log(f"probe trained in {time.time() - t0:.1f}s; held-out ground truth {acc}; augmented {acc_aug}")
    checkpoint.save_state_dict(probe.state_dict(), args.out / evaluate.PROBE_FILE, {
        "seed": args.seed + 1, "steps": args.probe_steps, "data_version": data.DATA_VERSION,
        "torch_version": torch.__version__, "format": "toyworld-v2-probe",
        **{f"gt_acc_{k}": f"{v:.4f}" for k, v in acc.items() if k != "n"}, "gt_n": acc["n"]})
    log(f"wrote {args.out / evaluate.PROBE_FILE}")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = Logger(args.out / ("probe_log.txt" if args.probe_only else "train_log.txt"))
    log(f"args {vars(args)} torch {torch.__version__} data {data.DATA_VERSION} vocab {vocab.VOCAB_SIZE}")
    if args.probe_only:
        train_probe(args, log)
        return

    torch.manual_seed(args.seed)
    model = build_model()
    ema = build_model().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    step, elapsed = 0, 0.0
    if args.init_from is not None and not args.resume:
        init, _ = checkpoint.load_state_dict(args.init_from, "initial generator weights")
        missing = model.load_state_dict(init, strict=False).missing_keys
        ema.load_state_dict(model.state_dict())
        log(f"initialised from {args.init_from}; new parameters: {missing}")
    if args.resume:
        step, elapsed = load_resume_state(args.state, model, ema, opt, gen)
        log(f"resumed from {args.state} at step {step}, {elapsed / 60:.1f} min")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"generator parameters {n_params}")
    t_start = time.time() - elapsed
    last_eval = time.time()
    loss_avg = None
    probe_path = args.out / evaluate.PROBE_FILE

    def save(final: bool) -> None:
        meta = {"seed": args.seed, "steps": step, "minutes": f"{(time.time() - t_start) / 60:.2f}",
                "data_version": data.DATA_VERSION, "torch_version": torch.__version__, "ema_decay": args.ema,
                "batch": args.batch, "lr": args.lr, "params": n_params, "format": "toyworld-v2-t2i",
                "vocab_size": vocab.VOCAB_SIZE, "fg_weight": args.fg_weight,
                "high_noise_weight": args.high_noise_weight, "final": final,
                "note": args.note}
        checkpoint.save_state_dict(ema.state_dict(), args.out / evaluate.GENERATOR_FILE, meta)
        save_resume_state(args.state, model, ema, opt, gen, step, time.time() - t_start)

    def done() -> bool:
        return step >= args.steps if args.steps is not None else time.time() - t_start >= args.minutes * 60

    model.train()
    while not done():
        batch = data.sample_batch(args.batch, gen)
        ids = diffusion.ids_tensor(batch.captions, vocab)
        t = torch.randint(0, diffusion.NUM_TRAIN_TIMESTEPS, (args.batch,), generator=gen)
        noise = torch.randn(batch.images.shape, generator=gen)
        pred = model(diffusion.add_noise(batch.images, noise, t), t, model.encode_text(ids))
        weight = 1.0 + (args.fg_weight - 1.0) * batch.masks.float()  # identity pixels count more
        if args.high_noise_weight > 1.0:
            ab = diffusion.ALPHA_BAR[t]
            weight = weight * ((1 - ab) / ab).clamp(1.0, args.high_noise_weight).view(-1, 1, 1, 1)
        loss = ((pred - noise).pow(2) * weight).mean() / weight.mean()
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if not math.isfinite(loss.item()):
            raise SystemExit(f"training diverged at step {step} (loss {loss.item()})")
        if step % 100 == 0:
            log(f"step {step} loss {loss.item():.4f} loss_avg {loss_avg:.4f} min {(time.time() - t_start) / 60:.2f}")
        if time.time() - last_eval >= args.eval_every * 60 and not done():
            save(final=False)
            log(f"eval step {step}: {quick_eval(ema, probe_path)}")
            last_eval = time.time()
            model.train()
    save(final=True)
    log(f"final step {step} minutes {(time.time() - t_start) / 60:.2f}: {quick_eval(ema, probe_path)}")
    log(f"wrote {args.out / evaluate.GENERATOR_FILE}")


if __name__ == "__main__":
    main()
