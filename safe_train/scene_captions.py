"""Captions for the MultiMNIST-style scenes of :mod:`safe_train.scenes`, made only from a scene's metadata.

A caption names every digit of its scene (as a word, "seven", or a numeral, "7"), often with its
colour and size class, and for two or three digits a spatial relation or a plain list. Every
statement in it is true of the scene: relations are read off the digits' ink boxes
(:func:`left_of`, :func:`above`), colours and sizes are the ones the renderer drew.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import permutations

import numpy as np

from safe_train.zeroshot_sets import MNIST_CLASSNAMES

# The named palette digits are drawn in (RGB). Names are single words so captions stay simple to parse.
PALETTE: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "red": (235, 45, 45),
    "green": (45, 205, 65),
    "blue": (70, 110, 255),
    "yellow": (240, 230, 45),
    "cyan": (45, 220, 230),
    "magenta": (230, 60, 230),
    "orange": (255, 150, 35),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SIZES: tuple[str, ...] = ("small", "large")
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
# Two boxes may overlap by this many pixels along an axis and still be "left of" / "above" each other.
RELATION_TOLERANCE = 1

# Slot-free templates: "{0}", "{1}", "{2}" are digit phrases with their article ("a red seven").
# A template's relations (name, slot a, slot b) must all hold for the digits put in its slots.
Relation = tuple[str, int, int]
ONE_DIGIT: tuple[str, ...] = (
    "{0}.",
    "a picture of {0}.",
    "a photo of {0}.",
    "an image showing {0}.",
    "{0} on a dark background.",
    "{0} written by hand.",
    "a handwritten digit: {0}.",
    "there is {0} in the picture.",
    "a single digit, {0}.",
    "a dark image with {0} in it.",
)
TWO_DIGITS: tuple[tuple[str, tuple[Relation, ...]], ...] = (
    ("{0} and {1}.", ()),
    ("two digits: {0} and {1}.", ()),
    ("a picture of {0} and {1}.", ()),
    ("{0} to the left of {1}.", (("left", 0, 1),)),
    ("{0} to the right of {1}.", (("left", 1, 0),)),
    ("{0} left of {1}.", (("left", 0, 1),)),
    ("{0} above {1}.", (("above", 0, 1),)),
    ("{0} below {1}.", (("above", 1, 0),)),
    ("{0} over {1}.", (("above", 0, 1),)),
    ("{0} under {1}.", (("above", 1, 0),)),
    ("on the left {0}, on the right {1}.", (("left", 0, 1),)),
    ("at the top {0}, at the bottom {1}.", (("above", 0, 1),)),
)
THREE_DIGITS: tuple[tuple[str, tuple[Relation, ...]], ...] = (
    ("three digits: {0}, {1} and {2}.", ()),
    ("{0}, {1} and {2}.", ()),
    ("a picture of {0}, {1} and {2}.", ()),
    ("from left to right: {0}, {1} and {2}.", (("left", 0, 1), ("left", 1, 2))),
    ("from top to bottom: {0}, {1} and {2}.", (("above", 0, 1), ("above", 1, 2))),
    ("{0} to the left of {1}, and {2}.", (("left", 0, 1),)),
    ("{0} to the right of {1}, and {2}.", (("left", 1, 0),)),
    ("{0} above {1}, and {2}.", (("above", 0, 1),)),
    ("{0} below {1}, and {2}.", (("above", 1, 0),)),
)
N_SURFACE_FORMS = len(ONE_DIGIT) + len(TWO_DIGITS) + len(THREE_DIGITS)

# Chances that a digit phrase carries its colour / its size class, and that the caption uses numerals. Few
# attribute words and no numerals: colour words are an easy shortcut for matching captions that a tiny model
# takes before it learns the digits, and numerals split the few examples of each digit word between two
# spellings (the validation split chose this; benchmarks/RESULTS.md, "Scene corpus").
P_COLOUR = 0.3
P_SIZE = 0.2
P_NUMERAL = 0.0

Box = Sequence[int]  # x0, y0, x1, y1 of a digit's ink, x1/y1 exclusive


def left_of(a: Box, b: Box) -> bool:
    """Whether ink box ``a`` lies left of ``b`` (they may share at most RELATION_TOLERANCE columns)."""
    return a[2] <= b[0] + RELATION_TOLERANCE


def above(a: Box, b: Box) -> bool:
    """Whether ink box ``a`` lies above ``b`` (they may share at most RELATION_TOLERANCE rows)."""
    return a[3] <= b[1] + RELATION_TOLERANCE


def separated(a: Box, b: Box) -> bool:
    """Whether two boxes are apart along some axis: then at least one relation holds between them."""
    return left_of(a, b) or left_of(b, a) or above(a, b) or above(b, a)


RELATIONS = {"left": left_of, "above": above}


def article(word: str) -> str:
    """ "a" or "an" before ``word`` as spoken ("an eight", "an 8", "an orange"; words here are one digit at most)."""
    return "an" if word[0] in "aeiou8" else "a"


def digit_phrase(label: int, colour: str, size: str, rng: np.random.Generator, numeral: bool) -> str:
    """ "a small red seven", "an 8", "a blue 2", ... (the attributes shown are drawn with ``rng``)."""
    words = []
    if rng.random() < P_SIZE:
        words.append(SIZE_WORDS[size][int(rng.integers(len(SIZE_WORDS[size])))])
    if rng.random() < P_COLOUR:
        words.append(colour)
    words.append(str(label) if numeral else MNIST_CLASSNAMES[label])
    return f"{article(words[0])} {' '.join(words)}"


def _options(templates, boxes: Sequence[Box]) -> list[tuple[str, tuple[int, ...]]]:
    """Every (template, slot order) whose relations hold for the scene."""
    out = []
    for text, relations in templates:
        for order in permutations(range(len(boxes))):
            if all(RELATIONS[name](boxes[order[a]], boxes[order[b]]) for name, a, b in relations):
                out.append((text, order))
    return out


def make_caption(digits: Sequence[dict], rng: np.random.Generator) -> str:
    """A caption for a scene's ``digits`` (dicts with ``label``, ``colour``, ``size``, ``box``), drawn with ``rng``.

    It names every digit once; the slot order, template and attributes shown are random, and only
    templates whose relations hold for the boxes are drawn from.
    """
    n = len(digits)
    if n == 1:
        options = [(t, (0,)) for t in ONE_DIGIT]
    elif n in (2, 3):
        options = _options(TWO_DIGITS if n == 2 else THREE_DIGITS, [d["box"] for d in digits])
    else:
        raise ValueError(f"a scene has 1 to 3 digits, got {n}")
    text, order = options[int(rng.integers(len(options)))]
    numeral = bool(rng.random() < P_NUMERAL)
    phrases = [digit_phrase(digits[i]["label"], digits[i]["colour"], digits[i]["size"], rng, numeral) for i in order]
    return text.format(*phrases)
