"""``--record-similarity``: every sample's image-caption similarity from its own training step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from safe_train.flags import FlagConfig, option
from safe_train.interface import Callback, StepOutput, TrainContext
from safe_train.registry import CALLBACKS
from safe_train.state import DeviceRows


@dataclass
class SimilarityConfig(FlagConfig):
    group: ClassVar[str] = "safe-train: per-sample similarity"

    record_similarity: bool = option(False, "Record every sample's image-caption cosine similarity from its training "
                                     "step into the per-sample table (saved with checkpoints).")

    @property
    def enabled(self) -> bool:
        return self.record_similarity


@CALLBACKS.register
class SimilarityRecorder(Callback):
    """Records each sample's image-caption cosine similarity from the training step (no extra pass).

    Column ``train_similarity`` (float32, NaN until seen) and ``similarity_epoch`` hold the value from
    the last epoch the sample was trained on; they ride in checkpoints like all per-sample state.
    SafeCLIP's in-loop mode and detection read them; ``safe_train/similarity_mean`` is logged.
    """

    name = "record_similarity"
    Config = SimilarityConfig

    def __init__(self, config: SimilarityConfig | None = None) -> None:
        self.config = config or SimilarityConfig(record_similarity=True)

    #: Pending similarities move to the table once this many are buffered (bounds device memory).
    def setup(self, ctx: TrainContext) -> None:
        ctx.table.add_column("train_similarity", np.float32, np.nan)
        ctx.table.add_column("similarity_epoch", np.int32, -1)
        self._sum = 0.0
        self._count = 0
        self._pending = DeviceRows()  # steps not yet in the table (tagged with their epoch); see :meth:`flush`

    def on_epoch_start(self, ctx: TrainContext) -> None:
        self._sum, self._count = 0.0, 0

    def on_step_end(self, ctx: TrainContext, step: StepOutput) -> None:
        """Compute on the device and keep the result there: a host copy per step would stall the GPU."""
        image = step.features.get("image_features")
        text = step.features.get("text_features")
        if image is None or text is None:
            return
        similarity = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)
        self._pending.add(step.sample_ids.numpy(force=True), similarity, tag=ctx.epoch)
        if self._pending.full:
            self.flush(ctx)

    def flush(self, ctx: TrainContext) -> None:
        """One device-to-host copy of everything buffered, recorded step by step in the original order."""
        for ids, epoch, part in self._pending.drain():
            ctx.table.record("train_similarity", ids, part)
            ctx.table.record("similarity_epoch", ids, np.full(len(ids), epoch, np.int32))
            self._sum += float(part.sum())  # per step, as a float32 sum of that step's values
            self._count += len(part)

    def state_dict(self) -> dict[str, float]:
        """The epoch's running sum (a mid-epoch checkpoint keeps it; at an epoch end it is reset anyway).
        The engine flushes before it asks (``Callback.flush``)."""
        return {"sum": self._sum, "count": self._count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._sum, self._count = float(state.get("sum", 0.0)), int(state.get("count", 0))

    def on_epoch_end(self, ctx: TrainContext) -> None:
        if self._count:
            ctx.log_metric("similarity_mean_rank0" if ctx.distributed else "similarity_mean", self._sum / self._count)
