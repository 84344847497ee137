"""Training data that carries each sample's stable id from its source to the loss.

Batches are dicts of tensors: ``image``, ``text`` (OpenCLIP's pair) plus whatever views a defense's
sample transform adds, and ``sample_id`` (int64). CSV samples are identified by their data row;
webdataset samples by a hash of shard name and ``__key__`` (see :mod:`safe_train.sample_ids`).

Unreadable samples never stop a run and are never lost silently: they are skipped, logged and
counted in a :class:`SkipCounter` shared with the data-loader workers.
"""

from __future__ import annotations

import copy
import logging
import math
import multiprocessing
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from safe_train import openclip as oc
from safe_train.errors import DataError
from safe_train.interface import SampleTransform, Selection
from safe_train.sample_ids import webdataset_sample_id

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 16


class SkipCounter:
    """A process-shared count of skipped samples (works across forked data-loader workers)."""

    def __init__(self) -> None:
        self._value = multiprocessing.Value("q", 0)

    def add(self, n: int = 1) -> None:
        with self._value.get_lock():
            self._value.value += n

    @property
    def value(self) -> int:
        return int(self._value.value)


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

    def __len__(self) -> int:
        return len(self.ids)

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


class EpochSeededSampler(Sampler[int]):
    """Deterministic, rank-consistent shuffling of a subset of positions.

    Every rank draws the same permutation from (seed, epoch, salt), truncates it to whole global
    batches and takes its own strided share, so all ranks run the same number of steps.
    ``complete=True`` instead pads the permutation with its own beginning to whole global batches
    (every position at least once, as DistributedSampler pads): for inference passes that must
    see every sample.
    """

    def __init__(self, positions: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, salt: int = 0, complete: bool = False) -> None:
        self.positions = np.asarray(positions, dtype=np.int64)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.salt = salt
        self.complete = complete
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_batches(self) -> int:
        global_batch = self.batch_size * self.world_size
        if self.complete:
            return -(-len(self.positions) // global_batch)
        return len(self.positions) // global_batch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, self.salt])
        order = self.positions[rng.permutation(len(self.positions))]
        wanted = self.num_batches * self.batch_size * self.world_size
        if wanted > len(order) and len(order):
            order = np.resize(order, wanted)  # repeats from the start
        order = order[:wanted]
        return iter(order[self.rank:: self.world_size].tolist())


@dataclass
class LoaderInfo:
    """OpenCLIP's DataInfo contract (``dataloader`` with ``num_batches``/``num_samples``, ``set_epoch``)."""

    dataloader: Any
    sampler: Any = None
    shared_epoch: Any = None
    skip_counter: SkipCounter | None = None
    needs_rank_sync: bool = False

    def set_epoch(self, epoch: int) -> None:
        if self.shared_epoch is not None:
            self.shared_epoch.set_value(epoch)
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def csv_loader(args, transform: SampleTransform, *, selection: Selection | None = None,
               upstream_order: bool = False, salt: int = 0, skip_counter: SkipCounter | None = None,
               dataset: IdCsvDataset | None = None, complete: bool = False) -> LoaderInfo:
    """A training loader over a CSV file.

    ``upstream_order=True`` reproduces OpenCLIP's sampling exactly (RandomSampler from the global
    RNG, or DistributedSampler), which is what ``--defense none`` uses; otherwise the order is an
    :class:`EpochSeededSampler` over the selected samples (``complete``: pad instead of dropping the
    last partial batch, for inference passes).
    """
    skip_counter = skip_counter or SkipCounter()
    if dataset is not None and dataset.transform is not transform:
        # loaders of one epoch are built before any is read: each keeps its own transform
        dataset = copy.copy(dataset)
    dataset = dataset or IdCsvDataset(args.train_data, transform, args.csv_img_key, args.csv_caption_key,
                                      args.csv_separator, skip_counter)
    dataset.transform = transform
    dataset.skip_counter = skip_counter
    if upstream_order and selection is None and not complete:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset) if args.distributed else None
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                            num_workers=args.workers, pin_memory=True, drop_last=True, collate_fn=default_collate)
        num_samples = len(dataset)
    else:
        sampler = EpochSeededSampler(dataset.positions(selection), args.batch_size, args.rank, args.world_size,
                                     args.seed, salt, complete=complete)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                            pin_memory=True, drop_last=True, collate_fn=default_collate)
        num_samples = len(sampler.positions)
    loader.num_samples = num_samples
    loader.num_batches = len(loader)
    return LoaderInfo(loader, sampler=sampler, skip_counter=skip_counter)


# ---------------------------------------------------------------------------------------------
# webdataset
# ---------------------------------------------------------------------------------------------
class CountingHandler:
    """webdataset error handler: log, count, continue — but stop a stream that yields nothing usable.

    (``with_epoch`` restarts an exhausted pipeline, so a shard set where every sample fails would
    otherwise spin forever.)
    """

    max_consecutive = 1000

    def __init__(self, counter: SkipCounter) -> None:
        self.counter = counter
        self.consecutive = 0

    def __call__(self, exn: Exception) -> bool:
        log.warning(f"skipping unreadable webdataset sample: {exn!r}")
        self.counter.add()
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise DataError(f"{self.consecutive} consecutive webdataset samples failed to load; last error: {exn!r}")
        return True

    def success(self) -> None:
        self.consecutive = 0


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
    def __init__(self, transform: SampleTransform, handler: CountingHandler) -> None:
        self.transform = transform
        self.handler = handler

    def __call__(self, sample: dict) -> dict:
        out = self.transform(sample["image"], sample["text"], sample[_ID_KEY])
        out["sample_id"] = sample[_ID_KEY]
        self.handler.success()
        return out


class _PaddedBatches(oc.wds.PipelineStage):
    """Batches of exactly ``batch_size``; a stream's last partial batch is completed with its first samples.

    Used for selection passes, whose per-worker sample counts are not known in advance: nothing
    selected is dropped, and at most ``batch_size - 1`` samples per worker are repeated.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def run(self, src):
        first: list = []
        batch: list = []
        for sample in src:
            if len(first) < self.batch_size:
                first.append(sample)
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield default_collate(batch)
                batch = []
        if batch:
            padding = (first * self.batch_size)[: self.batch_size - len(batch)]
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
    handler = CountingHandler(skip_counter)
    input_shards = args.train_data
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
        oc.tarfile_to_samples_nothrow,
        _SeededSampleShuffle(oc.SAMPLE_SHUFFLE_SIZE, oc.SAMPLE_SHUFFLE_INITIAL, args.seed, args.rank, shared_epoch),
        wds.select(oc.filter_no_caption_or_no_image),
        wds.map(attach_id),
    ])
    if selection is not None:
        pipeline.append(wds.select(_Selected(selection)))
    pipeline.extend([
        wds.decode("pilrgb", handler=handler),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map(ApplyTransform(transform, handler), handler=handler),
        wds.batched(args.batch_size, partial=False, collation_fn=default_collate) if selection is None
        else _PaddedBatches(args.batch_size),
    ])
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
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=args.workers,
                           persistent_workers=persistent and args.workers > 0)
    loader.num_batches = num_batches
    loader.num_samples = num_samples
    return LoaderInfo(loader, shared_epoch=shared_epoch, skip_counter=skip_counter,
                      needs_rank_sync=selection is not None)
