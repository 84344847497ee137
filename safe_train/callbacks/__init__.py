"""The built-in callbacks; importing this package registers them in :data:`safe_train.registry.CALLBACKS`.

Every registered callback declares its flags as a typed ``Config`` and switches itself on from them
(``Callback.from_args``): the registry is the dispatch. Out of tree, an entry point in the group
``safe_train.callbacks`` makes ``pip install`` enough.
"""

from safe_train.callbacks import similarity, zeroshot_eval
from safe_train.detection import callback as detection

__all__ = ["detection", "similarity", "zeroshot_eval"]
