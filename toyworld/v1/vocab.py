"""Closed vocabulary, tokenizer and caption templates of the toy world.

Token layout mimics SD1 CLIP: ``<sos>`` + words + ``<eot>``, padded with copies of ``<eot>``
to the fixed context length ``L``. With the causal text encoder this makes colour
information leak into every later token, pads included, as in SD1.
"""
from __future__ import annotations

from ..tokenizer import ClosedTokenizer

COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
HUE_CENTERS: tuple[float, ...] = (0.0, 30.0, 60.0, 120.0, 180.0, 240.0, 275.0, 320.0)
SYNONYMS: dict[str, tuple[str, str]] = {
    "red": ("crimson", "scarlet"),
    "orange": ("amber", "tangerine"),
    "yellow": ("golden", "lemon"),
    "green": ("emerald", "lime"),
    "cyan": ("teal", "aqua"),
    "blue": ("azure", "navy"),
    "purple": ("violet", "lavender"),
    "pink": ("magenta", "rose"),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
STYLES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
NEUTRAL_COLOR = "any"
TEMPLATE_WORDS: tuple[str, ...] = ("a", "in", "style", "picture", "of", "that", "is", "on", "background")

# Caption templates; {c} colour word, {s} shape, {st} style.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {c} {s} in {st} style",
    "{st} style picture of a {c} {s}",
    "a {s} that is {c} on {st} background",
)
SHORT_TEMPLATE = "a {c} {s}"

CONTEXT_LENGTH = 16
SOS, EOT = "<sos>", "<eot>"

# id 0 = <sos>, id 1 = <eot>, then the words in a fixed order.
WORDS: tuple[str, ...] = (
    COLORS
    + tuple(w for c in COLORS for w in SYNONYMS[c])
    + SHAPES
    + STYLES
    + (NEUTRAL_COLOR,)
    + TEMPLATE_WORDS
)
TOKENS: tuple[str, ...] = (SOS, EOT) + WORDS
TOKEN_ID: dict[str, int] = {w: i for i, w in enumerate(TOKENS)}
SOS_ID = TOKEN_ID[SOS]
EOT_ID = TOKEN_ID[EOT]
VOCAB_SIZE = len(TOKENS)

# Every colour word (main word or synonym) -> colour index.
COLOR_WORD_INDEX: dict[str, int] = {}
for _i, _c in enumerate(COLORS):
    COLOR_WORD_INDEX[_c] = _i
    for _s in SYNONYMS[_c]:
        COLOR_WORD_INDEX[_s] = _i


_TOKENIZER = ClosedTokenizer(TOKEN_ID, SOS, EOT, CONTEXT_LENGTH, "toy vocab")
tokenize = _TOKENIZER.tokenize        # content ids of a phrase; ValueError names an unknown word
encode_ids = _TOKENIZER.encode_ids    # (window ids, real positions) of a prompt
batch_ids = _TOKENIZER.batch_ids      # window ids of many prompts


def caption(template: str, color_word: str, shape: str, style: str) -> str:
    """Fill a caption template."""
    return template.format(c=color_word, s=shape, st=style)
