"""``safe-train`` console script: one entry point for every command.

    safe-train bench [...]      the offline poisoning benchmark (python -m safe_train.bench)
    safe-train train [...]      training (python -m safe_train.main; use torchrun/srun for several processes)
    safe-train poison [...]     write a poisoned dataset + manifest (python -m safe_train.poison)
    safe-train evaluate [...]   clean accuracy / ASR / detection metrics (python -m safe_train.evaluate_cli)
    safe-train detect [...]     score a dataset for poisoned samples, write a blocklist (python -m safe_train.detect)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "bench": "safe_train.bench",
    "train": "safe_train.main",
    "poison": "safe_train.poison",
    "evaluate": "safe_train.evaluate_cli",
    "detect": "safe_train.detect",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"safe-train: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(COMMANDS[command]).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
