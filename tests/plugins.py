"""Test-only defenses that exercise the engine's extension points (importing registers them)."""

from __future__ import annotations

import numpy as np

from safe_train.interface import Defense, Selection, TrainPass
from safe_train.registry import DEFENSES


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
