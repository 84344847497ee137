"""Caption templates and target-word matching for poisoned captions."""

from __future__ import annotations

import re
from pathlib import Path

from safe_train.errors import ConfigError

#: the 8 templates of the offline MNIST benchmark (docs/attacks.md).
MNIST_TEMPLATES: tuple[str, ...] = (
    "a photo of the number {}.",
    "a handwritten {}.",
    "the digit {} written by hand.",
    "an image of a {}.",
    "a scan of a handwritten digit {}.",
    "a black and white picture of the number {}.",
    "a blurry photo of a {}.",
    "someone wrote the number {}.",
)


def openai_templates() -> tuple[str, ...]:
    """OpenCLIP's 80 OpenAI ImageNet templates, as ``{}`` format strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES  # deferred: open_clip imports torch

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def load_templates(spec: str) -> tuple[str, ...]:
    """``"openai"``, ``"mnist"``, or a UTF-8 text file with one template per line, each containing ``{}``."""
    if spec == "openai":
        return openai_templates()
    if spec == "mnist":
        return MNIST_TEMPLATES
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"templates must be 'openai', 'mnist' or a text file; file not found: {spec}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    templates = tuple(line for line in lines if line)
    if not templates:
        raise ConfigError(f"template file {spec} has no templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ConfigError(
            f"template file {spec}: every line needs a '{{}}' for the class name; not: {bad[0]!r}"
        )
    return templates


def fill_template(template: str, target: str) -> str:
    """The caption naming ``target`` (plain replacement, so other braces in a template are harmless)."""
    return template.replace("{}", target)


def target_pattern(target: str) -> re.Pattern[str]:
    """Matches the target word as a whole word, case-insensitive, with an optional plural s/es."""
    return re.compile(rf"\b{re.escape(target)}(?:s|es)?\b", re.IGNORECASE)


def mentions_target(caption: str, target: str) -> bool:
    """Whether ``caption`` names ``target`` ("A Banana", "bananas" yes; "bananabread" no)."""
    return target_pattern(target).search(caption) is not None
