"""A second judge for the erasure check: CLIP zero-shot classification (Radford et al. 2021).

Every image is embedded by a CLIP vision tower (its projected ``image_embeds``), every candidate
prompt by the matching CLIP text tower (its projected pooled output); the candidate with the
largest cosine wins. Candidates work as in ``diffusion_classifier``: rows of one list of unique
prompt texts, ``table[i, k]`` the row image i uses for candidate k, so each image compares its own
template filled with every candidate.

The encoders are plain callables, so nothing here knows ComfyUI:

* ``encode_texts(texts) -> (T, D)``: one embedding per prompt text;
* ``encode_images(indices) -> (b, D)``: the embeddings of images ``indices`` (a caller that has
  latents decodes them here, a batch at a time, so the images never all sit in memory).

The two towers must come from one CLIP model: the embedding widths are checked (``field`` names
the input to fix in the message); whether the weights belong together is not checkable here.
``best_cosine`` is the hint: matched CLIP towers give every image a best candidate cosine of
roughly 0.2-0.35 (CLIP's zero-shot logits are 100 x cosine, typically 20-35 for the top class);
towers that do not share a space stay near 0 (``ALIGNED_BELOW``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

ALIGNED_BELOW = 0.1   # mean best cosine under this: the towers look unaligned (a hint, not a test)


@dataclass
class ClipJudgement:
    """Per image (N): the winning candidate and the label's margin in cosine."""

    labels: torch.Tensor   # (N,) the candidate position each image should show
    winner: torch.Tensor   # (N,) argmax of the cosine over the candidates
    margin: torch.Tensor   # (N,) cos(label) - cos(best other); > 0: the label wins
    cosine: torch.Tensor   # (N, K) cosine of the image with each candidate's prompt

    @property
    def recognised(self) -> torch.Tensor:
        return self.winner == self.labels

    @property
    def best_cosine(self) -> torch.Tensor:
        return self.cosine.max(1).values if self.cosine.shape[1] else torch.zeros(len(self.labels))

    def select(self, rows) -> "ClipJudgement":
        return ClipJudgement(self.labels[rows], self.winner[rows], self.margin[rows], self.cosine[rows])


def _check_table(n: int, table: torch.Tensor, labels: torch.Tensor, rows: int) -> None:
    if table.ndim != 2 or table.shape[0] != n or labels.shape != (n,):
        raise ValueError(f"{n} images, table {tuple(table.shape)} and labels {tuple(labels.shape)} disagree "
                         "on the number of images")
    k = table.shape[1]
    if n and k == 0:
        raise ValueError("no candidates")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels must be candidate positions in [0, {k})")
    if n and (int(table.min()) < 0 or int(table.max()) >= rows):
        raise ValueError(f"table must index the {rows} prompt texts")


def zero_shot(image_embeds: torch.Tensor, text_embeds: torch.Tensor, table: torch.Tensor,
              labels: torch.Tensor, field: str = "clip_vision") -> ClipJudgement:
    """The verdicts from embeddings: image i's cosine with text ``table[i, k]`` for every candidate k."""
    if image_embeds.ndim != 2 or text_embeds.ndim != 2:
        raise ValueError(f"{field}: embeddings must be (count, width); got images {tuple(image_embeds.shape)}, "
                         f"texts {tuple(text_embeds.shape)}")
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"{field}: the image embeddings are {image_embeds.shape[1]} wide and the text embeddings "
                         f"{text_embeds.shape[1]}: the vision model must be the text tower's own CLIP")
    n = image_embeds.shape[0]
    _check_table(n, table, labels, text_embeds.shape[0])
    k = table.shape[1]
    if n == 0:
        return ClipJudgement(labels.clone(), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64),
                             torch.zeros(0, k, dtype=torch.float64))
    img = torch.nn.functional.normalize(image_embeds.double(), dim=1)
    txt = torch.nn.functional.normalize(text_embeds.double(), dim=1)
    if not (torch.isfinite(img).all() and torch.isfinite(txt).all()):
        raise ValueError(f"{field}: the embeddings are not finite (a vision or text projection that was not loaded?)")
    cos = (img @ txt.T).gather(1, table)                                # (N, T) -> (N, K)
    own = cos.gather(1, labels[:, None]).squeeze(1)
    best_other = cos.scatter(1, labels[:, None], float("-inf")).max(1).values
    return ClipJudgement(labels.clone(), cos.argmax(1), own - best_other, cos)


@torch.no_grad()
def clip_classify(n_images: int, encode_images: Callable[[Sequence[int]], torch.Tensor],
                  encode_texts: Callable[[Sequence[str]], torch.Tensor], texts: Sequence[str], table: torch.Tensor,
                  labels: torch.Tensor, batch: int = 8, progress: Optional[Callable[[int, int], None]] = None,
                  field: str = "clip_vision") -> ClipJudgement:
    """Judge ``n_images`` images among the candidates of ``table`` (N, K) (rows of ``texts``).

    ``progress(done, total)`` after the texts and after every image batch (``total`` = images + 1)."""
    if int(batch) < 1:
        raise ValueError(f"batch: {batch} < 1")
    _check_table(int(n_images), table, labels, len(texts))
    total = int(n_images) + 1
    text_embeds = torch.as_tensor(encode_texts(list(texts))).float().cpu()
    if text_embeds.shape[0] != len(texts):
        raise ValueError(f"the text encoder gave {text_embeds.shape[0]} embeddings for {len(texts)} texts")
    if progress is not None:
        progress(1, total)
    parts = []
    for a in range(0, int(n_images), int(batch)):
        idx = list(range(a, min(a + int(batch), int(n_images))))
        emb = torch.as_tensor(encode_images(idx)).float().cpu()
        if emb.ndim != 2 or emb.shape[0] != len(idx):
            raise ValueError(f"{field}: the image encoder gave {tuple(emb.shape)} for {len(idx)} images; "
                             "it must give one embedding vector per image")
        parts.append(emb)
        if progress is not None:
            progress(1 + idx[-1] + 1, total)
    image_embeds = torch.cat(parts) if parts else torch.zeros(0, text_embeds.shape[1])
    return zero_shot(image_embeds, text_embeds, table, labels, field)


def agreement(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    """Fraction of images on which two per-image outcomes (verdicts or answers) are equal; None without images."""
    if a.shape != b.shape:
        raise ValueError(f"agreement: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a == b).double().mean()) if a.numel() else None
