"""Class names and prompt templates for zero-shot evaluation.

A zero-shot classifier is only as comparable as its prompts: every number in a report must say which
class names and templates produced it, so they live here under short names instead of in scripts.
Templates are ``str.format`` strings with one ``{}`` for the class name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

MNIST_CLASSNAMES: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# The 8 templates of the offline benchmark: training captions and zero-shot prompts share them.
MNIST_TEMPLATES: list[str] = [
    "a photo of the number {}.",
    "a handwritten {}.",
    "the digit {} written by hand.",
    "an image of a {}.",
    "a scan of a handwritten digit {}.",
    "a black and white picture of the number {}.",
    "a blurry photo of a {}.",
    "someone wrote the number {}.",
]

# Used when only a class-name file is given: CLIP's single default prompt.
DEFAULT_TEMPLATES: list[str] = ["a photo of a {}."]

BUILTIN_SETS = ("imagenet", "mnist")

PathLike = str | os.PathLike


def _imagenet() -> tuple[list[str], list[str]]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    # OpenCLIP stores the templates as lambdas; calling one with "{}" gives back its format string.
    return list(IMAGENET_CLASSNAMES), [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def _read_lines(path: PathLike, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{what} file is empty: {p}")
    return lines


def validate_templates(templates: Sequence[str]) -> list[str]:
    """Check every template formats with exactly one class name (a stray brace fails at eval time)."""
    out = []
    for t in templates:
        try:
            ok = t.count("{}") == 1 and t.format("x") == t.replace("{}", "x")
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"template must contain exactly one '{{}}' and no other braces: {t!r}")
        out.append(t)
    return out


def get_zeroshot_set(name_or_paths: str | PathLike | Sequence[PathLike]) -> tuple[list[str], list[str]]:
    """Return ``(classnames, templates)`` for a built-in set or for files.

    - ``"mnist"`` / ``"imagenet"``: built-in sets (ImageNet uses OpenCLIP's 1000 names and the 80
      OpenAI templates).
    - ``(classnames_file, templates_file)``: one class name per line, one template per line.
    - ``classnames_file`` alone: templates default to ``["a photo of a {}."]``.
    """
    if isinstance(name_or_paths, str) and name_or_paths.lower() in BUILTIN_SETS:
        if name_or_paths.lower() == "mnist":
            return list(MNIST_CLASSNAMES), list(MNIST_TEMPLATES)
        return _imagenet()
    if isinstance(name_or_paths, (str, os.PathLike)):
        if not Path(name_or_paths).exists():
            raise ValueError(
                f"unknown zero-shot set {str(name_or_paths)!r}: use one of {', '.join(BUILTIN_SETS)} "
                "or a class-name file (one name per line)"
            )
        return _read_lines(name_or_paths, "class-name"), list(DEFAULT_TEMPLATES)
    paths = list(name_or_paths)
    if len(paths) != 2:
        raise ValueError("give a zero-shot set name, a class-name file, or (class-name file, template file)")
    classnames = _read_lines(paths[0], "class-name")
    templates = validate_templates(_read_lines(paths[1], "template"))
    return classnames, templates
