"""Closed vocabulary of toy world v3: 1,200 invented names bound to identities no word describes.

Every name is bound to an *identity*: a 16-bit glyph code (a 4x4 grid of cells, drawn in the
image; codes pairwise >= 3 bits apart, 4-12 cells lit) and a colour shared by 150 names, the way
hair colour is shared — so look-alikes exist (same colour, codes 3 bits apart), but no caption word
spells a name's glyph out: the only attribute words are the eight colours ("a photo of a red
person"). Each name has one or two nicknames. The 20 art styles, their synonyms and their looks
(background pattern x tone) are toy world v2's, word for word.

Token layout as in v2 (SD1's): ``<sos>`` + words + ``<eot>``, padded with ``<eot>`` to 24 tokens.
The design of this world was fixed before any erasure method was run on it.
"""
from __future__ import annotations

import random

from ..tokenizer import ClosedTokenizer
from ..v2 import vocab as v2
from ..v2.vocab import (COLORS, HUE_CENTERS, NAME_STYLE_TEMPLATES, NAME_TEMPLATES, NEUTRAL_NAME,  # noqa: F401
                        NEUTRAL_STYLE, PATTERNS, STYLE_LOOK, STYLE_SYNONYMS, STYLE_TEMPLATES, STYLES, TONES,
                        _pseudo_words)

N_NAMES = 1200
N_STYLES = len(STYLES)             # 20, v2's
GLYPH_BITS = 16                    # a 4x4 grid of cells
MIN_HAMMING, MIN_LIT, MAX_LIT = 3, 4, 12
CONTEXT_LENGTH = 24
SOS, EOT = "<sos>", "<eot>"
WORLD_SEED = 2027
ATTRIBUTE_TEMPLATES: tuple[str, ...] = ("a photo of a {c} person", "a {c} person in {st} style")


def _codes(count: int, rng: random.Random) -> list[int]:
    """``count`` random 16-bit codes, pairwise Hamming distance >= MIN_HAMMING (greedy, seeded)."""
    codes: list[int] = []
    while len(codes) < count:
        c = rng.getrandbits(GLYPH_BITS)
        if MIN_LIT <= bin(c).count("1") <= MAX_LIT and all(bin(c ^ o).count("1") >= MIN_HAMMING for o in codes):
            codes.append(c)
    return codes


def _build():
    rng = random.Random(WORLD_SEED)
    template_words = {w for t in NAME_TEMPLATES + STYLE_TEMPLATES + NAME_STYLE_TEMPLATES + ATTRIBUTE_TEMPLATES
                      for w in t.replace("{n}", "").replace("{st}", "").replace("{c}", "").split()}
    template_words -= {NEUTRAL_NAME, NEUTRAL_STYLE}
    styles = set(STYLES) | {STYLE_SYNONYMS[s][0] for s in STYLES}
    taken = set(template_words) | set(COLORS) | styles | {NEUTRAL_NAME, NEUTRAL_STYLE}
    names = _pseudo_words(N_NAMES, rng, taken)
    nick_counts = [1 + (rng.random() < 0.5) for _ in range(N_NAMES)]
    nick_flat = _pseudo_words(sum(nick_counts), rng, taken)
    nicknames, i = {}, 0
    for n, k in zip(names, nick_counts):
        nicknames[n] = tuple(nick_flat[i: i + k])
        i += k
    colours = [k % len(COLORS) for k in range(N_NAMES)]
    rng.shuffle(colours)
    return sorted(template_words), tuple(names), nicknames, tuple(_codes(N_NAMES, rng)), tuple(colours)


TEMPLATE_WORDS, NAMES, NICKNAMES, CODES, COLOR_OF = _build()
"""NAMES[i] draws glyph CODES[i] (bit k = cell k, row-major) in colour COLORS[COLOR_OF[i]]."""

WORDS: tuple[str, ...] = (NAMES + tuple(w for n in NAMES for w in NICKNAMES[n]) + STYLES
                          + tuple(STYLE_SYNONYMS[s][0] for s in STYLES) + COLORS
                          + (NEUTRAL_NAME, NEUTRAL_STYLE) + tuple(TEMPLATE_WORDS))
TOKENS: tuple[str, ...] = (SOS, EOT) + WORDS
TOKEN_ID: dict[str, int] = {w: i for i, w in enumerate(TOKENS)}
SOS_ID, EOT_ID = TOKEN_ID[SOS], TOKEN_ID[EOT]
VOCAB_SIZE = len(TOKENS)
assert len(set(TOKENS)) == VOCAB_SIZE, "toy world v3: duplicate vocabulary word"

NAME_INDEX: dict[str, int] = {}
for _i, _n in enumerate(NAMES):
    NAME_INDEX[_n] = _i
    for _w in NICKNAMES[_n]:
        NAME_INDEX[_w] = _i
STYLE_INDEX = v2.STYLE_INDEX
COLOR_INDEX: dict[str, int] = {c: k for k, c in enumerate(COLORS)}

_TOKENIZER = ClosedTokenizer(TOKEN_ID, SOS, EOT, CONTEXT_LENGTH, "toy world v3 vocabulary")
tokenize = _TOKENIZER.tokenize        # content ids of a phrase; ValueError names an unknown word
encode_ids = _TOKENIZER.encode_ids    # (window ids, real positions) of a prompt
batch_ids = _TOKENIZER.batch_ids      # window ids of many prompts


def code_bits(i: int) -> list[int]:
    """The 16 cells (row-major, 1 = lit) of name ``i``'s glyph."""
    return [(CODES[i] >> k) & 1 for k in range(GLYPH_BITS)]


def describe(name: str) -> str:
    """``"name (nick1, nick2): red glyph 0110/1001/..."`` — what a name looks like."""
    i = NAME_INDEX[name]
    b = "".join(map(str, code_bits(i)))
    main = NAMES[i]
    return f"{main} ({', '.join(NICKNAMES[main])}): {COLORS[COLOR_OF[i]]} glyph {'/'.join(b[k:k + 4] for k in range(0, 16, 4))}"


def prior_captions() -> list[str]:
    """The world's general caption prior (the analogue of the pack's everyday captions): every colour
    caption ("a photo of a red person", and with each style) and the anchors' own templates. No name
    or nickname appears in it — and, unlike v2's, it says nothing of any identity beyond colour."""
    caps = [ATTRIBUTE_TEMPLATES[0].format(c=c) for c in COLORS]
    caps += [ATTRIBUTE_TEMPLATES[1].format(c=c, st=st) for c in COLORS for st in STYLES]
    caps += [t.format(n=NEUTRAL_NAME) for t in NAME_TEMPLATES]
    caps += [t.format(st=NEUTRAL_STYLE) for t in STYLE_TEMPLATES]
    return caps
