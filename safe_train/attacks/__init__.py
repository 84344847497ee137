"""Data-poisoning attacks on CLIP training sets: triggers, captions, and dataset I/O.

Build a poisoned dataset with ``python -m safe_train.poison`` (``safe_train.poison.poison_dataset``);
rebuild its trigger for evaluation with :func:`trigger_from_manifest`. See docs/attacks.md.
"""

from safe_train.attacks.captions import MNIST_TEMPLATES, load_templates, mentions_target
from safe_train.attacks.triggers import (
    ATTACK_NAMES,
    ATTACKS,
    SIG,
    TARGETED,
    BadNets,
    Blended,
    Trigger,
    WaNet,
    build_trigger,
    resize_to_model,
    trigger_from_manifest,
    trigger_params,
)

__all__ = [
    "ATTACKS",
    "ATTACK_NAMES",
    "MNIST_TEMPLATES",
    "SIG",
    "TARGETED",
    "BadNets",
    "Blended",
    "Trigger",
    "WaNet",
    "build_trigger",
    "load_templates",
    "mentions_target",
    "resize_to_model",
    "trigger_from_manifest",
    "trigger_params",
]
