"""A general caption prior for preservation: everyday captions -> one text-only d x d moment.

The paper's fusion (and CFR) preserve toward a large general caption prior (MS-COCO captions)
plus a domain list, with a large weight. We ship no caption data set: ``general_captions`` writes
a few thousand everyday captions procedurally from word lists written for this pack (subjects x
actions x places x photo words, seeded), never the reference's CSVs.

The prior enters every solve as extra preserve vectors. With M = mean p p^T over every window
position of the captions (``prior_moment``, computed with the user's own text encoder, so clip
skip and CLIP variant are honoured) and the preserve set's sum P over n_preserve vectors,

    P  <-  P + w * max(n_preserve, 1) * M          (``add_prior``)

so after the usual ``s = preserve_scale * n_pairs / n_preserve`` the prior weighs w times the
preserve list (w = ``prior_weight``; 0 = off). ``PriorCache`` keeps M per (text encoder,
captions) in memory and, given a folder, as a safetensors file keyed by a fingerprint of the
encoder's features on fixed probe prompts, so a run encodes the captions once per encoder. It
keeps the captions' encodings the same way (``PriorCache.encode``: ACE's gate is calibrated on
each caption's peak similarity to the concept, so it needs the features, not only their moment).
"""
from __future__ import annotations

import hashlib
import os
import random
from typing import Callable, Sequence

import torch

from .covariance import PairStats
from .interfaces import EncodedPrompt, TextEncoder
from .validation import check_number, require_finite

SUBJECTS = (
    "a man", "a woman", "a child", "an old man", "an old woman", "a young girl", "a young boy", "a family",
    "two friends", "a group of people", "a chef", "a farmer", "a cyclist", "a surfer", "a skier", "a dog",
    "a cat", "a horse", "a cow", "a flock of birds", "a red car", "a yellow bus", "a train", "a small boat",
    "an airplane", "a bicycle", "a motorcycle", "a wooden table", "a bowl of fruit", "a plate of food",
    "a pizza", "a cup of coffee", "a vase of flowers", "a laptop", "a clock tower", "a stone bridge",
    "an old house", "a lighthouse", "a tree", "a mountain", "a river", "a street sign", "a teddy bear",
    "a baseball player", "a tennis player", "a soccer team", "a giraffe", "an elephant", "a zebra",
    "a sheep", "a kite", "an umbrella", "a bench", "a sandwich", "a cake", "a bookshelf", "a guitar",
)
ACTIONS = (
    "standing", "sitting", "walking", "running", "smiling", "waiting", "resting", "playing", "eating",
    "reading a book", "looking at the camera", "parked", "covered in snow", "in the sunlight",
    "under a blue sky", "at night", "in the rain", "next to a window", "on display", "in a row",
)
PLACES = (
    "on a city street", "in a kitchen", "in a park", "on the beach", "in a field", "in a living room",
    "at a train station", "near a lake", "in the mountains", "in a forest", "on a farm", "at the market",
    "in an office", "on a bridge", "in a garden", "at the airport", "in a small town", "on a boat",
    "in a restaurant", "in a bedroom", "by the road", "in the desert", "at a stadium", "in a museum",
)
FRAMES = ("a photo of {}", "{}", "a picture of {}", "a close up of {}", "an image of {}", "a view of {}",
          "a blurry photo of {}", "a black and white photo of {}", "a painting of {}", "a drawing of {}")


def general_captions(n: int = 2000, seed: int = 0) -> list[str]:
    """``n`` distinct everyday captions, the same for a given (n, seed)."""
    check_number(n, "prior captions", 1, 100_000, integer=True)
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        body = f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}"
        caption = rng.choice(FRAMES).format(body)
        if caption not in seen:
            seen.add(caption)
            out.append(caption)
    return out


MOMENT_BATCH = 64   # prompts per encode call of the moment (the batch changes the features' last bits)


def prior_moment(encoder: TextEncoder, captions: Sequence[str], batch: int = MOMENT_BATCH,
                 on_batch: Callable[[], None] | None = None) -> tuple[torch.Tensor, int]:
    """(M = mean p p^T over every window position of every caption (float64), number of vectors)."""
    if not captions:
        raise ValueError("prior: no captions")
    acc = _MomentSum()
    for i in range(0, len(captions), batch):
        acc.add(encoder.encode(list(captions[i : i + batch])))
        if on_batch:
            on_batch()
    return acc.moment()


class _MomentSum:
    """Running sum of p p^T (float64) over every position of the encodings added."""

    def __init__(self):
        self.S, self.n = None, 0

    def add(self, encoded: Sequence[EncodedPrompt]) -> None:
        for enc in encoded:
            f = enc.features.detach().to(device="cpu", dtype=torch.float64)
            self.S = f.T @ f if self.S is None else self.S + f.T @ f
            self.n += f.shape[0]

    def moment(self) -> tuple[torch.Tensor, int]:
        M = self.S / self.n
        require_finite(M, "prior: the text encoder's features", "use the CLIP that belongs to the model")
        return M, self.n


def add_prior(stats: PairStats, moment: torch.Tensor | None, weight: float) -> PairStats:
    """Add the prior to ``stats``' preserve set with ``weight`` times the preserve list's weight (in place)."""
    check_number(weight, "prior_weight", 0.0, 1e6)
    if moment is None or weight == 0:
        return stats
    if moment.shape != (stats.dim, stats.dim):
        raise ValueError(f"prior: moment is {tuple(moment.shape)}, the text encoder gives width {stats.dim}")
    count = max(stats.n_preserve, 1)
    stats.P = stats.P + weight * count * moment.to(dtype=stats.P.dtype, device=stats.P.device)
    stats.n_preserve = count
    return stats


def encoder_fingerprint(encoder: TextEncoder, probes: Sequence[str]) -> str:
    """sha256 (16 hex) of the encoder's rounded features on ``probes`` (prompts its vocabulary has):
    differs per CLIP and clip skip."""
    h = hashlib.sha256()
    for enc in encoder.encode(probes):
        f = enc.features.detach().to(device="cpu", dtype=torch.float32)
        h.update(str(tuple(f.shape)).encode())
        h.update((f * 1e3).round().to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


class PriorCache:
    """Per (encoder fingerprint, captions digest): the moment M, and the captions' encodings (ACE's
    gate calibration), in memory and, given a folder, as safetensors files."""

    def __init__(self, folder: str | None = None, max_encodings: int = 2):
        self.folder = folder
        self.memory: dict[str, torch.Tensor] = {}
        self.encodings: dict[str, dict[str, torch.Tensor]] = {}   # newest last, at most max_encodings
        self.max_encodings = int(max_encodings)

    @staticmethod
    def _key(kind: str, encoder: TextEncoder, captions: Sequence[str]) -> str:
        digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
        return f"{kind}-{encoder_fingerprint(encoder, list(captions[:2]) + [''])}-{digest}"

    def _path(self, key: str) -> str | None:
        return os.path.join(self.folder, key + ".safetensors") if self.folder else None

    def _read(self, key: str, names: Sequence[str]) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        if not path or not os.path.isfile(path):
            return None
        from safetensors.torch import load_file
        try:
            tensors = load_file(path)
            if any(n not in tensors for n in names):
                return None
            require_finite({n: tensors[n] for n in names if tensors[n].is_floating_point()}, "prior cache",
                           "delete the file")
            return tensors
        except Exception:  # unreadable cache: recompute and replace it
            return None

    def _write(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self._path(key)
        if not path:  # a folder we cannot write to costs the cache, not the run
            return
        from safetensors.torch import save_file
        tmp = path + ".tmp"
        try:
            os.makedirs(self.folder, exist_ok=True)
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, path)
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)

    def moment(self, encoder: TextEncoder, captions: Sequence[str],
               on_batch: Callable[[], None] | None = None) -> torch.Tensor:
        key = self._key("prior", encoder, captions)
        if key in self.memory:
            return self.memory[key]
        stored = self._read(key, ["moment"])
        if stored is not None:
            self.memory[key] = stored["moment"].to(torch.float64)
            return self.memory[key]
        M, _ = prior_moment(encoder, captions, on_batch=on_batch)
        self.memory[key] = M
        self._write(key, {"moment": M})
        return M

    def _keep_moment(self, encoder: TextEncoder, captions: Sequence[str], acc: "_MomentSum") -> None:
        """Keep the moment of captions just encoded at full precision in batches of ``MOMENT_BATCH``
        (``moment`` would encode them again the same way: the same M), unless it is already kept."""
        key = self._key("prior", encoder, captions)
        if key not in self.memory and (self._path(key) is None or not os.path.isfile(self._path(key))):
            self.memory[key] = acc.moment()[0]
            self._write(key, {"moment": self.memory[key]})

    def encode(self, encoder: TextEncoder, captions: Sequence[str], batch: int = MOMENT_BATCH,
               on_batch: Callable[[], None] | None = None, keep_moment: bool = True) -> list[EncodedPrompt]:
        """``encoder.encode(captions)``, features rounded to float16 (how they are kept: 1,000 captions
        of 77 x 768 are 118 MB, SDXL's 2048 wide 315 MB), read back from the cache when present; the
        same values on the first run and every later one. Encoding them also keeps their ``moment``
        (CFR's prior), so a CFR run after an ACE run does not encode the captions again; ``keep_moment``
        False for encodings that are not CFR's features (e.g. a text gate's residuals)."""
        if not captions:
            raise ValueError("captions: none to encode")
        key = self._key("captions", encoder, captions)
        tensors = self.encodings.pop(key, None) or self._read(key, ["features", "ids", "lengths"])
        if tensors is None or tensors["features"].shape[0] != len(captions):
            encoded, acc = [], _MomentSum()
            for i in range(0, len(captions), batch):
                part = encoder.encode(list(captions[i: i + batch]))
                encoded += part
                acc.add(part)
                if on_batch:
                    on_batch()
            if keep_moment and batch == MOMENT_BATCH:
                self._keep_moment(encoder, captions, acc)
            tensors = {"features": torch.stack([e.features.detach().cpu().to(torch.float16) for e in encoded]),
                       "ids": torch.tensor([e.ids for e in encoded], dtype=torch.int32),
                       "lengths": torch.tensor([e.length for e in encoded], dtype=torch.int32)}
            require_finite(tensors["features"], "captions: the text encoder's features (as float16)",
                           "use the CLIP that belongs to the model")
            self._write(key, tensors)
        self.encodings[key] = tensors
        while len(self.encodings) > self.max_encodings:
            self.encodings.pop(next(iter(self.encodings)))
        f, ids, lengths = tensors["features"], tensors["ids"].tolist(), tensors["lengths"].tolist()
        return [EncodedPrompt(tuple(ids[i]), int(lengths[i]), f[i].float()) for i in range(len(captions))]
