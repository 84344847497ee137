"""Entry point: ``torchrun -m safe_train.main --defense NAME <open_clip_train flags>``.

Works the same with ``python -m safe_train.main`` (one process) and under ``srun`` (SLURM variables).
Exits non-zero whenever training fails, including OpenCLIP's own error returns; bad input is one line on
stderr and exit code 2.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import pickle
import sys
from collections.abc import Callable
from typing import Any

import torch

from safe_train import openclip as oc
from safe_train.args import build_parser, create_callbacks, create_defense, expand_configs, load_id_list
from safe_train.checkpoint import unpickling_reason
from safe_train.engine import Engine, StepCheckpointPolicy
from safe_train.errors import EXIT_PREEMPTED, CheckpointError, ConfigError, Preempted, SafeTrainError, report
from safe_train.model_configs import register_model_configs


def print_help() -> None:
    build_parser().print_help()
    print("\n" + "=" * 30 + " open_clip_train flags " + "=" * 30 + "\n", flush=True)
    oc.upstream_parse_args(["--help"])


def build_engine(argv: list[str]) -> tuple[Engine, list[str]]:
    """safe-train's flags (``--config`` presets expanded, plugins loaded) → the run's engine, and the
    remaining flags for OpenCLIP's parser. Raises :class:`SafeTrainError` on bad input."""
    argv = expand_configs(list(argv))
    ours, upstream_argv = build_parser().parse_known_args(argv)
    if ours.log_root:
        upstream_argv += ["--logs", ours.log_root]
    blocklist = load_id_list(ours.blocklist) if ours.blocklist else None
    register_model_configs()
    policy = StepCheckpointPolicy(ours.save_every_n_steps, ours.save_every_minutes, ours.keep_step_checkpoints)
    if not ours.dist_timeout_minutes > 0:
        raise ConfigError(f"--dist-timeout-minutes must be > 0 (got {ours.dist_timeout_minutes:g})")
    engine = Engine(create_defense(ours), create_callbacks(ours), blocklist=blocklist,
                    track_samples=ours.track_samples, step_checkpoints=policy)
    engine.dist_timeout = datetime.timedelta(minutes=ours.dist_timeout_minutes)  # read by patched_openclip
    return engine, upstream_argv


def _log_to_files(message: str) -> None:
    """Write ``message`` to the run's log files only (OpenCLIP's root logger also streams to stderr)."""
    record = logging.LogRecord("safe_train", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def exit_status(run: Callable[[], Any]) -> int:
    """The process exit status of a training run: 0; 1 for OpenCLIP's ``-1`` error return (which its own
    ``__main__`` ignores); 2 with one line on stderr for bad input (:class:`SafeTrainError`, a checkpoint
    that is not plain weights); :data:`EXIT_PREEMPTED` after a stop signal and its step checkpoint. The
    process group is torn down either way."""
    root = logging.getLogger()
    handlers_before = list(root.handlers)
    try:
        result = run()
    except Preempted as e:
        _log_to_files(f"safe-train: {e}")
        print(f"safe-train: {e}", file=sys.stderr, flush=True)
        for child in multiprocessing.active_children():  # e.g. OpenCLIP's --remote-sync process, which
            child.terminate()  # its main() only stops after the last epoch; exit would wait for it forever
        return EXIT_PREEMPTED
    except SafeTrainError as e:
        _log_to_files(f"safe-train: error: {e}")  # the run's out.log keeps it; stderr gets it once, below
        return report(e)
    except pickle.UnpicklingError as e:  # --pretrained/--resume refused by torch.load(weights_only=True)
        error = CheckpointError(f"refusing to load a checkpoint that is not plain weights "
                                f"(torch.load weights_only=True): {unpickling_reason(e)}")
        _log_to_files(f"safe-train: error: {error}")
        return report(error)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for handler in [h for h in root.handlers if h not in handlers_before]:  # OpenCLIP's setup_logging adds
            root.removeHandler(handler)  # handlers per run: a second run in one process must not inherit them
            handler.close()
    return 1 if isinstance(result, int) and result != 0 else 0


def _train(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print_help()
        return 0
    engine, upstream_argv = build_engine(argv)
    try:
        with oc.patched_openclip(engine):
            status = oc.run_openclip_main(upstream_argv)
        engine.retire_replaced_sidecars()
        return status
    finally:
        engine.stop.uninstall()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return exit_status(lambda: _train(argv))


if __name__ == "__main__":
    sys.exit(main())
