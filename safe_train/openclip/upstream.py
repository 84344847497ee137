"""Every name safe-train takes from ``open_clip_train`` 3.3 (and OpenCLIP's training-time helpers), in one
place, with a check that fails loudly, naming the symbol, when an upstream release renames or reshapes one.

No other module of safe-train imports ``open_clip_train``: they use :mod:`safe_train.openclip`.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect

import webdataset as wds
from open_clip import get_input_dtype
from open_clip_train import data as oc_data
from open_clip_train import main as oc_main
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

from safe_train.errors import SafeTrainError

SHARD_SHUFFLE_SIZE = oc_data._SHARD_SHUFFLE_SIZE
SHARD_SHUFFLE_INITIAL = oc_data._SHARD_SHUFFLE_INITIAL
SAMPLE_SHUFFLE_SIZE = oc_data._SAMPLE_SHUFFLE_SIZE
SAMPLE_SHUFFLE_INITIAL = oc_data._SAMPLE_SHUFFLE_INITIAL
LATEST_CHECKPOINT_NAME = oc_main.LATEST_CHECKPOINT_NAME

#: symbol → the parameter names we call it with (None: any non-callable value, or a callable we only wrap).
REQUIRED_SYMBOLS: dict[str, tuple[str, ...] | None] = {
    "open_clip_train.main.main": ("args",),
    "open_clip_train.main.parse_args": ("args",),
    "open_clip_train.main.get_data": ("args", "preprocess_fns", "epoch", "tokenizer"),
    "open_clip_train.main.train_one_epoch": ("model", "data", "loss", "epoch", "optimizer", "scaler", "scheduler",
                                             "dist_model", "args", "tb_writer"),
    "open_clip_train.main.evaluate": ("model", "data", "epoch", "args", "tb_writer", "tokenizer"),
    "open_clip_train.main.create_loss": ("args",),
    "open_clip_train.main.LATEST_CHECKPOINT_NAME": None,
    "open_clip_train.main.pt_load": ("file_path", "map_location"),
    "open_clip_train.main.get_latest_checkpoint": ("path", "remote"),
    "open_clip_train.main.torch": None,
    "open_clip_train.data.get_dataset_fn": ("data_path", "dataset_type"),
    "open_clip_train.data.get_csv_dataset": None,
    "open_clip_train.data.get_wds_dataset": None,
    "open_clip_train.data.ResampledShards2": None,
    "open_clip_train.data.SharedEpoch": None,
    "open_clip_train.data.detshuffle2": None,
    "open_clip_train.data.expand_urls": None,
    "open_clip_train.data.filter_no_caption_or_no_image": None,
    "open_clip_train.data.get_dataset_size": None,
    "open_clip_train.data.tarfile_to_samples_nothrow": None,
    "open_clip_train.data._SHARD_SHUFFLE_SIZE": None,
    "open_clip_train.data._SHARD_SHUFFLE_INITIAL": None,
    "open_clip_train.data._SAMPLE_SHUFFLE_SIZE": None,
    "open_clip_train.data._SAMPLE_SHUFFLE_INITIAL": None,
    "open_clip_train.params.parse_args": ("args",),
    "open_clip_train.precision.get_autocast": ("precision", "device_type"),
    "open_clip_train.train.unwrap_model": ("model",),
    "open_clip.get_input_dtype": ("precision",),
    "webdataset.filters._shuffle": None,
}


class UpstreamChanged(SafeTrainError, ImportError):
    """An open_clip_train name safe-train relies on is gone or has another signature."""


def resolve(symbol: str):
    """``"package.module.name"`` → the object (the longest importable module prefix, then attributes)."""
    parts = symbol.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(symbol)


class _ParserCaptured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


@functools.cache
def upstream_option_strings() -> frozenset[str]:
    """Every option string of open_clip_train's parser (3.3 builds it inside ``parse_args`` and does not
    expose it, so the parser is caught when ``parse_args`` is about to use it)."""
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _ParserCaptured(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        upstream_parse_args([])
    except _ParserCaptured as caught:
        return frozenset(opt for action in caught.parser._actions for opt in action.option_strings)
    finally:
        argparse.ArgumentParser.parse_args = original
    raise UpstreamChanged("open_clip_train.params.parse_args did not build an argparse parser")


def check_upstream() -> None:
    """Raise :class:`UpstreamChanged` naming every required symbol that is missing or reshaped."""
    problems = []
    for symbol, params in REQUIRED_SYMBOLS.items():
        try:
            obj = resolve(symbol)
        except (ImportError, AttributeError):
            problems.append(f"{symbol} is missing")
            continue
        if params is None:
            continue
        try:
            names = tuple(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            problems.append(f"{symbol} has no inspectable signature")
            continue
        if names[:len(params)] != params:
            problems.append(f"{symbol} takes {names}, safe-train calls it with {params}")
    if problems:
        raise UpstreamChanged("open_clip_train changed under safe-train (built for 3.3): " + "; ".join(problems))


__all__ = [
    "LATEST_CHECKPOINT_NAME", "REQUIRED_SYMBOLS", "ResampledShards2", "SAMPLE_SHUFFLE_INITIAL",
    "SAMPLE_SHUFFLE_SIZE", "SHARD_SHUFFLE_INITIAL", "SHARD_SHUFFLE_SIZE", "SharedEpoch", "check_upstream",
    "detshuffle2", "expand_urls", "filter_no_caption_or_no_image", "get_autocast", "get_dataset_size",
    "get_input_dtype", "oc_data", "oc_main", "resolve", "tarfile_to_samples_nothrow", "unwrap_model",
    "upstream_option_strings", "upstream_parse_args", "wds", "wds_shuffle",
]
