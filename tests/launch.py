"""`python tests/launch.py ARGS` = `python -m safe_train.main ARGS` with the test-only defenses registered."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

import plugins  # noqa: E402,F401

from safe_train.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
