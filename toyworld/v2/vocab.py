"""Closed vocabulary of toy world v2: 200 invented names, their nicknames, 20 art styles.

Every name is bound to one fixed appearance, a combination of colour (8) x shape (5) x position
(5) — all 200 combinations, each used once — so names share attributes with their neighbours
the way celebrities share hair colour, and erasing one must not erase the others. Each name
has one or two nicknames (synonyms, for generality). Each of the 20 art styles is a background
pattern (5) x background tone (4), independent of the identity, with one synonym.

The words are pseudo-words made from syllables by a fixed seed (no real names). Token layout
is SD1's: ``<sos>`` + words + ``<eot>``, padded with ``<eot>`` up to ``CONTEXT_LENGTH`` = 24,
so with the causal text encoder a concept leaks into every later position, pads included.
"""
from __future__ import annotations

import random
from ..tokenizer import ClosedTokenizer

COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
HUE_CENTERS: tuple[float, ...] = (0.0, 30.0, 60.0, 120.0, 180.0, 240.0, 275.0, 320.0)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "bar")
POSITIONS: tuple[str, ...] = ("middle", "topleft", "topright", "bottomleft", "bottomright")
PATTERNS: tuple[str, ...] = ("plain", "hstripes", "vstripes", "dots", "checker")
TONES: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)  # base grey; the pattern's second grey is 0.25 darker

NEUTRAL_NAME = "someone"   # the anchor for names ("a photo of someone": any identity)
NEUTRAL_STYLE = "art"      # the anchor for styles ("... in art style": any style)

N_NAMES = len(COLORS) * len(SHAPES) * len(POSITIONS)   # 200
N_STYLES = len(PATTERNS) * len(TONES)                  # 20
CONTEXT_LENGTH = 24
SOS, EOT = "<sos>", "<eot>"
WORLD_SEED = 2026

# ----------------------------------------------------------------------------- templates
NAME_TEMPLATES: tuple[str, ...] = (
    "a photo of {n}", "a picture of {n}", "an image of {n}", "a portrait of {n}",
    "a close up photo of {n}", "{n} posing for the camera", "a snapshot of {n}", "this is {n}",
    "a good photo of {n}", "{n} seen from the front", "a blurry photo of {n}", "a rendering of {n}",
)
STYLE_TEMPLATES: tuple[str, ...] = (
    "a photo of someone in {st} style", "someone drawn in {st} style", "{st} style drawing of someone",
    "a {st} style picture", "an artwork in {st} style", "a painting in the style of {st}",
    "{st} style", "a scene in {st} style", "an image in the style of {st}",
    "someone painted in {st} style", "a {st} style portrait of someone",
)
NAME_STYLE_TEMPLATES: tuple[str, ...] = (
    "a photo of {n} in {st} style", "{n} in {st} style", "a {st} style portrait of {n}",
    "{st} style drawing of {n}", "a painting of {n} in the style of {st}", "{n} drawn in {st} style",
    "an image of {n} in the style of {st}", "a picture of {n} in {st} style", "{n} painted in {st} style",
    "a close up of {n} in {st} style", "a snapshot of {n} in the style of {st}",
)
ATTRIBUTE_TEMPLATES: tuple[str, ...] = ("a {c} {s} at the {p}", "a {c} {s} at the {p} in {st} style")


# ----------------------------------------------------------------------------- invented words
def _pseudo_words(count: int, rng: random.Random, taken: set[str]) -> list[str]:
    onsets = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl",
              "kr", "pl", "st", "tr", "sh", "th", "ch"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
    codas = ["", "", "", "n", "r", "l", "s", "x", "nd", "rk"]
    words: list[str] = []
    while len(words) < count:
        syl = rng.choice((2, 2, 3))
        w = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syl)) + rng.choice(codas)
        if w not in taken and 4 <= len(w) <= 11:
            taken.add(w)
            words.append(w)
    return words


def _build():
    rng = random.Random(WORLD_SEED)
    template_words = {w for t in NAME_TEMPLATES + STYLE_TEMPLATES + NAME_STYLE_TEMPLATES + ATTRIBUTE_TEMPLATES
                      for w in t.replace("{n}", "").replace("{st}", "").replace("{c}", "").replace("{s}", "")
                      .replace("{p}", "").split()}
    template_words -= {NEUTRAL_NAME, NEUTRAL_STYLE}
    taken = set(template_words) | set(COLORS) | set(SHAPES) | set(POSITIONS) | {NEUTRAL_NAME, NEUTRAL_STYLE}
    names = _pseudo_words(N_NAMES, rng, taken)
    nick_counts = [1 + (rng.random() < 0.5) for _ in range(N_NAMES)]
    nick_flat = _pseudo_words(sum(nick_counts), rng, taken)
    nicknames, i = {}, 0
    for n, k in zip(names, nick_counts):
        nicknames[n] = tuple(nick_flat[i: i + k])
        i += k
    styles = _pseudo_words(N_STYLES, rng, taken)
    style_syn = dict(zip(styles, ((w,) for w in _pseudo_words(N_STYLES, rng, taken))))
    combos = [(c, s, p) for c in range(len(COLORS)) for s in range(len(SHAPES)) for p in range(len(POSITIONS))]
    rng.shuffle(combos)
    looks = [(pt, tn) for pt in range(len(PATTERNS)) for tn in range(len(TONES))]
    rng.shuffle(looks)
    return sorted(template_words), tuple(names), nicknames, tuple(styles), style_syn, tuple(combos), tuple(looks)


TEMPLATE_WORDS, NAMES, NICKNAMES, STYLES, STYLE_SYNONYMS, APPEARANCE, STYLE_LOOK = _build()
"""NAMES[i] looks like APPEARANCE[i] = (colour, shape, position) indices; STYLES[j] renders with
STYLE_LOOK[j] = (pattern, tone) indices."""

WORDS: tuple[str, ...] = (NAMES + tuple(w for n in NAMES for w in NICKNAMES[n]) + STYLES
                          + tuple(STYLE_SYNONYMS[s][0] for s in STYLES) + COLORS + SHAPES + POSITIONS
                          + (NEUTRAL_NAME, NEUTRAL_STYLE) + tuple(TEMPLATE_WORDS))
TOKENS: tuple[str, ...] = (SOS, EOT) + WORDS
TOKEN_ID: dict[str, int] = {w: i for i, w in enumerate(TOKENS)}
SOS_ID, EOT_ID = TOKEN_ID[SOS], TOKEN_ID[EOT]
VOCAB_SIZE = len(TOKENS)
assert len(set(TOKENS)) == VOCAB_SIZE, "toy world v2: duplicate vocabulary word"

NAME_INDEX: dict[str, int] = {}
for _i, _n in enumerate(NAMES):
    NAME_INDEX[_n] = _i
    for _w in NICKNAMES[_n]:
        NAME_INDEX[_w] = _i
STYLE_INDEX: dict[str, int] = {}
for _j, _s in enumerate(STYLES):
    STYLE_INDEX[_s] = _j
    STYLE_INDEX[STYLE_SYNONYMS[_s][0]] = _j
IDENTITY_OF: dict[tuple[int, int, int], int] = {a: i for i, a in enumerate(APPEARANCE)}


_TOKENIZER = ClosedTokenizer(TOKEN_ID, SOS, EOT, CONTEXT_LENGTH, "toy world v2 vocabulary")
tokenize = _TOKENIZER.tokenize        # content ids of a phrase; ValueError names an unknown word
encode_ids = _TOKENIZER.encode_ids    # (window ids, real positions) of a prompt
batch_ids = _TOKENIZER.batch_ids      # window ids of many prompts


def describe(name: str) -> str:
    """``"name (nick1, nick2): red circle at the middle"`` — what a name looks like."""
    i = NAME_INDEX[name]
    c, s, p = APPEARANCE[i]
    main = NAMES[i]
    return f"{main} ({', '.join(NICKNAMES[main])}): {COLORS[c]} {SHAPES[s]} at the {POSITIONS[p]}"
