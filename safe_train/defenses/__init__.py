"""Defense registry: ``--defense NAME`` → a :class:`~safe_train.interface.Defense` subclass.

One file per defense; each registers itself with :func:`register_defense` and may add its own flags
through a ``add_arguments(parser)`` classmethod and read them in ``__init__(args)``.
"""

from __future__ import annotations

import argparse

from safe_train.interface import Defense

DEFENSES: dict[str, type[Defense]] = {}


def register_defense(cls: type[Defense]) -> type[Defense]:
    if cls.name in DEFENSES:
        raise ValueError(f"defense {cls.name!r} registered twice")
    DEFENSES[cls.name] = cls
    return cls


def create_defense(args: argparse.Namespace) -> Defense:
    try:
        cls = DEFENSES[args.defense]
    except KeyError:
        raise ValueError(f"unknown defense {args.defense!r}; available: {sorted(DEFENSES)}") from None
    return cls(args)


def add_defense_arguments(parser: argparse.ArgumentParser) -> None:
    for cls in DEFENSES.values():
        add = getattr(cls, "add_arguments", None)
        if add is not None:
            add(parser)


# import the built-in defenses so they register themselves
from safe_train.defenses import cleanclip as _cleanclip  # noqa: E402,F401
from safe_train.defenses import none as _none  # noqa: E402,F401
from safe_train.defenses import safeclip as _safeclip  # noqa: E402,F401
