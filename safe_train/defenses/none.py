"""``--defense none``: plain OpenCLIP training (the baseline every defense is measured against)."""

from __future__ import annotations

import argparse

from safe_train.defenses import register_defense
from safe_train.interface import Defense


@register_defense
class NoDefense(Defense):
    """Every hook keeps OpenCLIP's behaviour: same data order, forward, loss and schedule."""

    name = "none"

    def __init__(self, args: argparse.Namespace | None = None) -> None:
        self.args = args
