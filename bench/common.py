"""Shared bench helpers: SD1.5- and SDXL-shaped random K/V weights, a cheap 77 x d encoder, synthetic
concepts and LoRAs, timing and peak memory, JSON, and the toy world v2 benches' common preamble
(``toy_v2_parser`` / ``toy_v2_args`` / ``toy_v2_setup``)."""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mace_ops.atomic_write import write_bytes_atomic
from mace_ops.concepts import Concept
from mace_ops.interfaces import EncodedPrompt
from mace_ops.lora import LoraFactors

# attn2 output widths of the 16 SD1.x cross-attention layers (input 1,2,4,5,7,8; middle; output 3..11)
SD15_ATTN2_WIDTHS = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320)


def random_kv_weights(widths, dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """N(0, 0.02²) K and V weights, one pair per attn2 output width in ``widths``, ``dim`` wide."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"layer{i:02d}.attn2.to_{kind}.weight": torch.randn(c, dim, generator=g) * 0.02
        for i, c in enumerate(widths)
        for kind in ("k", "v")
    }


def sd15_kv_weights(seed: int = 0, dim: int = 768) -> dict[str, torch.Tensor]:
    return random_kv_weights(SD15_ATTN2_WIDTHS, dim, seed)


# attn2 output widths of SDXL base's 70 cross-attention layers: input level 1 (2 blocks x 2) at 640,
# level 2 (2 x 10) at 1280, middle 10 at 1280, output level 2 (3 x 10) at 1280, level 1 (3 x 2) at 640
SDXL_ATTN2_WIDTHS = (640,) * 4 + (1280,) * 20 + (1280,) * 10 + (1280,) * 30 + (640,) * 6
SHAPES = {"sd15": (SD15_ATTN2_WIDTHS, 768), "sdxl": (SDXL_ATTN2_WIDTHS, 2048)}


def kv_weights(shape: str = "sd15", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random K/V weights of ``shape``: "sd15" (32 weights, 768 wide) or "sdxl" (140, 2048 wide)."""
    return random_kv_weights(*SHAPES[shape], seed)


def context_dim(shape: str) -> int:
    return SHAPES[shape][1]


class HashTextEncoder:
    """77-token, 768-d features from a word hash and a causal mix: cheap, deterministic, CLIP-shaped."""

    end_id = 1

    def __init__(self, dim: int = 768, window: int = 77):
        self.dim, self.window = dim, window
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(4096, dim, generator=g)
        self.pos = 0.3 * torch.randn(window, dim, generator=g)

    def tokenize(self, text: str) -> list[int]:
        import zlib

        return [2 + zlib.crc32(w.encode()) % 4000 for w in text.split()]

    def encode(self, prompts):
        out = []
        for p in prompts:
            content = self.tokenize(p)
            ids = [0] + content + [self.end_id] * (self.window - len(content) - 1)
            x = self.table[ids] + self.pos
            x = torch.cumsum(x, 0) / torch.arange(1, self.window + 1)[:, None] + x
            out.append(EncodedPrompt(tuple(ids), len(content) + 2, torch.layer_norm(x, (self.dim,))))
        return out


def concepts(n: int) -> list[Concept]:
    """``n`` synthetic concepts ("concept{i} thing{i}", anchor "ground")."""
    return [Concept((f"concept{i} thing{i}",), "ground", i + 1) for i in range(n)]


def synthetic_lora(i: int, weights) -> dict[str, LoraFactors]:
    """Concept ``i``'s synthetic rank-1 LoRA on every weight: up ~ N(0, 1e-3²), down ~ N(0, 1), alpha 1
    (about the size of a trained MACE LoRA); seeded by ``i``."""
    g = torch.Generator().manual_seed(1000 + i)
    return {
        name: LoraFactors(torch.randn(w.shape[0], 1, generator=g) * 1e-3, torch.randn(1, w.shape[1], generator=g), 1.0)
        for name, w in weights.items()
    }


def stream(cs, weights):
    """(concept, its ``synthetic_lora``) for each of ``cs``, generated one at a time."""
    for i, c in enumerate(cs):
        yield c, synthetic_lora(i, weights)


def stats(xs) -> dict:
    """Mean, its standard error and n of ``xs`` (rounded to 5 places)."""
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {"mean": round(m, 5), "se": round(sd / math.sqrt(n), 5), "n": n}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
# The same seeds' rows of the pack's methods that other benches draw beside their own: file -> methods.
REFERENCES = {"mass_quality.json": ("full", "cfr_prior"), "mass_quality_ace.json": ("ace",)}


def reference_rows(kind: str, counts) -> list[dict]:
    """``REFERENCES``' rows of ``kind`` at ``counts`` (those whose files are present), as written."""
    out = []
    for name, methods in REFERENCES.items():
        path = RESULTS / name
        if path.is_file():
            out += [r for r in json.loads(path.read_text())["rows"]
                    if r["kind"] == kind and r["method"] in methods and r["concepts"] in counts]
    return out


def plotted_kind(rows: list[dict]) -> str:
    """The one kind ("name" / "style") of the rows a plot draws; exits naming ``--plot`` if they mix."""
    kind = rows[0].get("kind", "name")
    if any(r.get("kind", "name") != kind for r in rows):
        raise SystemExit("--plot: the rows mix names and styles; plot one kind at a time")
    return kind


def saved_rows(plot: str | None, files) -> list[dict]:
    """``--plot-only``: the rows of the bench's JSON ``files``, after exiting with what to give when
    ``--plot`` (the PNG path) or one of the files is missing."""
    if not plot:
        raise SystemExit("--plot-only: give --plot PATH for the PNG")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"--plot-only: {', '.join(missing)} does not exist; run the bench first (or pass --out)")
    return [r for f in files for r in json.loads(Path(f).read_text())["rows"]]


def write_json(path: str, payload: dict) -> None:
    """``payload`` as indented JSON, written whole or not at all (a results file is never half-written)."""
    write_bytes_atomic(path, json.dumps(payload, indent=2).encode("utf-8"))
    print(f"wrote {path}")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


class PeakRSS:
    """Context manager: the peak resident memory above the level at entry (MB), sampled every 5 ms."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_mb = interval, 0.0

    def __enter__(self):
        import threading
        self._start = rss_mb()
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self.peak_mb = max(self.peak_mb, rss_mb() - self._start)
                self._stop.wait(self.interval)
        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb() - self._start)
        return False


def reset_peak() -> bool:
    """Reset this process's resident high-water mark (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def trim() -> None:
    """Hand freed heap pages back to the OS so the 'before' resident size is the model's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Peak:
    """Peak memory (MB) above the level at entry: CUDA max allocated, else the resident high-water mark."""

    def __init__(self, device: str):
        self.device, self.mb = device, float("nan")

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            trim()
            self.before, self.ok = rss_mb(), reset_peak()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.before) / 2**20
        elif self.ok:
            self.mb = hwm_mb() - self.before
        self.seconds = time.perf_counter() - self.start


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table of ``rows`` (README tables come from the JSON, not by hand)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- toy world v2 benches
def toy_v2_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a toy world v2 bench: its module docstring as the help text."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def toy_v2_args(ap: argparse.ArgumentParser, argv=None, *, out: str | None, threads: int = 1) -> argparse.Namespace:
    """Add the flags every toy world v2 bench has (``--threads``, ``--out``) and parse ``argv``."""
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--out", default=out)
    return ap.parse_args(argv)


@dataclass(frozen=True)
class ToyV2:
    world: object                 # toyworld.v1.evaluate.ToyWorld (the shipped v2 generator and probe)
    preserve: tuple[str, ...]     # the preserve list every method gets
    retained: tuple[str, ...]     # the retained set Acc_s is measured on (no method sees it)
    most: int                     # how many concepts of this kind may be erased


def toy_v2_setup(args: argparse.Namespace, kind: str = "name") -> ToyV2:
    """Threads from ``args``, the shipped toy world v2, and the benchmark's split for ``kind``."""
    from toyworld.v2 import erase, evaluate

    torch.set_num_threads(args.threads)
    world = evaluate.load_world()
    preserve, retained, most = erase.preserve_and_retained(kind)
    return ToyV2(world, tuple(preserve), tuple(retained), most)


def check_count(count: int, most: int, flag: str) -> None:
    """A clear exit for a concept count the toy world's split cannot serve."""
    if not 1 <= count <= most:
        raise SystemExit(f"{flag}: {count} outside 1..{most}")
