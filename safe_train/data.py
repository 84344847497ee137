"""Training data that carries each sample's stable id from its source to the loss.

Batches are dicts of tensors: ``image``, ``text`` (OpenCLIP's pair) plus whatever views a defense's
sample transform adds, and ``sample_id`` (int64). CSV samples are identified by their data row;
webdataset samples by a hash of shard name and ``__key__`` (see :mod:`safe_train.sample_ids`).

Unreadable samples and shards are never lost silently: they are skipped, logged (by shard and key for
webdataset) and counted in a :class:`SkipCounter` shared with the data-loader workers. A bad sample never
stops a run; data of which nothing can be read does, with one clear error. Batches carry a cursor
(:mod:`safe_train.resume`) so that a step checkpoint can resume the stream exactly.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, default_collate, get_worker_info

from safe_train import openclip as oc
from safe_train.attacks.datasets import IMAGE_EXTS as _IMAGE_EXTS
from safe_train.attacks.datasets import split_member_name
from safe_train.errors import DataError, SafeTrainError
from safe_train.interface import SampleTransform, Selection
from safe_train.resume import (
    RAW_INDEX,
    SKIPPED,
    AttachCursor,
    CountRawSamples,
    KeepFirstSelected,
    ResumableBatchSampler,
    ResumeSkip,
    StreamCursor,
    WorkerRngRestore,
    collate_with_cursor,
    fetch_batch,
)
from safe_train.sample_ids import webdataset_sample_id

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 16


class SkipCounter:
    """Process-shared counts of what the data could not deliver (works across forked data-loader workers).

    ``value`` is the number of lost samples: unreadable, without caption or image, or in a shard that could
    not be read (as many as sizes.json says it held). ``shards`` counts unreadable or truncated webdataset
    shards whose loss in samples is unknown (no sizes.json entry); their samples are not in ``value``.
    """

    def __init__(self) -> None:
        self._value = multiprocessing.Value("q", 0)
        self._shards = multiprocessing.Value("q", 0)

    def add(self, n: int = 1) -> None:
        with self._value.get_lock():
            self._value.value += n

    def add_shard(self, n: int = 1) -> None:
        with self._shards.get_lock():
            self._shards.value += n

    @property
    def value(self) -> int:
        return int(self._value.value)

    @property
    def shards(self) -> int:
        return int(self._shards.value)


class OpenClipTransform:
    """OpenCLIP's own per-sample processing: preprocess the image, tokenize the caption."""

    def __init__(self, preprocess: Any, tokenizer: Any) -> None:
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def __call__(self, image: Image.Image, caption: str, sample_id: int) -> dict[str, torch.Tensor]:
        return {"image": self.preprocess(image), "text": self.tokenizer([caption])[0]}


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------
def read_caption_csv(path: str, img_key: str, caption_key: str, sep: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read an OpenCLIP CSV; returns (ids, image paths, captions) of the usable rows.

    Rows with an empty caption or image path are skipped with a warning that counts them.
    """
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"training data file not found: {path}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(f"cannot parse {path} as a CSV with separator {sep!r}: {e}") from None
    missing = [k for k in (img_key, caption_key) if k not in df.columns]
    if missing:
        raise DataError(
            f"{path}: column(s) {missing} not found; columns are {list(df.columns)} "
            f"(choose them with --csv-img-key / --csv-caption-key, separator with --csv-separator)"
        )
    paths = df[img_key].to_numpy(dtype=object)
    captions = df[caption_key].to_numpy(dtype=object)
    usable = np.array([bool(str(c).strip()) and bool(str(p).strip()) for p, c in zip(paths, captions, strict=True)],
                      dtype=bool)
    n_bad = int((~usable).sum())
    if n_bad:
        rows = np.flatnonzero(~usable)[:10].tolist()
        log.warning(f"{path}: skipped {n_bad} row(s) with an empty caption or image path (data rows {rows}...)")
    if not usable.any():
        raise DataError(f"{path}: no row has both an image path and a caption")
    ids = np.flatnonzero(usable).astype(np.int64)
    return ids, paths[usable], captions[usable]


class IdCsvDataset(Dataset):
    """OpenCLIP's CsvDataset, plus the sample id and a skip-and-count policy for unreadable images."""

    def __init__(self, path: str, transform: SampleTransform, img_key: str, caption_key: str, sep: str,
                 skip_counter: SkipCounter | None = None) -> None:
        self.path = path
        self.ids, self.images, self.captions = read_caption_csv(path, img_key, caption_key, sep)
        self.transform = transform
        self.skip_counter = skip_counter
        self.rng_restore = WorkerRngRestore()
        self.with_cursor = False  # csv_loader's batches carry cursors; other users get plain samples

    def __len__(self) -> int:
        return len(self.ids)

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch (the DataLoader's batched fetch): placeholders for batches a resumed run already trained
        on, else the samples with the producing worker's cursor (:mod:`safe_train.resume`)."""
        if not self.with_cursor:
            return [self[i] for i in indices]
        return fetch_batch(self, indices, self.rng_restore)

    def positions(self, selection: Selection | None) -> np.ndarray:
        """Dataset positions of the samples a selection allows."""
        if selection is None:
            return np.arange(len(self.ids))
        return np.flatnonzero(selection.allows(self.ids))

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(MAX_CONSECUTIVE_BAD):
            pos = (index + attempt) % len(self.ids)
            try:
                sample = self.transform(Image.open(str(self.images[pos])), str(self.captions[pos]),
                                        int(self.ids[pos]))
            except (OSError, ValueError, SyntaxError) as e:
                log.warning(f"skipping unreadable sample (row {self.ids[pos]}, {self.images[pos]}): {e!r}")
                if self.skip_counter is not None:
                    self.skip_counter.add()
                continue
            sample["sample_id"] = int(self.ids[pos])
            return sample
        raise DataError(f"{self.path}: {MAX_CONSECUTIVE_BAD} consecutive unreadable images from row "
                        f"{self.ids[index]}; is the image root right?")


class IdSyntheticDataset(IdCsvDataset):
    """OpenCLIP's ``--dataset-type synthetic`` (one black image, one caption, ``--train-num-samples`` times)
    with the sample id = the index, so per-sample state, selections and resume work as for a CSV."""

    def __init__(self, num_samples: int, image_size: Any, transform: SampleTransform,
                 caption: str = "Dummy caption", skip_counter: SkipCounter | None = None) -> None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.path = "<synthetic>"
        self.ids = np.arange(num_samples, dtype=np.int64)
        self.image = Image.new("RGB", size)
        self.caption = caption
        self.transform = transform
        self.skip_counter = skip_counter
        self.rng_restore = WorkerRngRestore()
        self.with_cursor = False

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.transform(self.image, self.caption, int(self.ids[index]))
        sample["sample_id"] = int(self.ids[index])
        return sample


class EpochSeededSampler(Sampler[int]):
    """Deterministic, rank-consistent shuffling of a subset of positions.

    Every rank draws the same permutation from (seed, epoch, salt) and takes its own strided share, so all
    ranks run the same number of steps. What happens to the last partial global batch:

    - default: it is dropped, as OpenCLIP drops it (the permutation is truncated to whole global batches);
    - ``complete=True`` (inference passes that must see every sample): the permutation is padded with its
      own beginning to whole global batches (every position at least once, as DistributedSampler pads);
    - ``keep_partial=True`` (training passes over a selection): it is trained as a smaller batch, so every
      selected sample is trained exactly once per epoch and nothing is repeated. See :meth:`batch_sizes`
      for how the tail is laid out across ranks and ``--accum-freq`` micro-batches.
    """

    def __init__(self, positions: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, salt: int = 0, complete: bool = False, keep_partial: bool = False,
                 accum_freq: int = 1) -> None:
        if complete and keep_partial:
            raise ValueError("EpochSeededSampler: complete (pad) and keep_partial are exclusive")
        self.positions = np.asarray(positions, dtype=np.int64)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.salt = salt
        self.complete = complete
        self.keep_partial = keep_partial
        self.accum_freq = max(1, int(accum_freq))
        self.epoch = 0
        self._sizes: list[int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch_sizes(self) -> list[int]:
        """Rows of each of this rank's batches, the same list on every rank (so every rank takes the same
        number of steps and every step gathers equal row counts).

        With ``keep_partial`` each rank gets ``n // world_size`` of the ``n`` selected samples, in whole
        batches of ``batch_size`` and one smaller last optimizer step. That step's ``r`` rows per rank are
        split over the ``--accum-freq`` micro-batches as evenly as possible; when ``r`` is smaller than the
        number of micro-batches (only possible with ``--accum-freq`` > 1) they join the previous step,
        whose micro-batches then hold ``batch_size`` or ``batch_size + 1`` rows. So with one rank every
        selected sample is trained exactly once. With several ranks the last ``n % world_size`` samples of
        the epoch's permutation (fewer than the number of ranks, a different few every epoch) are not
        trained in that epoch: the feature gather of the losses needs equal row counts on every rank.
        """
        if not self.keep_partial:
            return [self.batch_size] * self.num_batches
        if self._sizes is not None:
            return list(self._sizes)
        per_rank = len(self.positions) // self.world_size
        capacity = self.batch_size * self.accum_freq  # rows of one optimizer step on one rank
        full, rest = divmod(per_rank, capacity)
        sizes = [self.batch_size] * (full * self.accum_freq)
        if rest >= self.accum_freq:
            sizes += _even_split(rest, self.accum_freq)
        elif rest and full:
            sizes[-self.accum_freq:] = _even_split(capacity + rest, self.accum_freq)
        elif rest:  # fewer rows per rank than micro-batches of one step: no step can be formed
            log.warning(f"a selection pass of {len(self.positions)} samples over {self.world_size} rank(s) cannot "
                        f"fill one step of {self.accum_freq} micro-batches (--accum-freq): it is not trained")
        self._sizes = sizes
        return list(sizes)

    @property
    def untrained(self) -> int:
        """Selected samples a ``keep_partial`` epoch leaves out: 0 on one rank, fewer than the ranks on several
        (more only when a rank's share cannot fill one step of ``--accum-freq`` micro-batches)."""
        return len(self.positions) - len(self) * self.world_size if self.keep_partial else 0

    @property
    def num_batches(self) -> int:
        global_batch = self.batch_size * self.world_size
        if self.keep_partial:
            return len(self.batch_sizes())
        if self.complete:
            return -(-len(self.positions) // global_batch)
        return len(self.positions) // global_batch

    def __len__(self) -> int:
        if self.keep_partial:
            return sum(self.batch_sizes())
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, self.salt])
        order = self.positions[rng.permutation(len(self.positions))]
        wanted = len(self) * self.world_size
        if wanted > len(order) and len(order):
            order = np.resize(order, wanted)  # repeats from the start
        order = order[:wanted]
        return iter(order[self.rank:: self.world_size].tolist())


def _even_split(rows: int, parts: int) -> list[int]:
    """``rows`` in ``parts`` sizes that differ by at most one, larger first."""
    base, extra = divmod(rows, parts)
    return [base + (i < extra) for i in range(parts)]


class PlannedBatches(Sampler[list[int]]):
    """Batches of the sampler's indices with the sizes its ``batch_sizes()`` plans (a partial last step)."""

    def __init__(self, sampler: EpochSeededSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return self.sampler.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        indices = iter(self.sampler)
        for size in self.sampler.batch_sizes():
            yield list(itertools.islice(indices, size))


@dataclass
class LoaderInfo:
    """OpenCLIP's DataInfo contract (``dataloader`` with ``num_batches``/``num_samples``, ``set_epoch``)."""

    dataloader: Any
    sampler: Any = None
    shared_epoch: Any = None
    skip_counter: SkipCounter | None = None
    needs_rank_sync: bool = False
    arm: Callable[[ResumeSkip, int], None] | None = None
    persistent_workers: bool = False  # workers (and their RNG) live from one epoch to the next
    workers: int = 0  # data-loader worker processes (0: batches are made in this process)
    transform: Any = None  # the per-sample transform; told the epoch when it has ``set_epoch`` (seeded views)

    def arm_resume(self, skip: ResumeSkip, epoch: int) -> None:
        """Make the next iterator skip what a step checkpoint's run already trained on (see
        :mod:`safe_train.resume`)."""
        if self.arm is None:
            raise DataError("this training data cannot resume in the middle of a pass")
        self.arm(skip, epoch)

    def disarm(self) -> None:
        """Once the armed iterator's workers exist: later iterators (new workers) start afresh."""
        if self.arm is not None:
            self.arm(ResumeSkip(), -1)

    def set_epoch(self, epoch: int) -> None:
        if self.shared_epoch is not None:
            self.shared_epoch.set_value(epoch)
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        if self.transform is not None and hasattr(self.transform, "set_epoch"):
            self.transform.set_epoch(epoch)


def csv_loader(args, transform: SampleTransform, *, selection: Selection | None = None,
               upstream_order: bool = False, salt: int = 0, skip_counter: SkipCounter | None = None,
               dataset: IdCsvDataset | None = None, complete: bool = False,
               keep_partial: bool = False) -> LoaderInfo:
    """A training loader over a CSV file.

    ``upstream_order=True`` reproduces OpenCLIP's sampling exactly (RandomSampler from the global
    RNG, or DistributedSampler), which is what ``--defense none`` uses; otherwise the order is an
    :class:`EpochSeededSampler` over the selected samples (``complete``: pad instead of dropping the
    last partial batch, for inference passes; ``keep_partial``: train it as a smaller batch, for training
    passes over a selection).
    """
    skip_counter = skip_counter or SkipCounter()
    if dataset is not None and dataset.transform is not transform:
        # loaders of one epoch are built before any is read: each keeps its own transform
        dataset = copy.copy(dataset)
        dataset.rng_restore = WorkerRngRestore()
    dataset = dataset or IdCsvDataset(args.train_data, transform, args.csv_img_key, args.csv_caption_key,
                                      args.csv_separator, skip_counter)
    dataset.transform = transform
    dataset.skip_counter = skip_counter
    dataset.with_cursor = True
    if upstream_order and selection is None and not complete:
        # what DataLoader(shuffle=True / sampler=DistributedSampler, drop_last=True) builds, same RNG draws
        sampler = (torch.utils.data.distributed.DistributedSampler(dataset) if args.distributed
                   else RandomSampler(dataset))
        num_samples = len(dataset)
    else:
        sampler = EpochSeededSampler(dataset.positions(selection), args.batch_size, args.rank, args.world_size,
                                     args.seed, salt, complete=complete, keep_partial=keep_partial,
                                     accum_freq=getattr(args, "accum_freq", 1))
        num_samples = len(sampler.positions)
    planned = PlannedBatches(sampler) if keep_partial else None
    batches = ResumableBatchSampler(sampler, args.batch_size, drop_last=True, inner=planned)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=args.workers, pin_memory=True,
                        collate_fn=collate_with_cursor)
    loader.num_samples = num_samples
    loader.num_batches = len(loader)

    def arm(skip: ResumeSkip, epoch: int) -> None:
        batches.skip = skip.batches
        dataset.rng_restore.arm(skip.worker_rng)

    return LoaderInfo(loader, sampler=sampler, skip_counter=skip_counter, arm=arm, workers=args.workers,
                      transform=transform)


# ---------------------------------------------------------------------------------------------
# webdataset
# ---------------------------------------------------------------------------------------------
IMAGE_EXTS = _IMAGE_EXTS  # OpenCLIP's rename(image="jpg;png;jpeg;webp"): the first present is the image
WARN_FIRST = 20  # warnings of one kind logged in full per process ...
WARN_EVERY = 1000  # ... then one summary line every this many


def _where(rank: int | None = None) -> str:
    """The process a message comes from (every data-loader worker reads its own shards)."""
    info = get_worker_info()
    who = f"data-loader worker {info.id}" if info is not None else "the data loader"
    return who if rank is None else f"{who} of rank {rank}"


class WarningLimiter:
    """Logs the first ``first`` warnings of each kind in full, then one summary every ``every``.

    A broken dataset must not bury the log under hundreds of thousands of lines. Each worker process holds
    its own copy, so the limits apply per worker.
    """

    def __init__(self, first: int = WARN_FIRST, every: int = WARN_EVERY) -> None:
        self.first = first
        self.every = every
        self.counts: dict[str, int] = {}

    def warn(self, kind: str, message: str) -> None:
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n <= self.first:
            log.warning(message)
            if n == self.first:
                log.warning(f"{_where()}: further warnings of kind '{kind}' are summarised every {self.every}")
        elif n % self.every == 0:
            log.warning(f"{_where()}: {n} warnings of kind '{kind}' so far; latest: {message}")


class CountingHandler:
    """Counts and logs every lost webdataset sample, and stops a stream that yields nothing usable.

    (``with_epoch`` restarts an exhausted pipeline and resampled shards never run out, so a shard set where
    every sample fails would otherwise spin forever.) Calling it with an exception makes it a webdataset
    ``handler=``.
    """

    max_consecutive = 1000

    def __init__(self, counter: SkipCounter, warnings: WarningLimiter | None = None) -> None:
        self.counter = counter
        self.warnings = warnings or WarningLimiter()
        self.consecutive = 0

    def __call__(self, exn: Exception) -> bool:
        self.lost("unreadable sample", f"skipping unreadable webdataset sample: {exn!r}")
        return True

    def lost(self, kind: str, message: str) -> None:
        """One sample lost: count it, warn (rate-limited), stop after too many in a row."""
        self.warnings.warn(kind, message)
        self.counter.add()
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise DataError(f"{self.consecutive} consecutive webdataset samples could not be used ({_where()}); "
                            f"last: {message}")

    def success(self) -> None:
        self.consecutive = 0


def _member_key(name: str) -> tuple[str | None, str | None]:
    """(sample key, lower-cased extension) of a tar member as webdataset groups it; (None, None) to skip it."""
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None, None  # webdataset's metadata members
    return split_member_name(name)


def _tar_samples(stream: Any, url: str) -> Iterator[dict]:
    """One shard's samples: consecutive members sharing a key, as OpenCLIP's ``group_by_keys_nothrow``
    groups them (a repeated extension starts a new sample), but never merged across two shards."""
    tar = tarfile.open(fileobj=stream, mode="r|*")
    current: dict | None = None
    for member in tar:
        if not member.isreg():
            continue
        key, ext = _member_key(member.name)
        if key is None:
            continue
        if current is None or key != current["__key__"] or ext in current:
            if current is not None and not current.get("__bad__"):
                yield current  # complete before the next member is read: a fault there cannot lose it
            current = {"__key__": key, "__url__": url}
        current[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]  # a regular member has a file
        tar.members = []  # a stream's member list would grow with the shard
    if current is not None and not current.get("__bad__"):
        yield current


def _describe(error: BaseException) -> str:
    """``Type: message``, without the in-memory file PIL names in place of the sample."""
    return f"{type(error).__name__}: " + re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the image data", str(error))


def _listing(failures: dict[str, str], limit: int = 4) -> str:
    """``url (cause), ...`` for the first ``limit`` failures, then how many more."""
    items = [f"{url} ({cause})" for url, cause in list(failures.items())[:limit]]
    more = len(failures) - limit
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")


class ShardReader(oc.wds.PipelineStage):
    """Shard urls → samples (replaces OpenCLIP's ``tarfile_to_samples_nothrow``), every shard fault counted.

    OpenCLIP's reader only logs a missing, unreadable or truncated shard and moves on; here each one is named
    in a warning and counted in the :class:`SkipCounter`: as the samples sizes.json gives the shard minus
    those read before the fault (a shard that ends early without an error is caught this way too). When
    sizes.json does not give the shard's size, the loss in samples is unknown and the shard is counted in
    ``SkipCounter.shards`` instead. Samples are counted each time a pass tries to read them.
    ``max_consecutive`` shards in a row without a sample stop the run with a :class:`DataError` (resampled
    shards never end a pass, so a pass-level check alone would not fire).
    """

    max_consecutive = 100

    def __init__(self, counter: SkipCounter, sizes: dict[str, int], warnings: WarningLimiter) -> None:
        self.counter = counter
        self.sizes = sizes
        self.warnings = warnings
        self.empty_in_a_row = 0
        self.empty_streak: dict[str, str] = {}  # the first shards of the current streak, for the message
        self.pass_shards = 0
        self.pass_samples = 0
        self.pass_failures: dict[str, str] = {}

    def run(self, src: Iterator[dict]) -> Iterator[dict]:
        self.pass_shards, self.pass_samples, self.pass_failures = 0, 0, {}
        for item in src:
            yield from self._read(item["url"])

    def _read(self, url: str) -> Iterator[dict]:
        self.pass_shards += 1
        read = 0
        error: Exception | None = None
        try:
            stream = oc.wds.gopen(url)
        except Exception as e:  # any reason a shard cannot be opened is a lost shard
            error = e
        else:
            try:
                for sample in _tar_samples(stream, url):
                    read += 1
                    self.pass_samples += 1
                    yield sample
            except Exception as e:  # not a tar, truncated, I/O error, bad compression, ...
                error = e
            finally:
                with contextlib.suppress(Exception):
                    stream.close()
        self._account(url, read, error)

    def _account(self, url: str, read: int, error: Exception | None) -> None:
        expected = self.sizes.get(url)
        if error is not None and read == 0:
            self.pass_failures[url] = _describe(error)
        if read:
            self.empty_in_a_row, self.empty_streak = 0, {}
        else:
            self.empty_in_a_row += 1
            if len(self.empty_streak) < 4:
                self.empty_streak[url] = _describe(error) if error is not None else "no sample in it"
        if error is not None:
            after = f" after {read} sample(s)" if read else ""
            if expected is not None:
                lost = max(expected - read, 0)
                self.counter.add(lost)
                message = (f"skipping webdataset shard {url}: {_describe(error)}{after}; {lost} of its {expected} "
                           f"samples (sizes.json) lost")
            else:
                self.counter.add_shard()
                message = (f"skipping webdataset shard {url}: {_describe(error)}{after}; samples lost: unknown "
                           f"(no sizes.json entry), counted as a skipped shard")
            self.warnings.warn("unreadable shard", message)
        elif expected is not None and read < expected:
            self.counter.add(expected - read)
            self.warnings.warn("unreadable shard", f"webdataset shard {url} ended after {read} of its {expected} "
                                                   f"samples (sizes.json): {expected - read} lost (truncated?)")
        if self.empty_in_a_row >= self.max_consecutive:
            raise DataError(f"{self.empty_in_a_row} webdataset shards in a row gave no sample ({_where()}), "
                            f"starting with {_listing(self.empty_streak)}")

    def describe_pass(self) -> str:
        """Why a pass over this worker's shards gave nothing, for the error message."""
        if self.pass_shards and len(self.pass_failures) >= self.pass_shards:
            return f"none of its {self.pass_shards} shard(s) could be read: {_listing(self.pass_failures)}"
        unreadable = f" ({_listing(self.pass_failures)} unreadable)" if self.pass_failures else ""
        return (f"its {self.pass_shards} shard(s){unreadable} gave {self.pass_samples} sample(s) and none of them "
                f"was usable or they were too few for one batch (see the warnings above)")


class RequireCaptionAndImage(oc.wds.PipelineStage):
    """Keeps the samples with a ``.txt`` caption and an image, as OpenCLIP's ``filter_no_caption_or_no_image``
    does, but counts each dropped one and names it by shard and key (OpenCLIP drops them silently)."""

    def __init__(self, handler: CountingHandler) -> None:
        self.handler = handler

    def run(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            missing = [what for what, present in (("caption (.txt)", "txt" in sample),
                                                  ("image (.jpg/.png/.jpeg/.webp)",
                                                   any(ext in sample for ext in IMAGE_EXTS)))
                       if not present]
            if missing:
                if sample.get(SKIPPED):  # counted by the run that trained past it
                    continue
                self.handler.lost("sample without caption or image",
                                  f"skipping webdataset sample {sample['__key__']!r} of {sample['__url__']}: "
                                  f"no {' and no '.join(missing)}")
                continue
            yield sample


_ID_KEY = "__sample_id__"  # dunder keys pass through webdataset's decoder untouched


def attach_id(sample: dict) -> dict:
    sample[_ID_KEY] = webdataset_sample_id(sample["__url__"], sample["__key__"])
    return sample


class _Selected:
    def __init__(self, selection: Selection) -> None:
        self.selection = selection

    def __call__(self, sample: dict) -> bool:
        return bool(self.selection.allows(np.array([sample[_ID_KEY]]))[0])


class ApplyTransform:
    """``wds.map`` stage of a pipeline that decoded and renamed (``image``, ``text``) before it."""

    def __init__(self, transform: SampleTransform, handler: CountingHandler) -> None:
        self.transform = transform
        self.handler = handler

    def __call__(self, sample: dict) -> dict:
        out = self.transform(sample["image"], sample["text"], sample[_ID_KEY])
        out["sample_id"] = sample[_ID_KEY]
        self.handler.success()
        return out


class PrepareSamples(oc.wds.PipelineStage):
    """Decode (``pilrgb``), take the image and caption as OpenCLIP's ``rename`` does, apply the transform.

    One stage instead of webdataset's decode/rename/map so that a sample that fails is named by shard and key
    in the warning (webdataset's handlers see only the exception, which names a ``BytesIO``).
    """

    def __init__(self, transform: SampleTransform, handler: CountingHandler) -> None:
        self.transform = transform
        self.handler = handler

    def run(self, src: Iterator[dict]) -> Iterator[dict]:
        decoder = oc.wds.autodecode.Decoder([oc.wds.autodecode.imagehandler("pilrgb")])
        for sample in src:
            try:
                decoded = decoder(sample)
                image = next(decoded[ext] for ext in IMAGE_EXTS if ext in decoded)
                out = self.transform(image, decoded["txt"], sample[_ID_KEY])
            except SafeTrainError:
                raise
            except Exception as e:  # a corrupt image, a bad caption encoding, ...
                self.handler.lost("unreadable sample", f"skipping unreadable webdataset sample {sample['__key__']!r} "
                                                       f"of {sample['__url__']}: {_describe(e)}")
                continue
            out["sample_id"] = sample[_ID_KEY]
            out["__key__"] = sample["__key__"]  # as webdataset's map stage added it
            if RAW_INDEX in sample:
                out[RAW_INDEX] = sample[RAW_INDEX]
            self.handler.success()
            yield out


class _RequireBatches(oc.wds.PipelineStage):
    """A pass over the worker's shards that yields no batch is an error, not a reason to start another pass
    (``with_epoch`` would restart it forever)."""

    def __init__(self, reader: ShardReader, batch_size: int, rank: int) -> None:
        self.reader = reader
        self.batch_size = batch_size
        self.rank = rank

    def run(self, src: Iterator[Any]) -> Iterator[Any]:
        batches = 0
        for batch in src:
            batches += 1
            yield batch
        if not batches:
            raise DataError(f"no training batch of {self.batch_size} could be read from the webdataset "
                            f"({_where(self.rank)}): {self.reader.describe_pass()}")


def _is_local(url: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", url) is None  # no pipe:, http://, file:, s3:// ...


def shard_sizes(urls: list[str]) -> dict[str, int]:
    """url → sample count, from the sizes.json next to each shard (OpenCLIP's format, keyed by file name).

    A missing, unreadable or malformed sizes.json gives no entries (with a warning for the latter two).
    """
    tables: dict[str, dict[str, int]] = {}
    sizes: dict[str, int] = {}
    for url in urls:
        folder = os.path.dirname(url)
        if folder not in tables:
            tables[folder] = _read_sizes(os.path.join(folder, "sizes.json")) if _is_local(url) else {}
        n = tables[folder].get(os.path.basename(url))
        if n is not None:
            sizes[url] = n
    return sizes


def _read_sizes(path: str) -> dict[str, int]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return {str(k): int(v) for k, v in json.load(f).items()}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        log.warning(f"ignoring {path}: {_describe(e)}; lost samples of unreadable shards cannot be counted")
        return {}


def _require_some_shard(urls: list[str]) -> None:
    """Local shards of which not one exists: stop before any worker starts (stops at the first one found)."""
    if not urls or not all(_is_local(u) for u in urls):
        return
    if any(os.path.exists(u) for u in urls):
        return
    more = f" and {len(urls) - 4} more" if len(urls) > 4 else ""
    raise DataError(f"none of the {len(urls)} training shard(s) exists: {', '.join(urls[:4])}{more}")


def _worker_message(message: str) -> str:
    """The original message of a :class:`DataError` that PyTorch re-raised from a worker (with the worker's
    traceback folded into the message); other messages unchanged."""
    if "Original Traceback" not in message:
        return message
    prefix = f"{DataError.__module__}.{DataError.__qualname__}: "
    for line in reversed(message.strip().splitlines()):
        if line.startswith(prefix):
            return line[len(prefix):]
    return message


class _WdsLoader(oc.wds.WebLoader):
    """WebLoader whose data errors from worker processes keep their one-line message."""

    def __iter__(self) -> Iterator[Any]:
        return self._clean_errors(super().__iter__())

    @staticmethod
    def _clean_errors(batches: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from batches
        except DataError as e:
            raise DataError(_worker_message(str(e))) from None


class _FullBatches(oc.wds.PipelineStage):
    """``wds.batched(n, partial=False)`` without its read-ahead: a batch leaves as soon as it is full.

    webdataset's batcher pulls (and so decodes and augments) the next batch's first sample before it
    yields; that sample's augmentation would then draw from the RNG before the step that a mid-epoch
    checkpoint records, and a resumed run could not repeat it.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def run(self, src):
        yield from _collated_batches(src, self.batch_size, [])


def _collated_batches(src, batch_size: int, tail: list):
    """Full batches of ``src`` as soon as each is full; what is left over ends up in ``tail``."""
    for sample in src:
        tail.append(sample)
        if len(tail) == batch_size:
            yield default_collate(tail)
            tail.clear()


class _PaddedBatches(oc.wds.PipelineStage):
    """Batches of exactly ``batch_size``; a stream's last partial batch is completed with its first samples.

    Used for selection passes, whose per-worker sample counts are not known in advance: nothing
    selected is dropped, and at most ``batch_size - 1`` samples per worker are repeated. The padding
    samples are kept raw by :class:`~safe_train.resume.KeepFirstSelected` and prepared at the end, so a
    run resumed in the middle of the pass pads exactly as the uninterrupted one.
    """

    def __init__(self, batch_size: int, cursor: StreamCursor, prepare: PrepareSamples) -> None:
        self.batch_size = batch_size
        self.cursor = cursor
        self.prepare = prepare

    def run(self, src):
        batch: list = []
        yield from _collated_batches(src, self.batch_size, batch)
        if batch:
            need = self.batch_size - len(batch)
            raw = [dict(s) for s in self.cursor.first_raw * self.batch_size]
            padding = list(itertools.islice(self.prepare.run(iter(raw)), need))
            padding = (padding * self.batch_size)[:need] if padding else (batch * self.batch_size)[:need]
            if RAW_INDEX in batch[0]:
                padding = [{**p, RAW_INDEX: 0} for p in padding]  # padding does not advance the stream
            yield default_collate(batch + padding)


class _SeededSampleShuffle(oc.wds.PipelineStage):
    """Sample-level shuffle buffer seeded by (seed, epoch, rank, worker): reproducible on resume."""

    def __init__(self, bufsize: int, initial: int, seed: int, rank: int, epoch: oc.SharedEpoch) -> None:
        self.bufsize, self.initial, self.seed, self.rank, self.epoch = bufsize, initial, seed, rank, epoch

    def run(self, src):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(f"{self.seed}/{self.epoch.get_value()}/{self.rank}/{worker}")
        return oc.wds_shuffle(src, self.bufsize, self.initial, rng)


def wds_loader(args, transform: SampleTransform, *, is_train: bool = True, epoch: int = 0,
               selection: Selection | None = None, expected_samples: int | None = None,
               skip_counter: SkipCounter | None = None, persistent: bool = True) -> LoaderInfo:
    """OpenCLIP's webdataset pipeline with sample ids, an optional selection filter and counted skips.

    ``expected_samples`` (default: the dataset size) sets the epoch length. With a selection, each
    worker reads its shards once and the per-rank sample counts differ; the training loop then keeps
    every rank stepping until each has delivered its whole share (``needs_rank_sync``).
    """
    wds = oc.wds
    skip_counter = skip_counter or SkipCounter()
    input_shards = args.train_data
    urls = oc.expand_urls(input_shards)[0]
    _require_some_shard(urls)
    warnings = WarningLimiter()
    handler = CountingHandler(skip_counter, warnings)
    reader = ShardReader(skip_counter, shard_sizes(urls), warnings)
    resampled = getattr(args, "dataset_resampled", False)
    num_shards = None
    if args.train_num_samples is not None:
        num_samples = args.train_num_samples
    else:
        num_samples, num_shards = oc.get_dataset_size(input_shards)
        if not num_samples:
            raise DataError("the number of training samples is unknown: pass --train-num-samples or put a "
                            "sizes.json next to the shards")
    if expected_samples is not None:
        num_samples = expected_samples
    shared_epoch = oc.SharedEpoch(epoch=epoch)
    cursor = StreamCursor(shared_epoch)
    if resampled:
        pipeline = [oc.ResampledShards2(input_shards, weights=args.train_data_upsampling_factors,
                                        deterministic=True, epoch=shared_epoch)]
    else:
        pipeline = [
            wds.SimpleShardList(input_shards),
            oc.detshuffle2(bufsize=oc.SHARD_SHUFFLE_SIZE, initial=oc.SHARD_SHUFFLE_INITIAL, seed=args.seed,
                           epoch=shared_epoch),
            wds.split_by_node,
            wds.split_by_worker,
        ]
    pipeline.extend([
        reader,
        _SeededSampleShuffle(oc.SAMPLE_SHUFFLE_SIZE, oc.SAMPLE_SHUFFLE_INITIAL, args.seed, args.rank, shared_epoch),
        # a resumed run drops what it trained on here, before anything is decoded (selection passes keep
        # it marked until their padding is remembered)
        CountRawSamples(cursor, keep_skipped=selection is not None),
        RequireCaptionAndImage(handler),
        wds.map(attach_id),
    ])
    prepare = PrepareSamples(transform, handler)
    if selection is not None:
        pipeline.extend([wds.select(_Selected(selection)), KeepFirstSelected(cursor, args.batch_size)])
    pipeline.extend([
        prepare,
        _FullBatches(args.batch_size) if selection is None else _PaddedBatches(args.batch_size, cursor, prepare),
    ])
    if selection is None:
        pipeline.append(_RequireBatches(reader, args.batch_size, args.rank))
    pipeline.append(AttachCursor(cursor))
    dataset = wds.DataPipeline(*pipeline)
    if not resampled:
        num_shards = num_shards or len(oc.expand_urls(input_shards)[0])
        if num_shards < args.workers * args.world_size:
            raise DataError(f"{num_shards} shards cannot feed {args.workers} workers x {args.world_size} ranks: "
                            f"use fewer --workers or more shards")
    global_batch = args.batch_size * args.world_size
    num_batches = math.ceil(num_samples / global_batch)
    num_workers = max(1, args.workers)
    num_worker_batches = math.ceil(num_batches / num_workers)
    num_batches = num_worker_batches * num_workers
    num_samples = num_batches * global_batch
    if selection is None:
        dataset = dataset.with_epoch(num_worker_batches)
    # with a selection each worker reads its shards once; the batch count above is an estimate
    loader = _WdsLoader(dataset, batch_size=None, shuffle=False, num_workers=args.workers,
                        persistent_workers=persistent and args.workers > 0)
    loader.num_batches = num_batches
    loader.num_samples = num_samples
    return LoaderInfo(loader, shared_epoch=shared_epoch, skip_counter=skip_counter,
                      needs_rank_sync=selection is not None, arm=cursor.arm,
                      persistent_workers=persistent and args.workers > 0, workers=args.workers,
                      transform=transform)
