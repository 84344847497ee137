"""What a fork of ``open_clip_train`` 3.3 calls once patched with ``patches/open_clip_train-3.3/``.

``python -m safe_train.main`` runs the installed open_clip_train with a few of its names replaced for the
duration of the run (:func:`safe_train.openclip.patched_openclip`). A lab that trains with its own fork
of open_clip_train applies the patch series instead: a few lines in the fork's ``main.py``, ``train.py``
and ``data.py`` call the functions below, which do exactly what ``patched_openclip`` does:

- ``main()`` starts with :func:`activate` (safe-train's flags are parsed and the run's
  :class:`~safe_train.engine.Engine` is built; OpenCLIP's parser gets the rest) and calls
  :func:`on_parsed_args` after OpenCLIP parsed its flags;
- ``get_data()`` hands over to :func:`get_data` when :func:`owns_train_data`: the fork's own ``get_data``
  still builds the evaluation sets, the training set comes from the engine (sample ids, views, passes);
- ``train_one_epoch()`` returns the engine's epoch when :func:`active_engine` is set;
- ``main()``'s per-epoch ``evaluate`` goes through :func:`evaluate` (no training RNG consumed; then the
  callbacks' ``on_evaluate``);
- ``python -m open_clip_train.main`` exits with :func:`run`'s status (OpenCLIP's ``-1`` error return is
  exit 1, bad safe-train input one line on stderr and exit 2).

Everything stays on safe-train's side so that each hunk is a line or a few and a fork that changed the
code around them still takes the series with ``git apply -3``. Nothing in safe-train imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from safe_train.engine import Engine
from safe_train.main import build_engine, exit_status, print_help
from safe_train.openclip.patch import CpuSafeDDP, engine_evaluate, engine_get_data, engine_owns_train_data

__all__ = ["activate", "active_engine", "on_parsed_args", "owns_train_data", "get_data", "evaluate", "run"]

_engine: Engine | None = None


def activate(argv: list[str]) -> list[str]:
    """Build this run's engine from the full command line; return the flags left for OpenCLIP's parser.

    ``--help`` prints safe-train's flags, then OpenCLIP's, and exits. Also registers safe-train's model
    configs (``st-tiny-vit``) and lets DDP wrap CPU models (gloo) without CUDA ``device_ids``.
    """
    global _engine
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        raise SystemExit(0)
    _engine = None
    _engine, upstream_argv = build_engine(argv)  # also registers safe-train's model configs
    torch.nn.parallel.DistributedDataParallel = CpuSafeDDP
    return upstream_argv


def active_engine() -> Engine | None:
    """The engine :func:`activate` built in this process, or None (the fork then trains as upstream)."""
    return _engine


def on_parsed_args(args) -> None:
    """Right after OpenCLIP parsed its flags."""
    if _engine is not None:
        _engine.on_parsed_args(args)


def owns_train_data(args) -> bool:
    """Whether the engine builds this run's training set: CSV and webdataset (synthetic stays OpenCLIP's)."""
    return _engine is not None and engine_owns_train_data(args)


def get_data(get_data_fn: Callable[..., dict], args, preprocess_fns, epoch: int = 0, tokenizer=None) -> dict:
    """The evaluation sets from the fork's own ``get_data`` (which sees no ``--train-data``), the training set
    from the engine. Call only when :func:`owns_train_data`; ``get_data_fn`` is the fork's own ``get_data``."""
    return engine_get_data(_engine, get_data_fn, args, preprocess_fns, epoch, tokenizer)


def evaluate(evaluate_fn: Callable[..., Any], model, data, epoch: int, args, **kwargs) -> Any:
    """``evaluate_fn(model, data, epoch, args, **kwargs)`` without consuming the training RNG stream, then the
    engine's ``after_evaluate`` (the callbacks' ``on_evaluate``) with its metrics."""
    if _engine is None:
        return evaluate_fn(model, data, epoch, args, **kwargs)
    return engine_evaluate(_engine, evaluate_fn, model, data, epoch, args, **kwargs)


def run(main_fn: Callable[[list[str]], Any], argv: list[str]) -> int:
    """The exit status of ``main_fn(argv)``, as ``python -m safe_train.main`` exits (:func:`exit_status`)."""
    return exit_status(lambda: main_fn(argv))
