"""Prompt templates for building erase/preserve prompts: our own sets for objects, persons, styles.

Each template holds one ``{}`` where the concept (or its anchor) goes. CFR, LoRA training and
fusion fill the same template with the concept and with its anchor, so the pairs line up.
These lists are written for this pack; they are not the reference implementation's lists.
"""
from __future__ import annotations

from typing import Sequence

OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a close-up photo of a {}",
    "a blurry photo of a {}",
    "a picture of the {}",
    "an image showing a {}",
    "a {} in the middle of the frame",
    "a detailed drawing of a {}",
    "a painting of a {}",
    "a sketch of a {}",
    "a 3d render of a {}",
    "a cartoon {}",
    "a small {} on a table",
    "a large {} outdoors",
    "a {} at night",
    "a {} in bright sunlight",
    "a black and white photo of a {}",
    "a {} seen from above",
    "a {} next to a window",
    "a watercolor of a {}",
    "a toy {}",
    "a plastic model of a {}",
    "a {} in a museum",
    "an old photograph of a {}",
    "a {} on a white background",
    "a low resolution photo of the {}",
    "a high quality photo of the {}",
    "a {} in the rain",
    "a crowd of people near a {}",
    "a postcard with a {}",
    "a {} during the day",
)

PERSON_TEMPLATES: tuple[str, ...] = (
    "a photo of {}",
    "a portrait of {}",
    "a close-up portrait of {}",
    "{} smiling at the camera",
    "{} at a public event",
    "{} on the red carpet",
    "a candid photo of {}",
    "an oil painting of {}",
    "a pencil sketch of {}",
    "a caricature of {}",
    "{} in an official photo",
    "{} giving a speech",
    "{} walking on the street",
    "{} in a movie scene",
    "a magazine cover with {}",
    "a black and white photo of {}",
    "{} wearing a suit",
    "{} at the beach",
    "a selfie of {}",
    "a painting of {} in a garden",
    "{} sitting in a chair",
    "a photo of {} laughing",
    "{} in an interview",
    "a headshot of {}",
    "{} waving to fans",
    "a statue of {}",
    "a cartoon drawing of {}",
    "{} in a crowd",
    "a photo of {} at night",
    "a digital illustration of {}",
)

STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "an artwork by {}",
    "a landscape painted by {}",
    "a portrait painted by {}",
    "a still life by {}",
    "art inspired by {}",
    "a famous artwork by {}",
    "a reproduction of a painting by {}",
    "a city street in the style of {}",
    "a drawing in the style of {}",
    "a sketch by {}",
    "{}'s famous painting",
    "a picture of a cat in the style of {}",
    "a mountain scene by {}",
    "a seascape painted by {}",
    "an illustration in the style of {}",
    "a poster in the style of {}",
    "flowers painted by {}",
    "a night sky in the style of {}",
    "a forest painted by {}",
    "a village in the style of {}",
    "a watercolor by {}",
    "a masterpiece by {}",
    "a self portrait in the style of {}",
    "an abstract composition by {}",
    "a garden in the style of {}",
    "a house painted by {}",
    "a river scene in the style of {}",
    "a sunset painted by {}",
    "a mural in the style of {}",
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": OBJECT_TEMPLATES,
    "person": PERSON_TEMPLATES,
    "style": STYLE_TEMPLATES,
}

DEFAULT_ANCHORS: dict[str, str] = {"object": "", "person": "a person", "style": "art"}

GENERIC_PRESERVE_PROMPTS: tuple[str, ...] = (
    "a dog running on the grass",
    "a bowl of fruit on a kitchen table",
    "a man riding a bicycle down the street",
    "a woman reading a book in a park",
    "a red car parked by the road",
    "a mountain lake at sunrise",
    "two children playing with a ball",
    "a plate of pasta with tomato sauce",
    "a cat sleeping on a sofa",
    "a city skyline at night",
    "a train crossing a bridge",
    "a group of people at a cafe",
    "a sailboat on the ocean",
    "a bird sitting on a branch",
    "a vase of flowers by the window",
    "an old building with a clock tower",
    "a horse standing in a field",
    "a snowy forest path",
    "a person holding an umbrella in the rain",
    "a laptop on a wooden desk",
)


def templates_for(kind: str) -> tuple[str, ...]:
    try:
        return TEMPLATES[kind]
    except KeyError:
        raise ValueError(f"concept_type: unknown {kind!r}; choose one of {sorted(TEMPLATES)}") from None


def check_templates(templates) -> None:
    """ValueError unless there is at least one template and each has a '{}'."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("templates: every template needs one '{}' where the concept goes")


def fill(template: str, phrase: str) -> str:
    """Fill a template; an empty phrase (the neutral anchor) leaves no double spaces."""
    return " ".join(template.replace("{}", phrase).split())


def phrase_groups(phrases: Sequence[str], templates: Sequence[str]) -> tuple[list[str], list[str]]:
    """(prompts, labels): every template filled with each phrase, labelled with the phrase."""
    prompts = [fill(t, p) for p in phrases for t in templates]
    return prompts, [p for p in phrases for _ in templates]
