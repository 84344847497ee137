"""The built-in defenses, one file each; importing this package registers them in
:data:`safe_train.registry.DEFENSES` (``--defense NAME``).

A new defense is one file: a :class:`~safe_train.interface.Defense` subclass decorated with
``@DEFENSES.register``, with its flags as a typed ``Config`` (:mod:`safe_train.flags`). Out of tree, an
entry point in the group ``safe_train.defenses`` makes ``pip install`` enough.
"""

from safe_train.defenses import cleanclip, none, roclip, safeclip

__all__ = ["cleanclip", "none", "roclip", "safeclip"]
