"""safe-train's own flags, YAML presets, and how they join OpenCLIP's flags.

Our flags are parsed first (``parse_known_args``) and everything else goes to OpenCLIP's parser
unchanged, so every upstream flag keeps working and an unknown flag is still an error. The defenses'
and callbacks' flags come from their registries (plugins included), each from its typed config.
``--config FILE.yaml`` (or the name of a preset shipped in ``safe_train/configs/``, e.g.
``--config mnist-bench``) expands into flags placed *before* the command line, so the command line wins.
"""

from __future__ import annotations

import argparse
import difflib
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from safe_train import openclip as oc
from safe_train.errors import ConfigError
from safe_train.interface import Callback, Defense
from safe_train.registry import CALLBACKS, DEFENSES

PRESET_PACKAGE = "safe_train"
DEFAULT_DIST_TIMEOUT_MINUTES = 30.0
PRESET_DIR = "configs"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m safe_train.main", add_help=False, allow_abbrev=False,
        description="OpenCLIP 3.3 training with backdoor defenses. All open_clip_train flags are accepted "
                    "(listed after safe-train's own).")
    group = parser.add_argument_group("safe-train")
    group.add_argument("--config", action="append", default=[], metavar="FILE.yaml|PRESET",
                       help="Load flags from a YAML mapping (keys are flag names, dashes or underscores), or a "
                            f"packaged preset by name ({', '.join(list_presets())}). Repeatable; later files and "
                            "the command line override earlier ones.")
    group.add_argument("--defense", default="none", choices=DEFENSES.names(),
                       help="Defense that owns the training loss (default: none = plain OpenCLIP).")
    group.add_argument("--log-root", default=None, metavar="DIR",
                       help="Where runs are written (OpenCLIP's --logs, which torchrun mistakes for its own "
                            "--logs-specs).")
    group.add_argument("--blocklist", default=None, metavar="FILE",
                       help="Sample ids never to train on (.npy, or text/CSV with one id per line or a "
                            "'sample_id' column), e.g. written by `python -m safe_train.detect`.")
    group.add_argument("--track-samples", action="store_true",
                       help="Count how often each sample id reaches the loss (columns times_seen, last_epoch).")
    steps = parser.add_argument_group("step checkpoints and preemption")
    steps.add_argument("--save-every-n-steps", type=int, default=0, metavar="N",
                       help="Also write a mid-epoch checkpoint every N optimizer steps (0: off). "
                            "`--resume latest` resumes from it exactly.")
    steps.add_argument("--save-every-minutes", type=float, default=0.0, metavar="M",
                       help="Also write a mid-epoch checkpoint every M minutes of training (0: off).")
    steps.add_argument("--keep-step-checkpoints", type=int, default=2, metavar="K",
                       help="How many step checkpoints to keep (newest first; default 2).")
    distributed = parser.add_argument_group("distributed")
    distributed.add_argument("--dist-timeout-minutes", type=float, default=DEFAULT_DIST_TIMEOUT_MINUTES, metavar="M",
                             help="How long a collective may wait before the process group aborts (default "
                                  f"{DEFAULT_DIST_TIMEOUT_MINUTES:g}; torch's NCCL default is 10). Ranks wait "
                                  "while rank 0 alone scores a global detection reference or writes a checkpoint.")
    for _, callback in CALLBACKS.items():
        callback.add_arguments(parser)
    for _, defense in DEFENSES.items():
        defense.add_arguments(parser)
    return parser


def create_defense(args: argparse.Namespace) -> Defense:
    """The ``--defense`` of a parsed command line, built from its typed config."""
    return DEFENSES.get(args.defense).from_args(args)


def create_callbacks(args: argparse.Namespace) -> list[Callback]:
    """Every registered callback whose flags switch it on, in registry (name) order."""
    return [cb for _, cls in CALLBACKS.items() if (cb := cls.from_args(args)) is not None]


def list_presets() -> list[str]:
    """Names of the YAML presets shipped inside the package."""
    folder = resources.files(PRESET_PACKAGE) / PRESET_DIR
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config(name_or_path: str | os.PathLike) -> Path:
    """A YAML file: an existing path, else a packaged preset called ``name_or_path`` (``.yaml`` optional)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and name in list_presets():
        return Path(str(resources.files(PRESET_PACKAGE) / PRESET_DIR / f"{name}.yaml"))
    raise ConfigError(f"config file not found: {name_or_path} (packaged presets: {', '.join(list_presets())})")


def _flag_tokens(key: str, value: Any) -> list[str]:
    flag = "--" + str(key).replace("_", "-")
    if value is None or value is False:
        return []
    if value is True:
        return [flag]
    if isinstance(value, dict):
        return [flag, *[f"{k}={v}" for k, v in value.items()]]
    if isinstance(value, list | tuple):
        return [flag, *[str(v) for v in value]]
    return [flag, str(value)]


def known_flags() -> set[str]:
    """Every long flag safe-train or open_clip_train accepts (what a config key may be)."""
    ours = {opt for action in build_parser()._actions for opt in action.option_strings}
    return ours | oc.upstream_option_strings()


def config_to_argv(path: str | os.PathLike) -> list[str]:
    """Flags from a YAML file or packaged preset, in file order."""
    path = resolve_config(path)
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if content is None:
        return []
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must be a mapping of flag names to values, got {type(content).__name__}")
    tokens: list[str] = []
    known = known_flags()
    for key, value in content.items():
        if key == "config":
            raise ConfigError(f"config file {path}: nested 'config' keys are not supported")
        flag = "--" + str(key).replace("_", "-")
        if flag not in known:
            close = difflib.get_close_matches(flag, sorted(known), n=1)
            hint = f" (did you mean {close[0][2:]!r}?)" if close else ""
            raise ConfigError(f"config file {path}: unknown key {key!r}{hint}; keys are safe-train or "
                              f"open_clip_train flag names")
        tokens += _flag_tokens(key, value)
    return tokens


def expand_configs(argv: list[str]) -> list[str]:
    """Replace ``--config FILE`` occurrences by the file's flags, placed before the rest of argv."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", action="append", default=[])
    known, rest = pre.parse_known_args(argv)
    tokens: list[str] = []
    for path in known.config:
        tokens += config_to_argv(path)
    return tokens + rest


def load_id_list(path: str | os.PathLike) -> np.ndarray:
    """Sample ids from a .npy file, a text file (one per line, '#' comments) or a CSV with 'sample_id'."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"blocklist not found: {path}")
    if path.suffix == ".npy":
        ids = np.load(path, allow_pickle=False)
    else:
        lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
        lines = [ln for ln in lines if ln]
        if lines and not lines[0].lstrip("-").isdigit():
            import pandas as pd

            sep = "\t" if "\t" in lines[0] else ","
            df = pd.read_csv(path, sep=sep)
            if "sample_id" not in df.columns:
                raise ConfigError(f"{path}: a CSV blocklist needs a 'sample_id' column; columns are {list(df.columns)}")
            ids = df["sample_id"].to_numpy()
        else:
            try:
                ids = np.array([int(ln) for ln in lines], dtype=np.int64)
            except ValueError as e:
                raise ConfigError(f"{path}: not a list of integer sample ids ({e})") from None
    return np.asarray(ids, dtype=np.int64).reshape(-1)
