"""Exact mid-epoch resume: skip what a run already trained on, without decoding it, and give every
data-loader worker the RNG state it had.

A loader's order is a function of (seed, epoch, rank, worker) and of the RNG state when its iterator
is created; the engine restores that state before re-creating the iterator. What is left is the
position inside the stream and the RNG of the workers that augment samples:

- every batch carries a *cursor*: the id of the worker that produced it, how many raw samples that
  worker had pulled (webdataset), and the worker's RNG state right after the batch;
- on resume, batches already trained on come back as cheap placeholders (:data:`CONSUMED`) in the
  positions they had, so the DataLoader hands every later batch to the same worker as before; each
  worker restores its saved RNG state before its first real batch. Placeholders are dropped by the
  engine (:func:`is_consumed`).

With ``--workers 0`` the samples are produced in the main process, whose RNG the engine restores
itself; cursors then carry no RNG state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import BatchSampler, Sampler, default_collate, get_worker_info

from safe_train import openclip as oc

CONSUMED = "__consumed__"
RAW_INDEX = "__raw_index__"  # a webdataset sample's position in its worker's stream (batchers read ahead)
SKIPPED = "__resume_skipped__"  # trained on before the checkpoint: only remembered as padding, never decoded
CURSOR = "__cursor__"
_SAMPLE_CURSOR = "__sample_cursor__"


def capture_worker_rng() -> dict[str, Any]:
    """This process's python, numpy and torch CPU RNG states as plain data."""
    return oc.capture_rng_state()


def restore_worker_rng(state: dict[str, Any]) -> None:
    oc.restore_rng_state(state)


def worker_id() -> int | None:
    info = get_worker_info()
    return None if info is None else info.id


def is_consumed(batch: Any) -> bool:
    return isinstance(batch, dict) and CONSUMED in batch


@dataclass
class ResumeSkip:
    """What the next iterator of one loader must skip: ``batches`` already trained on, the raw
    samples each worker had pulled (webdataset), and each worker's RNG state after its last one."""

    batches: int = 0
    worker_raw: dict[int, int] = field(default_factory=dict)
    worker_batches: dict[int, int] = field(default_factory=dict)
    worker_rng: dict[int, dict[str, Any]] = field(default_factory=dict)


class WorkerRngRestore:
    """Restores a worker's saved RNG state once, before the worker's first real batch.

    Lives on the dataset, so every worker gets its own copy when the iterator starts it.
    """

    def __init__(self) -> None:
        self.states: dict[int, dict[str, Any]] = {}
        self._done = False

    def arm(self, states: dict[int, dict[str, Any]]) -> None:
        self.states = dict(states)
        self._done = False

    def before_first_batch(self) -> None:
        if self._done:
            return
        self._done = True
        wid = worker_id()
        if wid is not None and wid in self.states:
            restore_worker_rng(self.states[wid])


class _ConsumedIndices(list):
    """A batch of indices the run already trained on: fetched as a placeholder, never decoded."""


class ResumableBatchSampler(Sampler[list[int]]):
    """``BatchSampler(sampler, batch_size, drop_last)`` whose next iterator marks its first
    ``skip`` batches as consumed. Draws from the RNG exactly as the plain BatchSampler does.

    ``inner`` replaces the plain BatchSampler with another batch sampler over ``sampler`` (e.g. one with
    a smaller last batch, :class:`safe_train.data.PlannedBatches`); skipping counts its batches the same way.
    """

    def __init__(self, sampler: Sampler[int] | Any, batch_size: int, drop_last: bool,
                 inner: Sampler[list[int]] | None = None) -> None:
        self.inner = inner if inner is not None else BatchSampler(sampler, batch_size, drop_last)
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.skip = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for j, indices in enumerate(self.inner):
            yield _ConsumedIndices(indices) if j < skip else indices


def fetch_batch(dataset: Any, indices: list[int], rng_restore: WorkerRngRestore) -> list[dict[str, Any]]:
    """A map-style dataset's ``__getitems__``: a placeholder for consumed batches, else the samples,
    the first of which carries the cursor (worker id and RNG state after the batch)."""
    if isinstance(indices, _ConsumedIndices):
        return [{CONSUMED: True}]
    rng_restore.before_first_batch()
    samples = [dataset[i] for i in indices]
    wid = worker_id()
    if samples:
        samples[0][_SAMPLE_CURSOR] = {"worker": -1 if wid is None else wid, "raw": 0,
                                      "rng": None if wid is None else capture_worker_rng()}
    return samples


def collate_with_cursor(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate``, keeping the first sample's cursor (and passing placeholders through)."""
    if samples and CONSUMED in samples[0]:
        return {CONSUMED: True}
    cursor = samples[0].pop(_SAMPLE_CURSOR, None) if samples else None
    for sample in samples[1:]:
        sample.pop(_SAMPLE_CURSOR, None)
    batch = default_collate(samples)
    if cursor is not None:
        batch[CURSOR] = cursor
    return batch


# ---------------------------------------------------------------------------------------------
# webdataset
# ---------------------------------------------------------------------------------------------
class StreamCursor:
    """Per-worker position in a webdataset stream, shared by :class:`CountRawSamples` (before decode)
    and :class:`AttachCursor` (after batching). Counts restart with each epoch."""

    def __init__(self, epoch: Any) -> None:
        self.shared_epoch = epoch
        self.epoch = -1
        self.raw = 0
        self.skip = ResumeSkip()
        self.skip_epoch = -1
        self.rng_restore = WorkerRngRestore()
        self.first_raw: list[dict[str, Any]] = []

    def arm(self, skip: ResumeSkip, epoch: int) -> None:
        """Make the next iterator of ``epoch`` skip what ``skip`` says (workers copy this when they start)."""
        self.skip, self.skip_epoch = skip, epoch
        self.rng_restore.arm(skip.worker_rng)

    def _current_epoch(self) -> int:
        return int(self.shared_epoch.get_value())

    def start(self) -> None:
        epoch = self._current_epoch()
        if epoch != self.epoch:
            self.epoch, self.raw = epoch, 0

    def _skipping(self) -> bool:
        return self.skip_epoch == self.epoch

    @staticmethod
    def _key() -> int:
        wid = worker_id()
        return -1 if wid is None else wid  # -1: the main process (--workers 0), as cursors record it

    def raw_to_skip(self) -> int:
        return self.skip.worker_raw.get(self._key(), 0) if self._skipping() else 0

    def batches_to_skip(self) -> int:
        return self.skip.worker_batches.get(self._key(), 0) if self._skipping() else 0


class CountRawSamples(oc.wds.PipelineStage):
    """Counts the raw samples a worker pulls (before decoding) and drops those already trained on; with
    ``keep_skipped`` they go on, marked, so that :class:`KeepFirstSelected` still sees them."""

    def __init__(self, cursor: StreamCursor, keep_skipped: bool = False) -> None:
        self.cursor = cursor
        self.keep_skipped = keep_skipped

    def run(self, src):
        cursor = self.cursor
        cursor.start()
        skip = cursor.raw_to_skip()
        for sample in src:
            cursor.raw += 1
            if cursor.raw <= skip:
                if self.keep_skipped:
                    sample[SKIPPED] = True
                    yield sample
                continue
            sample[RAW_INDEX] = cursor.raw
            yield sample


class KeepFirstSelected(oc.wds.PipelineStage):
    """Remembers a pass's first ``n`` selected raw samples (padding for its last partial batch), then drops
    the samples a resumed run already trained on. The padding is decoded at the end of the pass in every
    run, so a resumed run pads with the same samples and the same augmentations."""

    def __init__(self, cursor: StreamCursor, n: int) -> None:
        self.cursor = cursor
        self.n = n

    def run(self, src):
        self.cursor.first_raw = []
        for sample in src:
            if len(self.cursor.first_raw) < self.n:
                self.cursor.first_raw.append({k: v for k, v in sample.items() if k not in (SKIPPED, RAW_INDEX)})
            if sample.get(SKIPPED):
                continue
            yield sample


class AttachCursor(oc.wds.PipelineStage):
    """Last stage: placeholders for the worker's consumed batches, then its batches with cursors."""

    def __init__(self, cursor: StreamCursor) -> None:
        self.cursor = cursor
        self._emitted_epoch = -1

    def run(self, src):
        cursor = self.cursor
        cursor.start()
        if self._emitted_epoch != cursor.epoch:  # with_epoch restarts the pipeline within an epoch
            self._emitted_epoch = cursor.epoch
            if cursor._skipping():  # now, not after the placeholders: a worker whose share was all consumed
                cursor.rng_restore.before_first_batch()  # never gets past them, yet its next epoch needs its RNG
            for _ in range(cursor.batches_to_skip()):
                yield {CONSUMED: True}
        wid = worker_id()
        for batch in src:
            raw = batch.pop(RAW_INDEX, None)  # the batch's last raw sample, not what the batcher read ahead
            batch[CURSOR] = {"worker": -1 if wid is None else wid,
                             "raw": int(max(raw)) if raw is not None and len(raw) else cursor.raw,
                             "rng": None if wid is None else capture_worker_rng()}
            yield batch


class PassPosition:
    """Where the engine is inside one pass: batches and optimizer steps done in the pass, batches
    consumed from the current iterator, how many times the pass restarted its loader (rank
    equalisation), and every worker's cursor."""

    def __init__(self) -> None:
        self.total = 0
        self.steps = 0
        self.batches = 0
        self.restarts = 0
        self.worker_raw: dict[int, int] = {}
        self.worker_batches: dict[int, int] = {}
        self.worker_rng: dict[int, dict[str, Any]] = {}

    def new_iterator(self, keep_worker_rng: bool) -> None:
        """A fresh iterator: counts restart; persistent workers keep their RNG, new workers are reseeded."""
        self.batches = 0
        self.worker_raw, self.worker_batches = {}, {}
        if not keep_worker_rng:
            self.worker_rng = {}

    def consumed(self, batch: dict[str, Any]) -> None:
        self.total += 1
        self.batches += 1
        cursor = batch.pop(CURSOR, None)
        if cursor is None:
            return
        wid = int(cursor["worker"])
        self.worker_raw[wid] = int(cursor["raw"])
        self.worker_batches[wid] = self.worker_batches.get(wid, 0) + 1
        if cursor["rng"] is not None:
            self.worker_rng[wid] = cursor["rng"]

    def skip(self) -> ResumeSkip:
        return ResumeSkip(self.batches, dict(self.worker_raw), dict(self.worker_batches), dict(self.worker_rng))

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "steps": self.steps, "batches": self.batches, "restarts": self.restarts,
                "worker_raw": dict(self.worker_raw), "worker_batches": dict(self.worker_batches),
                "worker_rng": dict(self.worker_rng)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PassPosition:
        position = cls()
        for key in ("total", "steps", "batches", "restarts"):
            setattr(position, key, int(state[key]))
        position.worker_raw = {int(k): int(v) for k, v in state["worker_raw"].items()}
        position.worker_batches = {int(k): int(v) for k, v in state["worker_batches"].items()}
        position.worker_rng = {int(k): v for k, v in state["worker_rng"].items()}
        return position
