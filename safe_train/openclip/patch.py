"""How safe-train runs OpenCLIP 3.3's own ``main``: a few of ``open_clip_train.main``'s module-level names are
replaced for the duration of a run (3.3 has no hooks or registries).

- ``parse_args``: then ``engine.on_parsed_args`` (our flags were parsed first);
- ``get_data``: the training set comes from the engine (:mod:`safe_train.data`: sample ids, defense
  views, selections); validation and ImageNet sets stay OpenCLIP's;
- ``train_one_epoch``: the engine's event-driven loop (whose step is :mod:`safe_train.openclip.step`);
- ``evaluate``: OpenCLIP's evaluation, then ``on_evaluate`` callbacks, without consuming the training
  RNG stream;
- ``torch.nn.parallel.DistributedDataParallel``: drops CUDA ``device_ids`` for CPU models (upstream
  passes them even on CPU, which crashes gloo runs);
- checkpoints (:mod:`safe_train.checkpoint`): ``main``'s ``torch.save`` becomes the engine's atomic,
  stamped save; ``pt_load`` loads with ``weights_only=True`` and one clear error;
  ``--resume latest`` picks the engine's newest *consistent* checkpoint (epoch or step), through
  ``get_latest_checkpoint`` and, with ``--save-most-recent`` (where 3.3 only looks at
  ``epoch_latest.pt``), through the file name ``LATEST_CHECKPOINT_NAME`` until the resume is done.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from safe_train.checkpoint import load_checkpoint_file
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


class _TorchWithCheckpointSave:
    """``torch`` as open_clip_train.main sees it during a run: everything is torch's, except ``save``."""

    def __init__(self, save: Callable[[Any, str], None]) -> None:
        self._save = save

    def save(self, obj: Any, path: str, *args: Any, **kwargs: Any) -> None:
        self._save(obj, path)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


NO_CONSISTENT_CHECKPOINT = "no-consistent-checkpoint.pt"


def _launch_rank() -> int:
    """This process's rank before torch.distributed starts (torchrun's RANK, srun's SLURM_PROCID)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def process_group_timeout(init_process_group: Callable[..., Any], minutes: float) -> Callable[..., Any]:
    """``init_process_group`` with a default ``timeout``: OpenCLIP passes none, so NCCL's watchdog would abort
    a rank that waits 10 minutes while rank 0 alone works (global detection scoring, a checkpoint)."""
    timeout = datetime.timedelta(minutes=minutes)

    def init_with_timeout(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", timeout)
        return init_process_group(*args, **kwargs)

    return init_with_timeout


@contextlib.contextmanager
def patched_openclip(engine: Any) -> Iterator[None]:
    """Install ``engine``'s replacements into open_clip_train for the duration of a run.

    ``engine`` provides ``on_parsed_args(args)``, ``get_train_data(args, preprocess_fns, epoch, tokenizer,
    kind)``, ``train_one_epoch(...)`` with 3.3's ten arguments, ``after_evaluate(epoch, metrics)``,
    ``save_checkpoint_file(obj, path)`` and ``resolve_latest(checkpoint_dir, set_aside)``; optionally
    ``dist_timeout`` (a timedelta), the process group's timeout.
    """
    original_get_data = oc_main.get_data
    original_evaluate = oc_main.evaluate
    original_parse_args = oc_main.parse_args
    original_ddp = torch.nn.parallel.DistributedDataParallel
    original_torch = oc_main.torch
    original_pt_load = oc_main.pt_load
    original_get_latest = oc_main.get_latest_checkpoint
    original_latest_name = oc_main.LATEST_CHECKPOINT_NAME

    def parse_args(argv):
        args = original_parse_args(argv)
        engine.on_parsed_args(args)
        # only rank 0 resolves (OpenCLIP broadcasts its choice), so no rank races rank 0's set-aside renames
        if (args.resume == "latest" and args.save_most_recent and args.name and args.remote_sync is None
                and _launch_rank() == 0):
            checkpoint_dir = os.path.join(args.logs, args.name, "checkpoints")
            chosen = engine.resolve_latest(checkpoint_dir, set_aside=True)
            oc_main.LATEST_CHECKPOINT_NAME = (os.path.relpath(chosen, checkpoint_dir) if chosen
                                              else NO_CONSISTENT_CHECKPOINT)
        return args

    def get_latest_checkpoint(path, remote):
        if remote:
            return original_get_latest(path, remote)
        return engine.resolve_latest(path, set_aside=True)

    def pt_load(file_path, map_location=None):
        if "://" in str(file_path):
            return original_pt_load(file_path, map_location=map_location)
        return load_checkpoint_file(file_path, map_location=map_location)

    def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
        oc_main.LATEST_CHECKPOINT_NAME = original_latest_name  # the resume is resolved; saves use the real name
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
    oc_main.torch = _TorchWithCheckpointSave(engine.save_checkpoint_file)
    oc_main.pt_load = pt_load
    oc_main.get_latest_checkpoint = get_latest_checkpoint
    torch.nn.parallel.DistributedDataParallel = CpuSafeDDP
    original_init_process_group = torch.distributed.init_process_group
    dist_timeout = getattr(engine, "dist_timeout", None)
    if dist_timeout is not None:
        torch.distributed.init_process_group = process_group_timeout(
            original_init_process_group, dist_timeout.total_seconds() / 60)
    try:
        yield
    finally:
        oc_main.torch = original_torch
        oc_main.pt_load = original_pt_load
        oc_main.get_latest_checkpoint = original_get_latest
        oc_main.LATEST_CHECKPOINT_NAME = original_latest_name
        oc_main.parse_args = original_parse_args
        oc_main.get_data = original_get_data
        oc_main.train_one_epoch = _ORIGINAL_TRAIN_ONE_EPOCH
        oc_main.evaluate = original_evaluate
        torch.nn.parallel.DistributedDataParallel = original_ddp
        torch.distributed.init_process_group = original_init_process_group


_ORIGINAL_TRAIN_ONE_EPOCH = oc_main.train_one_epoch


def run_openclip_main(argv: list[str]) -> int:
    """Run OpenCLIP's ``main``; its ``-1`` error return (which its ``__main__`` ignores) becomes 1."""
    result = oc_main.main(argv)
    return 1 if (isinstance(result, int) and result != 0) else 0
