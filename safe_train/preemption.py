"""SIGUSR1 and SIGTERM end a run cleanly: the current step finishes, every rank writes its part of a
step checkpoint at the same step, and the process exits with :data:`~safe_train.errors.EXIT_PREEMPTED`.

Slurm sends SIGUSR1 before a time limit (``sbatch --signal=USR1@T``) and SIGTERM on preemption; both
used to kill the run at once, losing everything since the last epoch checkpoint. The handler only
sets a flag (so a second signal while the checkpoint is being written changes nothing); the engine
reads it after every step and agrees on it across ranks with one small all-reduce.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from torch.utils.data import get_worker_info

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    """Set by a stop signal; read by the training loop."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._installed: dict[int, object] = {}
        self._pid = os.getpid()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked child inherited the handler
            if get_worker_info() is not None:
                return  # a data-loader worker: Slurm signals it too; the main process ends it cleanly
            signal.signal(signum, signal.SIG_DFL)  # anything else (OpenCLIP's remote-sync process, ...)
            os.kill(os.getpid(), signum)  # ends as it would have without safe-train
            return
        first = self.signal_name is None
        self.signal_name = signal.Signals(signum).name
        if first:
            log.warning(f"received {self.signal_name}: stopping after the current step with a step checkpoint")

    def install(self) -> None:
        """Install the handlers (main thread only; a no-op elsewhere, e.g. in a test's thread)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._pid = os.getpid()
        for signum in STOP_SIGNALS:
            self._installed[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, previous in self._installed.items():
            signal.signal(signum, previous)
        self._installed.clear()
