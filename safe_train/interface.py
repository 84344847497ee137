"""The one interface every defense and callback implements.

Training is a sequence of named events on one state object (:class:`TrainContext`), in the spirit
of Lightning callbacks and Composer algorithms:

    on_train_start → [per epoch: plan_epoch → on_epoch_start →
        [per pass: (per step: forward → compute_loss → backward/step → on_step_end)] →
        flush → on_epoch_end] → on_evaluate (after OpenCLIP's evaluation) → state_dict/load_state_dict

A *defense* is a callback that may additionally (a) replace the loss of a step (``compute_loss``),
(b) run inference passes over data at epoch boundaries (``TrainPass(train=False)``), (c) choose which
samples an epoch trains on and with which loss (``plan_epoch`` returning passes with a
:class:`Selection` and a ``mode``), (d) ask the data pipeline for extra augmented views
(``sample_transform``), and (e) read every step's embeddings (``on_step_end``). Exactly one defense
runs; any number of callbacks compose with it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from safe_train.flags import FlagConfig
from safe_train.state import SampleTable, unique_ids

if TYPE_CHECKING:
    import argparse

SampleTransform = Callable[[Any, str, int], dict[str, torch.Tensor]]
"""(PIL image, caption, sample id) -> named tensors of one sample (e.g. image, text, image_aug)."""


@dataclass(frozen=True)
class Selection:
    """Which samples a pass reads: only ``ids`` (include) or all but ``ids`` (exclude).

    ``ids`` must be sorted, unique int64.
    """

    ids: np.ndarray
    exclude: bool = False

    def allows(self, sample_ids: np.ndarray) -> np.ndarray:
        """Boolean mask over ``sample_ids``."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)  # no copy for int64 input: called per sample
        if len(self.ids) == 0:
            hit = np.zeros(len(sample_ids), dtype=bool)
        else:
            pos = np.minimum(np.searchsorted(self.ids, sample_ids), len(self.ids) - 1)
            hit = self.ids[pos] == sample_ids
        return ~hit if self.exclude else hit

    @staticmethod
    def including(ids) -> Selection:
        """Only ``ids`` (sorted and de-duplicated by sorting: np.unique hashes int64, ~75x slower)."""
        return Selection(unique_ids(ids), exclude=False)

    @staticmethod
    def excluding(ids) -> Selection:
        """All but ``ids`` (see :meth:`including`)."""
        return Selection(unique_ids(ids), exclude=True)


@dataclass
class TrainPass:
    """One pass over (part of) the training data within an epoch.

    Attributes:
        name: shown in logs ("train", "risky", "safe", "similarity", ...).
        selection: None = every sample (minus the run's blocklist/dropped ids).
        mode: an opaque tag the defense reads in ``forward``/``compute_loss`` (e.g. "clip", "unimodal").
        train: False for an inference pass (eval mode, no grad, no optimizer step); the defense
            receives its batches in ``on_inference_batch``.
        lr_override: a constant learning rate for this pass (the scheduler is not consulted), e.g.
            SafeCLIP's small constant-LR multimodal warmup.
    """

    name: str = "train"
    selection: Selection | None = None
    mode: str = "default"
    train: bool = True
    lr_override: float | None = None


class HostLosses(Mapping[str, float]):
    """Loss terms as Python floats, converted on first read of each key.

    Reading a value waits for the device (a host-device sync), so the loop never converts on its own: a
    hook that only needs the values now and then pays for exactly those reads.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self._floats: dict[str, float] = {}

    def __getitem__(self, key: str) -> float:
        if key not in self._floats:
            self._floats[key] = float(self._tensors[key])
        return self._floats[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


@dataclass
class StepOutput:
    """What ``on_step_end`` sees: the batch, the detached features and the loss terms of one step.

    Everything stays where the step left it: ``features`` and ``loss_tensors`` are detached tensors on
    the run's device (0-dim for losses), ``sample_ids`` an int64 host tensor. ``losses`` reads the same
    terms as floats lazily (:class:`HostLosses`); each read is a host-device sync, so a hook that runs
    every step should keep device tensors (accumulate them, e.g. in a list or a preallocated buffer) and
    move them to the host when it logs or at the end of the epoch (:meth:`Callback.flush`).
    """

    pass_: TrainPass
    sample_ids: torch.Tensor
    features: dict[str, torch.Tensor]
    loss_tensors: dict[str, torch.Tensor]
    batch_index: int
    losses: Mapping[str, float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.losses = HostLosses(self.loss_tensors)


@dataclass
class TrainContext:
    """The one state object all events receive."""

    args: argparse.Namespace
    table: SampleTable
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: Any = None
    scheduler: Callable[[int], Any] | None = None
    tokenizer: Any = None
    preprocess_train: Any = None
    preprocess_val: Any = None
    tb_writer: Any = None
    epoch: int = 0
    global_step: int = 0
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    epoch_metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def run_dir(self) -> str | None:
        """This run's folder (``<log-root>/<name>``), where per-run reports go; None when logging is off."""
        base = getattr(self.args, "log_base_path", None)
        if base:
            return base
        checkpoint_path = getattr(self.args, "checkpoint_path", None)
        return os.path.dirname(checkpoint_path) if checkpoint_path else None

    def log_metric(self, name: str, value: float) -> None:
        """Queue a per-epoch scalar; logged (text, tensorboard, wandb) at the end of the epoch."""
        self.epoch_metrics[name] = float(value)


class Callback:
    """Base class: every hook is optional. Override what you need.

    A registered callback (``@CALLBACKS.register``) declares its flags as a typed ``Config``
    (:class:`~safe_train.flags.FlagConfig`) and is switched on when its config's ``enabled`` is true
    (e.g. ``--record-similarity``), so a plugin callback needs no change anywhere else.
    """

    #: Registry name, also the key of this callback's state in checkpoints.
    name: str = "callback"
    #: The typed config whose fields are this callback's flags (None: no flags).
    Config: ClassVar[type[FlagConfig] | None] = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this class's flags to the command line (default: one per field of ``Config``)."""
        if cls.Config is not None:
            cls.Config.add_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Callback | None:
        """The instance a run's parsed flags ask for, or None when its flags leave it off."""
        if cls.Config is None:
            return None
        config = cls.Config.from_args(args)
        return cls(config) if config.enabled else None

    def setup(self, ctx: TrainContext) -> None:
        """Before data loaders exist: declare table columns here."""

    def on_train_start(self, ctx: TrainContext) -> None:
        """Once, after model, optimizer, data and (on resume) restored state are ready."""

    def on_epoch_start(self, ctx: TrainContext) -> None:
        """Before the first pass of an epoch."""

    def on_step_end(self, ctx: TrainContext, step: StepOutput) -> None:
        """After every optimizer step; ``step.features`` and ``step.loss_tensors`` are detached device tensors.
        Avoid host conversions here (``float()``, ``.item()``, ``.cpu()``): each one stalls the GPU every step."""

    def on_inference_batch(self, ctx: TrainContext, pass_: TrainPass, sample_ids: torch.Tensor,
                           features: dict[str, torch.Tensor]) -> None:
        """For every batch of an inference pass (``TrainPass(train=False)``); ``features`` are detached device
        tensors, ``sample_ids`` a host tensor (as in :meth:`on_step_end`)."""

    def flush(self, ctx: TrainContext) -> None:
        """Move values kept on the device during steps (see :class:`StepOutput`) into ``ctx.table`` or this
        callback's host state. Called before the table is synced at the end of an epoch and before a step
        checkpoint is written (so ``state_dict`` and the table's pending records are complete)."""

    def on_epoch_end(self, ctx: TrainContext) -> None:
        """After the last pass of an epoch and after ``ctx.table.sync()``: identical on every rank."""

    def on_evaluate(self, ctx: TrainContext, metrics: dict[str, float]) -> None:
        """After OpenCLIP's evaluation of a completed epoch (rank 0 gets the metrics)."""

    def state_dict(self) -> dict[str, Any]:
        """Non-per-sample state to checkpoint (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class Defense(Callback):
    """A callback that owns the loss. ``--defense none`` is this class unchanged: plain OpenCLIP."""

    name = "none"
    #: Whether this defense needs per-sample tracking in the table (ids registered every epoch).
    needs_sample_tracking: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Defense:
        """The defense for ``--defense NAME`` (always built, whatever its flags)."""
        return cls(cls.Config.from_args(args)) if cls.Config is not None else cls()

    def sample_transform(self, ctx: TrainContext) -> SampleTransform | None:
        """The per-sample transform of the training pipeline; None = OpenCLIP's (image, text)."""
        return None

    def pass_transform(self, ctx: TrainContext, pass_: TrainPass) -> SampleTransform | None:
        """A cheaper transform for one pass that reads only some of ``sample_transform``'s outputs
        (e.g. one view instead of two); None = the run's transform."""
        return None

    def plan_epoch(self, ctx: TrainContext, epoch: int) -> list[TrainPass]:
        """The passes of ``epoch``, in order. Default: one training pass over all samples."""
        return [TrainPass()]

    def forward(self, ctx: TrainContext, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                pass_: TrainPass) -> dict[str, torch.Tensor]:
        """Model outputs for a batch; must contain ``logit_scale``. Default: OpenCLIP's forward."""
        return model(batch["image"], batch["text"])

    def compute_loss(self, ctx: TrainContext, features: dict[str, torch.Tensor], pass_: TrainPass,
                     base_loss: Callable[..., dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Named loss terms (summed into the total). Default: OpenCLIP's loss for the run's flags."""
        return base_loss(**features, output_dict=True)
