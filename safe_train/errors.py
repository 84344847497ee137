"""Every user-facing error of safe-train, under one base class.

A :class:`SafeTrainError` is bad input (a malformed config, an unknown name, a missing column, a truncated
checkpoint, ...): every command prints it as one line on stderr and exits with :data:`EXIT_USAGE`. Anything
else is a bug and keeps its traceback. The subclasses also derive from the builtin a caller would catch
(``ValueError``, ``KeyError``, ``RuntimeError``) so code written against those keeps working.

This module imports nothing from the package: every other module may import it.
"""

from __future__ import annotations

import sys

EXIT_USAGE = 2
"""Exit code of every command for a :class:`SafeTrainError` (argparse uses the same for bad flags)."""


EXIT_PREEMPTED = 75
"""Exit code of a training run stopped by SIGUSR1/SIGTERM after writing a step checkpoint (sysexits'
EX_TEMPFAIL: run it again with ``--resume latest``). ``slurm/train.sbatch`` requeues the job on it."""


class SafeTrainError(Exception):
    """Bad input a user can fix: one line on stderr, exit code 2."""


class ConfigError(SafeTrainError, ValueError):
    """A malformed config file or flag value, or an unknown registry name."""


class DataError(SafeTrainError, ValueError):
    """Training or evaluation data that cannot be read (missing column, no samples, ...)."""


class ManifestError(SafeTrainError, ValueError):
    """A poison manifest that is missing or malformed."""


class EvaluationError(SafeTrainError, ValueError):
    """Evaluation inputs that do not fit together (labels, class names, checkpoint)."""


class PoisonError(SafeTrainError, ValueError):
    """An attack that cannot be applied to the given dataset."""


class DetectError(SafeTrainError, ValueError):
    """Backdoor-sample detection inputs that cannot be scored."""


class CheckpointError(SafeTrainError, ValueError):
    """A checkpoint or its safe-train state that is missing, truncated or from another run."""


class Preempted(Exception):
    """A stop signal was handled: the step checkpoint is written and the run must exit with EXIT_PREEMPTED."""


class WordNetMissingError(SafeTrainError, RuntimeError):
    """EDA captions need NLTK's WordNet corpus and it is not installed."""


class UnknownSampleError(SafeTrainError, KeyError):
    """A sample id that the per-sample table does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; print it as written
        return str(self.args[0]) if self.args else ""


def report(error: Exception, prog: str = "safe-train") -> int:
    """Print ``error`` (a :class:`SafeTrainError`, or an OS error such as a missing file) as one line on stderr;
    return the exit code a command returns for it."""
    message = " ".join(str(error).split("\n"))
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE
