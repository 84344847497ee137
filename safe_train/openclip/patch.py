"""How safe-train runs OpenCLIP 3.3's own ``main``: a few of ``open_clip_train.main``'s module-level names are
replaced for the duration of a run (3.3 has no hooks or registries).

- ``parse_args``: then ``engine.on_parsed_args`` (our flags were parsed first);
- ``get_data``: the training set comes from the engine (:mod:`safe_train.data`: sample ids, defense
  views, selections); validation and ImageNet sets stay OpenCLIP's;
- ``train_one_epoch``: the engine's event-driven loop (whose step is :mod:`safe_train.openclip.step`);
- ``evaluate``: OpenCLIP's evaluation, then ``on_evaluate`` callbacks, without consuming the training
  RNG stream;
- ``torch.nn.parallel.DistributedDataParallel``: drops CUDA ``device_ids`` for CPU models (upstream
  passes them even on CPU, which crashes gloo runs).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from safe_train.openclip.rng import capture_rng_state, restore_rng_state
from safe_train.openclip.upstream import oc_data, oc_main

log = logging.getLogger(__name__)


def dataset_kind(args) -> str:
    """"csv", "webdataset" or "synthetic", resolved the way OpenCLIP resolves --dataset-type."""
    fn = oc_data.get_dataset_fn(args.train_data, args.dataset_type)
    return {oc_data.get_csv_dataset: "csv", oc_data.get_wds_dataset: "webdataset"}.get(fn, "synthetic")


class CpuSafeDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that ignores ``device_ids`` when the module lives on the CPU (gloo)."""

    def __init__(self, module: torch.nn.Module, device_ids=None, *args, **kwargs):
        first = next(module.parameters(), None)
        if first is not None and first.device.type == "cpu":
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


ENGINE_DATA_KINDS = ("csv", "webdataset")
"""Training data the engine loads itself (with sample ids, views and selections); synthetic stays OpenCLIP's."""


def engine_owns_train_data(args) -> bool:
    return bool(args.train_data) and dataset_kind(args) in ENGINE_DATA_KINDS


def engine_get_data(engine: Any, get_data_fn: Callable[..., dict], args, preprocess_fns, epoch: int = 0,
                    tokenizer=None) -> dict:
    """The evaluation sets from OpenCLIP's ``get_data_fn`` (which sees no ``--train-data``), the training set
    from ``engine``. Only when :func:`engine_owns_train_data`."""
    kind = dataset_kind(args)
    train_data = args.train_data
    args.train_data = None  # let OpenCLIP build only the evaluation sets
    try:
        data = get_data_fn(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
    finally:
        args.train_data = train_data
    data["train"] = engine.get_train_data(args, preprocess_fns, epoch, tokenizer, kind)
    return data


def engine_evaluate(engine: Any, evaluate_fn: Callable[..., Any], model, data, epoch: int, args, **kwargs) -> Any:
    """``evaluate_fn(model, data, epoch, args, **kwargs)`` without consuming the training RNG streams, then the
    engine's ``after_evaluate`` (the callbacks' ``on_evaluate``) with its metrics."""
    rng = capture_rng_state()
    try:
        metrics = evaluate_fn(model, data, epoch, args, **kwargs)
    finally:
        restore_rng_state(rng)
    engine.after_evaluate(epoch, metrics)
    return metrics


@contextlib.contextmanager
def patched_openclip(engine: Any) -> Iterator[None]:
    """Install ``engine``'s replacements into open_clip_train for the duration of a run.

    ``engine`` provides ``on_parsed_args(args)``, ``get_train_data(args, preprocess_fns, epoch, tokenizer,
    kind)``, ``train_one_epoch(...)`` with 3.3's ten arguments, and ``after_evaluate(epoch, metrics)``.
    """
    original_get_data = oc_main.get_data
    original_evaluate = oc_main.evaluate
    original_parse_args = oc_main.parse_args
    original_ddp = torch.nn.parallel.DistributedDataParallel

    def parse_args(argv):
        args = original_parse_args(argv)
        engine.on_parsed_args(args)
        return args

    def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
        if engine_owns_train_data(args):
            return engine_get_data(engine, original_get_data, args, preprocess_fns, epoch, tokenizer)
        return original_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)

    def evaluate(model, data, epoch, args, tb_writer=None, tokenizer=None):
        return engine_evaluate(engine, original_evaluate, model, data, epoch, args, tb_writer=tb_writer,
                               tokenizer=tokenizer)

    oc_main.parse_args = parse_args
    oc_main.get_data = get_data
    oc_main.train_one_epoch = engine.train_one_epoch
    oc_main.evaluate = evaluate
    torch.nn.parallel.DistributedDataParallel = CpuSafeDDP
    try:
        yield
    finally:
        oc_main.parse_args = original_parse_args
        oc_main.get_data = original_get_data
        oc_main.train_one_epoch = _ORIGINAL_TRAIN_ONE_EPOCH
        oc_main.evaluate = original_evaluate
        torch.nn.parallel.DistributedDataParallel = original_ddp


_ORIGINAL_TRAIN_ONE_EPOCH = oc_main.train_one_epoch


def run_openclip_main(argv: list[str]) -> int:
    """Run OpenCLIP's ``main``; its ``-1`` error return (which its ``__main__`` ignores) becomes 1."""
    result = oc_main.main(argv)
    return 1 if (isinstance(result, int) and result != 0) else 0
