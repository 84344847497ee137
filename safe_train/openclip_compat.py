"""The one module that touches OpenCLIP's trainer internals (``open_clip_train`` 3.3).

open_clip_train has no hooks or registries, so safe-train runs OpenCLIP's own ``main`` with a few
of its module-level names replaced for the duration of the run:

- ``open_clip_train.main.parse_args``: also accepts nothing unknown (our flags are parsed first);
- ``open_clip_train.main.get_data``: the training set comes from :mod:`safe_train.data` (sample ids,
  defense views, selections); validation and ImageNet sets stay OpenCLIP's;
- ``open_clip_train.main.train_one_epoch``: the event-driven loop of :mod:`safe_train.engine`;
- ``open_clip_train.main.evaluate``: OpenCLIP's evaluation, then ``on_evaluate`` callbacks, without
  consuming the training RNG stream;
- ``torch.nn.parallel.DistributedDataParallel``: drops CUDA ``device_ids`` for CPU models (upstream
  passes them even on CPU, which crashes gloo runs).

Porting to OpenCLIP 4 means changing this file. Everything else imports upstream names from here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import webdataset as wds
from open_clip import get_input_dtype
from open_clip_train import data as _oc_data
from open_clip_train import main as _oc_main
from open_clip_train.data import (
    ResampledShards2,
    SharedEpoch,
    detshuffle2,
    expand_urls,
    filter_no_caption_or_no_image,
    get_dataset_size,
    tarfile_to_samples_nothrow,
)
from open_clip_train.params import parse_args as upstream_parse_args
from open_clip_train.precision import get_autocast
from open_clip_train.train import unwrap_model
from webdataset.filters import _shuffle as wds_shuffle

__all__ = [
    "ResampledShards2", "SharedEpoch", "detshuffle2", "expand_urls", "filter_no_caption_or_no_image",
    "get_dataset_size", "tarfile_to_samples_nothrow", "wds", "wds_shuffle", "get_autocast", "get_input_dtype",
    "unwrap_model", "upstream_parse_args", "LATEST_CHECKPOINT_NAME", "run_openclip_main", "patched_openclip",
]

SHARD_SHUFFLE_SIZE = _oc_data._SHARD_SHUFFLE_SIZE
SHARD_SHUFFLE_INITIAL = _oc_data._SHARD_SHUFFLE_INITIAL
SAMPLE_SHUFFLE_SIZE = _oc_data._SAMPLE_SHUFFLE_SIZE
SAMPLE_SHUFFLE_INITIAL = _oc_data._SAMPLE_SHUFFLE_INITIAL
LATEST_CHECKPOINT_NAME = _oc_main.LATEST_CHECKPOINT_NAME

log = logging.getLogger(__name__)


def dataset_kind(args) -> str:
    """"csv", "webdataset" or "synthetic", resolved the way OpenCLIP resolves --dataset-type."""
    fn = _oc_data.get_dataset_fn(args.train_data, args.dataset_type)
    return {_oc_data.get_csv_dataset: "csv", _oc_data.get_wds_dataset: "webdataset"}.get(fn, "synthetic")


class _CpuSafeDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that ignores ``device_ids`` when the module lives on the CPU (gloo)."""

    def __init__(self, module: torch.nn.Module, device_ids=None, *args, **kwargs):
        first = next(module.parameters(), None)
        if first is not None and first.device.type == "cpu":
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


@contextlib.contextmanager
def patched_openclip(
    *,
    get_train_data: Callable[..., Any],
    train_one_epoch: Callable[..., Any],
    after_evaluate: Callable[[Any, dict], None],
    on_parsed_args: Callable[[Any], None],
) -> Iterator[None]:
    """Install safe-train's replacements into open_clip_train for the duration of a run."""
    original_get_data = _oc_main.get_data
    original_evaluate = _oc_main.evaluate
    original_parse_args = _oc_main.parse_args
    original_ddp = torch.nn.parallel.DistributedDataParallel

    def parse_args(argv):
        args = original_parse_args(argv)
        on_parsed_args(args)
        return args

    def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
        train_data = args.train_data
        kind = dataset_kind(args) if (train_data or args.dataset_type == "synthetic") else None
        if kind in ("csv", "webdataset"):
            args.train_data = None  # let OpenCLIP build only the evaluation sets
            try:
                data = original_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
            finally:
                args.train_data = train_data
            data["train"] = get_train_data(args, preprocess_fns, epoch, tokenizer, kind)
            return data
        return original_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)

    def evaluate(model, data, epoch, args, tb_writer=None, tokenizer=None):
        rng = capture_rng_state()
        try:
            metrics = original_evaluate(model, data, epoch, args, tb_writer=tb_writer, tokenizer=tokenizer)
        finally:
            restore_rng_state(rng)
        after_evaluate(epoch, metrics)
        return metrics

    _oc_main.parse_args = parse_args
    _oc_main.get_data = get_data
    _oc_main.train_one_epoch = train_one_epoch
    _oc_main.evaluate = evaluate
    torch.nn.parallel.DistributedDataParallel = _CpuSafeDDP
    try:
        yield
    finally:
        _oc_main.parse_args = original_parse_args
        _oc_main.get_data = original_get_data
        _oc_main.train_one_epoch = _ORIGINAL_TRAIN_ONE_EPOCH
        _oc_main.evaluate = original_evaluate
        torch.nn.parallel.DistributedDataParallel = original_ddp


_ORIGINAL_TRAIN_ONE_EPOCH = _oc_main.train_one_epoch


def run_openclip_main(argv: list[str]) -> int:
    """Run OpenCLIP's ``main``; its ``-1`` error return (which its ``__main__`` ignores) becomes 1."""
    result = _oc_main.main(argv)
    return 1 if (isinstance(result, int) and result != 0) else 0


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from (python, numpy, torch CPU and CUDA), as plain Python data.

    Plain types (bytes, ints, lists) so the state can be all-gathered and loaded with weights_only=True.
    """
    import random

    import numpy as np

    kind, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [kind, key.astype(np.int64).tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in state["cuda"]])
