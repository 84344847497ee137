"""Data-poisoning attacks on CLIP training sets: triggers, captions, and dataset I/O.

Build a poisoned dataset with ``python -m safe_train.poison`` (``safe_train.poison.poison_dataset``);
rebuild its trigger for evaluation with :func:`trigger_from_manifest`. See docs/attacks.md.

Importing this package registers every built-in trigger class in ``ATTACKS`` (the registry
:data:`safe_train.registry.ATTACKS` loads it for that); :func:`attack_names` lists every valid attack.
"""

from safe_train.attacks.captions import MNIST_TEMPLATES, load_templates, mentions_target
from safe_train.attacks.triggers import (
    SIG,
    TARGETED,
    BadNets,
    Blended,
    Trigger,
    WaNet,
    attack_names,
    build_trigger,
    resize_to_model,
    trigger_from_manifest,
    trigger_params,
)
from safe_train.registry import ATTACKS

__all__ = [
    "ATTACKS",
    "MNIST_TEMPLATES",
    "SIG",
    "TARGETED",
    "BadNets",
    "Blended",
    "Trigger",
    "WaNet",
    "attack_names",
    "build_trigger",
    "load_templates",
    "mentions_target",
    "resize_to_model",
    "trigger_from_manifest",
    "trigger_params",
]
