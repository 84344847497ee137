"""Entry point: ``torchrun -m safe_train.main --defense NAME <open_clip_train flags>``.

Works the same with ``python -m safe_train.main`` (one process) and under ``srun`` (SLURM variables).
Exits non-zero whenever training fails, including OpenCLIP's own error returns.
"""

from __future__ import annotations

import logging
import sys

import torch

from safe_train import openclip_compat as oc
from safe_train.args import ConfigError, build_parser, expand_configs, load_id_list
from safe_train.augment import WordNetMissingError
from safe_train.callbacks import create_callbacks
from safe_train.data import DataError
from safe_train.defenses import create_defense
from safe_train.engine import Engine
from safe_train.evaluate import EvaluationError
from safe_train.manifest import ManifestError
from safe_train.model_configs import register_model_configs


def print_help() -> None:
    build_parser().print_help()
    print("\n" + "=" * 30 + " open_clip_train flags " + "=" * 30 + "\n", flush=True)
    oc.upstream_parse_args(["--help"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        return 0
    try:
        argv = expand_configs(argv)
        ours, upstream_argv = build_parser().parse_known_args(argv)
        if ours.log_root:
            upstream_argv += ["--logs", ours.log_root]
        blocklist = load_id_list(ours.blocklist) if ours.blocklist else None
        register_model_configs()
        engine = Engine(create_defense(ours), create_callbacks(ours), blocklist=blocklist,
                        track_samples=ours.track_samples)
        with oc.patched_openclip(get_train_data=engine.get_train_data, train_one_epoch=engine.train_one_epoch,
                                 after_evaluate=engine.after_evaluate, on_parsed_args=engine.on_parsed_args):
            return oc.run_openclip_main(upstream_argv)
    except (ConfigError, DataError, EvaluationError, ManifestError, WordNetMissingError) as e:
        logging.getLogger("safe_train").error(str(e))
        print(f"safe-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
