"""The closed-vocabulary tokenizer both toy worlds use, laid out like SD1's CLIP windows:
``<sos>`` + words + ``<eot>``, padded with ``<eot>`` up to the window length."""
from __future__ import annotations

from typing import Mapping, Sequence


class ClosedTokenizer:
    def __init__(self, token_id: Mapping[str, int], sos: str, eot: str, length: int, label: str):
        self.token_id, self.sos, self.eot, self.length, self.label = token_id, sos, eot, length, label

    def tokenize(self, text: str) -> list[int]:
        """Content token ids of ``text`` (no start/end/padding). Unknown words raise ValueError."""
        ids = []
        for w in text.lower().split():
            if w not in self.token_id or w in (self.sos, self.eot):
                raise ValueError(f"{self.label}: unknown word {w!r} in {text!r}")
            ids.append(self.token_id[w])
        return ids

    def encode_ids(self, text: str, length: int | None = None) -> tuple[list[int], int]:
        """Full window ids ``<sos> words <eot> <eot>...`` and the number of real positions."""
        length = self.length if length is None else length
        words = self.tokenize(text)
        n = len(words) + 2
        if n > length:
            raise ValueError(f"{self.label}: prompt {text!r} needs {n} tokens, window is {length}")
        return [self.token_id[self.sos]] + words + [self.token_id[self.eot]] * (length - n + 1), n

    def batch_ids(self, texts: Sequence[str], length: int | None = None) -> list[list[int]]:
        """Window ids for many prompts (list of lists, each of the window length)."""
        return [self.encode_ids(t, length)[0] for t in texts]
