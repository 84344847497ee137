"""Built-in callbacks and the callback registry (timm-style: a name → class dict)."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from safe_train.interface import Callback, StepOutput, TrainContext

CALLBACKS: dict[str, type[Callback]] = {}


def register_callback(cls: type[Callback]) -> type[Callback]:
    """Class decorator: make a callback available by its ``name``."""
    if cls.name in CALLBACKS:
        raise ValueError(f"callback {cls.name!r} registered twice")
    CALLBACKS[cls.name] = cls
    return cls


@register_callback
class SimilarityRecorder(Callback):
    """Records each sample's image-caption cosine similarity from the training step (no extra pass).

    Column ``train_similarity`` (float32, NaN until seen) and ``similarity_epoch`` hold the value from
    the last epoch the sample was trained on; they ride in checkpoints like all per-sample state.
    SafeCLIP's in-loop mode and detection read them; ``safe_train/similarity_mean`` is logged.
    """

    name = "record_similarity"

    def setup(self, ctx: TrainContext) -> None:
        ctx.table.add_column("train_similarity", np.float32, np.nan)
        ctx.table.add_column("similarity_epoch", np.int32, -1)
        self._sum = 0.0
        self._count = 0

    def on_epoch_start(self, ctx: TrainContext) -> None:
        self._sum, self._count = 0.0, 0

    def on_step_end(self, ctx: TrainContext, step: StepOutput) -> None:
        image = step.features.get("image_features")
        text = step.features.get("text_features")
        if image is None or text is None:
            return
        similarity = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1).cpu().numpy()
        ids = step.sample_ids.cpu().numpy()
        ctx.table.record("train_similarity", ids, similarity)
        ctx.table.record("similarity_epoch", ids, np.full(len(ids), ctx.epoch, np.int32))
        self._sum += float(similarity.sum())
        self._count += len(similarity)

    def on_epoch_end(self, ctx: TrainContext) -> None:
        if self._count:
            ctx.log_metric("similarity_mean_rank0" if ctx.distributed else "similarity_mean", self._sum / self._count)


def add_callback_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("safe-train callbacks")
    group.add_argument("--record-similarity", action="store_true",
                       help="Record every sample's image-caption cosine similarity from its training step into the "
                            "per-sample table (saved with checkpoints).")


def create_callbacks(args: argparse.Namespace) -> list[Callback]:
    callbacks: list[Callback] = []
    if getattr(args, "record_similarity", False):
        callbacks.append(SimilarityRecorder())
    return callbacks
