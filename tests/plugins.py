"""Test-only defenses that exercise the engine's extension points (importing registers them)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from safe_train.flags import FlagConfig, option
from safe_train.interface import Callback, Defense, Selection, TrainPass
from safe_train.registry import CALLBACKS, DEFENSES


class PassPlanDefense(Defense):
    """Epoch plan: an inference pass over everything, then a training pass over the 'even' half.

    Ids of each pass are recorded in table columns so tests can check who reached which pass.
    'even' = even rank in the sorted id list (works for CSV rows and webdataset hashes alike).
    """

    name = "test_pass_plan"
    needs_sample_tracking = True

    def __init__(self, args=None) -> None:
        self.args = args

    def setup(self, ctx) -> None:
        ctx.table.add_column("inference_seen", np.int32, 0)
        ctx.table.add_column("chosen", bool, False)

    def plan_epoch(self, ctx, epoch):
        if len(ctx.table) == 0:  # webdataset: ids are known after the first epoch
            return [TrainPass("train")]
        chosen = ctx.table.ids[::2]
        ctx.table.set("chosen", chosen, True)
        return [TrainPass("similarity", train=False), TrainPass("evens", selection=Selection.including(chosen))]

    def on_inference_batch(self, ctx, pass_, sample_ids, features) -> None:
        ids = sample_ids.cpu().numpy()
        ctx.table.record("inference_seen", ids, np.ones(len(ids), np.int32))


DEFENSES.register(PassPlanDefense)


@dataclass
class SignalAtConfig(FlagConfig):
    group: ClassVar[str] = "tests: send this process a stop signal"
    test_signal_at_step: int = option(-1, "Global step after which rank --test-signal-rank signals itself.")
    test_signal_at_inference_batch: int = option(-1, "Inference batch (counted over the run) after which to signal.")
    test_signal_rank: int = option(0, "Which rank signals itself.")
    test_signal_name: str = option("SIGUSR1", "SIGUSR1, SIGTERM or SIGKILL.")
    test_signal_twice: bool = option(False, "Send the signal a second time while the checkpoint is being written.")
    test_kill_in_checkpoint: bool = option(False, "Send SIGUSR1, then SIGKILL this process while it writes its part "
                                                  "of the step checkpoint (a rank dying mid-write).")
    test_signal_stamp: str = option("", "A file to write time.time() into just before signalling.")

    @property
    def enabled(self) -> bool:
        return self.test_signal_at_step >= 0 or self.test_signal_at_inference_batch >= 0


class SignalAt(Callback):
    """Sends its own process a real SIGUSR1/SIGTERM at a chosen step or inference batch, as Slurm would."""

    name = "test_signal_at"
    Config = SignalAtConfig

    def __init__(self, config: SignalAtConfig) -> None:
        self.config = config
        self.inference_batches = 0

    def _fire(self, ctx) -> None:
        if ctx.rank != self.config.test_signal_rank:
            return
        signum = getattr(signal, self.config.test_signal_name)
        if self.config.test_kill_in_checkpoint:
            import safe_train.engine as engine_module

            def die(*args, **kwargs):
                self._stamp()
                os.kill(os.getpid(), signal.SIGKILL)

            engine_module.np.savez = die  # this rank's pending buffers: the middle of the checkpoint
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        self._stamp()
        os.kill(os.getpid(), signum)
        if self.config.test_signal_twice:
            import safe_train.engine as engine_module

            original = engine_module.atomic_save

            def save_with_second_signal(obj, path):
                os.kill(os.getpid(), signum)
                original(obj, path)

            engine_module.atomic_save = save_with_second_signal

    def _stamp(self) -> None:
        if self.config.test_signal_stamp:
            with open(self.config.test_signal_stamp, "w") as f:
                f.write(repr(time.time()))

    def on_step_end(self, ctx, step) -> None:
        if ctx.global_step == self.config.test_signal_at_step:
            self._fire(ctx)

    def on_inference_batch(self, ctx, pass_, sample_ids, features) -> None:
        self.inference_batches += 1
        if self.inference_batches == self.config.test_signal_at_inference_batch:
            self._fire(ctx)


CALLBACKS.register(SignalAt)
