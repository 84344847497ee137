"""``--defense none``: plain OpenCLIP training (the baseline every defense is measured against)."""

from __future__ import annotations

from safe_train.interface import Defense
from safe_train.registry import DEFENSES


@DEFENSES.register
class NoDefense(Defense):
    """Every hook keeps OpenCLIP's behaviour: same data order, forward, loss and schedule."""

    name = "none"
