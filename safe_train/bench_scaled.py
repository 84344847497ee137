"""The scaled benchmark: ``safe-train bench --scale tiny|medium|large`` on the scene corpus.

Attack x poison rate x defense x seed, on the MultiMNIST-style scenes of :mod:`safe_train.scenes`
(20,000 training pairs at ``medium``), with a validation split for choosing recipes and a test split
for the final numbers. Per seed it builds (or reuses) a corpus, poisons its training split with each
attack at each rate (:func:`safe_train.poison.poison_dataset`, labels from the scenes' digits), trains
``none`` at every rate, then every other defense at the lowest rate ``none`` learns and at the highest
rate (``--defense-rates``), and evaluates the final checkpoint:

- clean top-1: zero-shot on every single held-out digit of the split (1,000 on test, 500 on validation);
- ASR: the trigger on every non-target single digit, and on every held-out scene without the target;
- R@1: image→text and text→image on held-out scenes with distinct captions (1,000 at ``medium``);
- targeted success: the share of the 8 target images classified as their target class.

The opt-in ``none-cleaned`` row is cleaning end to end: ``python -m safe_train.detect`` (its default ``auto``
detector) scores the poisoned training set with the final checkpoint of the cell's ``none`` run, and ``none`` is
trained again from scratch without the blocklisted ids (``--blocklist``); the row adds the blocklist's size, the
poisons it caught, the clean pairs it cost and the detector's AUROC / PR-AUC / FPR@95.

Every run is a cell file under ``<out>/cells``, reused when its flags and inputs are unchanged, so a
table can be built over several sittings; the table (mean ± standard error over seeds) and plots go to
``<out>/results/<scale>-<split>/`` (:mod:`safe_train.bench_stats`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import re
import shlex
import shutil
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safe_train.args import config_to_argv, known_flags, load_id_list
from safe_train.attacks import trigger_from_manifest
from safe_train.bench_data import write_tsv
from safe_train.bench_runs import (
    BENCH_ENTRIES,
    CLEANING_ENTRIES,
    SHARED_PRESET,
    BenchEntry,
    ensure_wordnet_offline,
    flag_value,
    needs_wordnet,
    parse_attack_params,
    read_history,
    run_training,
    scaled_to_split,
    sha256,
)
from safe_train.bench_stats import (
    CELL_KEYS,
    aggregate,
    lowest_learned_rate,
    mean_se,
    plot_accuracy_vs_asr,
    plot_asr_vs_rate,
    plot_curves,
    write_results,
)
from safe_train.checkpoint import sidecar_path
from safe_train.errors import ConfigError, SafeTrainError
from safe_train.evaluate import (
    LabelledImages,
    evaluate_checkpoint,
    evaluate_model,
    evaluate_retrieval,
    load_model,
)
from safe_train.manifest import Manifest
from safe_train.poison import clean_reference, poison_dataset
from safe_train.scenes import DEFAULT_CANVAS, SceneCorpus, build_scene_corpus, check_build
from safe_train.scenes import model_flags as scene_model_flags
from safe_train.scenes import model_name as scene_model_name
from safe_train.state import SampleTable
from safe_train.zeroshot_sets import get_zeroshot_set

TARGET = "zero"
N_TARGETS = 8  # targeted poisoning: one held-out image per target, each paired with captions of another class
# Trigger parameters at the scenes' 64-pixel canvas (the parameters are reported with every table).
SCENE_ATTACKS: dict[str, dict[str, Any]] = {
    "badnets": {"patch_size": 6},
    "blended": {"alpha": 0.2},
    "sig": {},
    "wanet": {"strength": 1.0},
    "label_consistent": {"patch_size": 6},
    "targeted": {},
}
SCALED_DEFENSES = ("none", "safeclip", "cleanclip", "cleanclip-clip-only")
# Where the scene corpus's recipe differs from the small benchmark's preset, chosen on this benchmark's validation
# split (benchmarks/RESULTS.md): one multimodal warm-up epoch instead of two for every SafeCLIP row. After two, the
# first split admitted 56 of 200 BadNets poisons on validation seed 102 (and 169 / 117 on test seeds 1 / 2, which
# then learnt the backdoor); after one, 9-11 (seed 102) and 1 (seed 101). Appended after the preset's flags.
SCENE_RECIPE: dict[str, tuple[str, ...]] = {"safeclip": ("--safeclip-multimodal-warmup-epochs", "1")}
# every row the scaled benchmark can run: the shared entries plus the cleaning rows only it knows how to run
SCALED_ENTRIES: dict[str, BenchEntry] = {
    name: replace(entry, flags=(*entry.flags, *SCENE_RECIPE.get(entry.defense, ())))
    for name, entry in {**BENCH_ENTRIES, **CLEANING_ENTRIES}.items()
}
DEFAULT_RATES = (0.0005, 0.001, 0.0025, 0.01)
SPLIT_DIRS = {"validation": "val", "test": "test"}  # bench_stats' split names -> the corpus's
# A seed builds the corpus (its training pairs) and the poison choice; the split only picks the held-out images.
# So a validation run on a test seed trains on that test cell's very data: the two splits' seeds are disjoint.
VALIDATION_SEEDS_FROM = 100
LEARNED_ASR = 0.8


@dataclass(frozen=True)
class ScaleSpec:
    """The corpus, training length and evaluation sizes of one scale."""

    name: str
    n_train: int
    n_val: int
    n_test: int
    epochs: int
    eval_every: int
    retrieval_pairs: int
    canvas: int = DEFAULT_CANVAS  # the scene model's own input size (evaluation loads the model at it)
    finetune_fraction: float = 0.05  # CleanCLIP's clean set, a share of the training size
    train_format: str = "csv"  # "wds": poison and train on webdataset shards (corpora over 100,000 pairs have no CSV)
    device: str = "cpu"
    precision: str = "fp32"


SCALES: dict[str, ScaleSpec] = {
    # a smoke run for tests and first tries: a minute or two on 2 CPU cores
    "tiny": ScaleSpec("tiny", 2_000, 300, 300, epochs=1, eval_every=1, retrieval_pairs=200),
    # the headline table: about 10 minutes per none run on 2 CPU cores (benchmarks/RESULTS.md)
    "medium": ScaleSpec("medium", 20_000, 2_000, 2_000, epochs=6, eval_every=2, retrieval_pairs=1_000),
    # meant for a GPU (CUDA AMP)
    # validation / test: as many held-out scenes as the digit pools allow (500 / 1,000 digits x 4 scenes each)
    "large": ScaleSpec("large", 200_000, 2_000, 4_000, epochs=10, eval_every=2, retrieval_pairs=1_000,
                       device="cuda", precision="amp", train_format="wds"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The scaled benchmark's own flags (``safe_train.bench`` adds the shared ones)."""
    g = p.add_argument_group("scaled benchmark (--scale tiny|medium|large)")
    g.add_argument("--poison-rates", default=None,
                   help="Comma-separated poison rates swept by the scaled benchmark "
                        f"(default {','.join(map(str, DEFAULT_RATES))}); 0 adds the clean reference, trained with "
                        "no poison and measured with the trigger: the ASR floor a defense is judged against.")
    g.add_argument("--split", choices=tuple(SPLIT_DIRS), default="test",
                   help="Where the numbers come from: validation (choosing recipes and thresholds) or test "
                        "(final numbers only). Default: test.")
    g.add_argument("--defense-rates", default="auto",
                   help="Rates the defenses other than none run at: auto (the lowest rate none learns, ASR >= 80%% "
                        "mean over the seeds, and the highest rate), all, or a comma-separated list.")
    g.add_argument("--train-pairs", type=int, default=None, help="Override the scale's training size.")
    g.add_argument("--finetune-epochs", type=int, default=None,
                   help="Override the finetuning defenses' epochs (default: the recipe's steps at 400 pairs).")
    g.add_argument("--precision", default=None, help="Training precision (default: the scale's: fp32, amp on large).")
    g.add_argument("--train-format", choices=("csv", "wds"), default=None,
                   help="Poison and train on the corpus's CSV or its webdataset shards (default: csv; wds on large).")
    g.add_argument("--clean-budget", default=None, metavar="B",
                   help="Blocklist size of the cleaning rows (" + ", ".join(CLEANING_ENTRIES) + ": detect with the "
                        "none run's checkpoint, retrain none without the blocklist): a whole number B blocklists the "
                        "B highest detector scores, a fraction 0 < B < 1 that share of the training pairs. Default: "
                        "the detector's own rule (auto score > sqrt(2 ln m)).")
    g.add_argument("--row", action="append", default=[], metavar="NAME=BASE:FLAGS",
                   help="A recipe variant to compare on the validation split: row NAME is row BASE plus training "
                        "FLAGS, e.g. 'safeclip-cap85=safeclip-inloop:--safeclip-max-ratio 0.85'. Then list NAME in "
                        "--defenses; its cells are cached under NAME (repeatable).")


_ROW_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*")


def parse_rows(items: Sequence[str]) -> dict[str, BenchEntry]:
    """``--row NAME=BASE:FLAGS`` → {NAME: BASE's entry with FLAGS appended (after BASE's, so they override)}.

    Recipes are chosen by comparing such rows on the validation split; each is its own cached cell, and its
    flags are part of the cell's inputs, so a changed variant re-runs instead of reusing an old result."""
    rows: dict[str, BenchEntry] = {}
    for item in items:
        name, eq, rest = item.partition("=")
        base, colon, flags = rest.partition(":")
        name, base = name.strip(), base.strip()
        if not eq or not colon or not _ROW_NAME.fullmatch(name) or not flags.split():
            raise ConfigError(f"--row must look like NAME=BASE:--flag value ... (NAME in lower case letters, digits, "
                              f"'-' and '.'), got {item!r}")
        if name in SCALED_ENTRIES or name in rows:
            raise ConfigError(f"--row {name!r} is already a row; give the variant a new name")
        if base not in SCALED_ENTRIES:
            raise ConfigError(f"--row {name}: unknown base row {base!r}; rows: {sorted(SCALED_ENTRIES)}")
        extra = tuple(shlex.split(flags))
        if not extra[0].startswith("--"):
            raise ConfigError(f"--row {name}: its flags must start with a --flag, got {extra[0]!r}")
        unknown = [t for t in extra if t.startswith("--") and t.split("=")[0] not in known_flags()]
        if unknown:  # caught here, not after an hour of none runs
            raise ConfigError(f"--row {name}: unknown training flag {unknown[0]!r}")
        rows[name] = replace(SCALED_ENTRIES[base], flags=(*SCALED_ENTRIES[base].flags, *extra))
    return rows


def scaled_entries(opts: argparse.Namespace) -> dict[str, BenchEntry]:
    """The rows this invocation can run: the built-in ones and its ``--row`` variants."""
    return {**SCALED_ENTRIES, **parse_rows(getattr(opts, "row", None) or [])}


def scale_spec(opts: argparse.Namespace) -> ScaleSpec:
    spec = SCALES[opts.scale]
    changes: dict[str, Any] = {}
    if opts.epochs is not None:
        changes["epochs"] = opts.epochs
    if getattr(opts, "train_pairs", None) is not None:
        if opts.train_pairs < 1:
            raise ConfigError(f"--train-pairs must be positive, got {opts.train_pairs}")
        changes["n_train"] = opts.train_pairs
    if opts.device is not None:
        changes["device"] = opts.device
        if opts.device == "cpu" and not getattr(opts, "precision", None):
            changes["precision"] = "fp32"  # amp on a CPU is bf16/fp16 autocast: slow without AMX, other numbers
    if getattr(opts, "precision", None):
        changes["precision"] = opts.precision
    if getattr(opts, "train_format", None):
        changes["train_format"] = opts.train_format
    if opts.eval_every is not None:
        changes["eval_every"] = opts.eval_every
    spec = replace(spec, **changes)
    check_build({"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}, spec.canvas)
    return spec


def _rates(text: str | None, flag: str = "--poison-rates") -> list[float]:
    if not text:
        return list(DEFAULT_RATES)
    try:
        rates = sorted({float(r) for r in text.split(",") if r.strip()})
    except ValueError as e:
        raise ConfigError(f"{flag} must be comma-separated numbers, got {text!r}") from e
    if not rates or any(not 0 <= r < 1 for r in rates):
        raise ConfigError(f"{flag} must lie in [0, 1) (0: the clean reference, no poisons), got {text!r}")
    return rates


def parse_clean_budget(text: str | None) -> int | float | None:
    """``--clean-budget``: a count (whole number >= 0), a share of the training pairs (0 < B < 1) or None (the
    detector's threshold rule); kept as given so the table can say which it was."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        share = float(text)
    except ValueError:
        raise ConfigError(f"--clean-budget must be a count or a fraction in (0, 1), got {text!r}") from None
    if not 0 < share < 1:
        raise ConfigError(f"--clean-budget must be a whole count or a fraction in (0, 1), got {text!r}")
    return share


def budget_count(budget: int | float | None, n_train: int) -> int | None:
    """The ``--blocklist-budget`` that ``budget`` means on ``n_train`` pairs (None: the detector's rule)."""
    if budget is None:
        return None
    count = round(budget * n_train) if isinstance(budget, float) else budget
    if not 0 <= count < n_train:
        raise ConfigError(f"--clean-budget {budget} blocklists {count} of {n_train} training pairs: it must leave "
                          "some to train on (and cannot be negative)")
    return count


def cleaning_stats(blocked: np.ndarray, poisoned_ids: Sequence[int], n_train: int) -> dict[str, Any]:
    """What a blocklist did to a training set of ``n_train`` pairs of which ``poisoned_ids`` are poisoned: poisons
    caught and clean pairs lost, as counts and as shares (of the poisons, of the clean pairs)."""
    blocked = np.unique(np.asarray(blocked, dtype=np.int64))
    poisoned = np.unique(np.asarray(poisoned_ids, dtype=np.int64))
    if len(blocked) > n_train:
        raise SafeTrainError(f"the blocklist holds {len(blocked)} ids, more than the {n_train} training pairs")
    caught = int(np.isin(blocked, poisoned).sum())
    n_clean = n_train - len(poisoned)
    lost = len(blocked) - caught
    return {
        "n_blocklisted": len(blocked), "poisons_blocklisted": caught, "n_poisoned": len(poisoned),
        "poisons_blocklisted_share": caught / len(poisoned) if len(poisoned) else None,
        "n_clean_train": n_clean, "clean_lost": lost, "clean_lost_share": lost / n_clean if n_clean else None,
        "n_train_cleaned": n_train - len(blocked),
    }


def detection_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of ``safe_train.detect``'s report.json that the row keeps: the first (blocklisting) detector's
    AUROC / PR-AUC / FPR@95 (None without poisons to score against) and the rule that sized the blocklist."""
    detector = report["detectors"][0]
    metrics = report.get("metrics", {}).get(detector, {})
    blocklist = report["blocklist"]
    rule = (f"budget {blocklist['budget']}" if blocklist.get("budget") is not None
            else f"score > {blocklist['threshold']:.3f}" if blocklist.get("threshold") is not None else "none")
    return {"detector": detector, "detect_auroc": metrics.get("auroc"), "detect_pr_auc": metrics.get("pr_auc"),
            "detect_fpr95": metrics.get("fpr95"), "blocklist_rule": rule,
            "detect_threshold": blocklist.get("threshold"), "detect_num_samples": report["num_samples"],
            "detect_reference_size": report.get("reference_size"), "detect_backend": report.get("backend")}


def trained_ids(checkpoint: Path) -> np.ndarray:
    """The sample ids that reached the loss in a ``--track-samples`` run (``times_seen`` > 0 in the per-sample
    table of ``checkpoint``'s sidecar): the evidence that a blocklist really kept samples out."""
    table = SampleTable()
    table.load(sidecar_path(checkpoint) / "table")
    if not table.has_column("times_seen"):
        raise SafeTrainError(f"{checkpoint}: its sample table has no times_seen (the run lacked --track-samples)")
    return np.asarray(table.ids)[np.asarray(table["times_seen"]) > 0]


@dataclass(frozen=True)
class Cell:
    """One run: the table cell (attack, rate, defense) and its seed."""

    attack: str
    rate: float
    defense: str
    seed: int
    trigger: str = ""  # "" with the attack's default parameters, else their tag, e.g. "-strength3.0" (trigger_tag)

    @property
    def name(self) -> str:
        return f"{self.attack}{self.trigger}-rate{self.rate:g}-{self.defense}-seed{self.seed}"


def trigger_tag(attack: str, params: dict[str, Any]) -> str:
    """``""`` for the attack's default trigger, else e.g. ``"-strength3.0"``: runs of another trigger (given with
    ``--attack-param``) get cells, run folders and cached results of their own instead of replacing the default's."""
    changed = {k: v for k, v in sorted(params.items()) if SCENE_ATTACKS[attack].get(k, object()) != v}
    return "".join(f"-{k}{v}" for k, v in changed.items())


# ------------------------------------------------------------------------------------------- data


def _finetune_csv(corpus: SceneCorpus, fraction: float, seed: int) -> tuple[Path, int]:
    """A clean training subset (``fraction`` of the training split, drawn with ``seed``) for the finetuning
    defenses: the defender's trusted clean data, from the training distribution, never from held-out pools."""
    n = max(1, round(fraction * corpus.sizes["train"]))
    # named after the corpus build too: a corpus rebuilt in place (other parameters) never reuses an old subset
    build = sha256(corpus.out_dir / "scenes_stamp.json")[:12]
    path = corpus.out_dir / f"finetune-{n}-seed{seed}-{build}.csv"
    if path.exists():
        return path, n
    chosen = sorted(random.Random(f"finetune-{seed}").sample(range(corpus.sizes["train"]), n))
    if corpus.csv["train"] is not None:
        with open(corpus.csv["train"], encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        write_tsv(path, rows[0], [rows[1:][i] for i in chosen])
        return path, n
    # no CSV (a large corpus): copy the chosen scenes out of their shards
    images = path.with_suffix("")
    images.mkdir(parents=True, exist_ok=True)
    shard_size = int(corpus.stamp["shard_size"])
    rows = []
    for shard in sorted({i // shard_size for i in chosen}):
        wanted = {f"{i:08d}" for i in chosen if i // shard_size == shard}
        with tarfile.open(corpus.out_dir / "train" / f"{shard:05d}.tar") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key not in wanted or ext not in ("png", "txt"):
                    continue
                payload = tar.extractfile(member).read()
                if ext == "png":
                    (images / f"{key}.png").write_bytes(payload)
                else:
                    rows.append((images / f"{key}.png", payload.decode("utf-8").strip()))
    write_tsv(path, ("filepath", "title"), sorted(rows))
    return path, n


def _poison(corpus: SceneCorpus, out: Path, attack: str, rate: float, seed: int, params: dict[str, Any],
            split_dir: str, train_format: str = "csv") -> tuple[Path, Manifest]:
    """The training split poisoned with ``attack`` at ``rate`` (reused while it was made from this corpus)."""
    tag = "-".join(f"{k}{v}" for k, v in sorted(params.items())) or "default"
    targeted = attack == "targeted"
    # targeted images come from the evaluated split's held-out digits (they must be outside training)
    where = f"-{split_dir}" if targeted else ""
    fmt = "" if train_format == "csv" else f"-{train_format}"
    directory = out / "poisoned" / f"{corpus.out_dir.name}-{attack}-{tag}-rate{rate:g}{where}{fmt}"
    if train_format == "csv":
        if corpus.csv["train"] is None:
            raise ConfigError(f"the training split of {corpus.out_dir} has no CSV (over 100,000 pairs): use "
                              "--train-format wds")
        source, digest = str(corpus.csv["train"]), sha256(corpus.csv["train"])
    else:  # the shards are fixed by the corpus's stamp (its parameters), written last by a finished build
        source, digest = corpus.shards["train"], sha256(corpus.out_dir / "scenes_stamp.json")
    stamp = directory / "source_sha256.txt"
    if (directory / "manifest.json").exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return directory, Manifest.load(directory / "manifest.json")
    shutil.rmtree(directory, ignore_errors=True)
    if rate == 0:  # the clean reference (run_scaled refused targeted / shards up front; clean_reference does too)
        manifest = clean_reference(source, directory, attack, target=TARGET, templates="mnist",
                                   image_size=corpus.canvas, seed=seed, label_column="digits", **params)
        stamp.write_text(digest + "\n")
        return directory, manifest
    kwargs: dict[str, Any] = dict(rate=rate, templates="mnist", image_size=corpus.canvas, seed=seed,
                                  label_column="digits", **params)
    if targeted:
        kwargs.update(targets=N_TARGETS, targeted_pool=str(corpus.digits_csv[split_dir]))
    else:
        kwargs.update(target=TARGET)
    manifest = poison_dataset(source, directory, attack, **kwargs)
    stamp.write_text(digest + "\n")
    return directory, manifest


def _held_out_scenes(corpus: SceneCorpus, split_dir: str) -> list[tuple[str, str, list[int]]]:
    """(image path, caption, digit labels) of every held-out scene of ``split_dir``, in index order."""
    path = corpus.csv[split_dir]
    if path is None:
        raise ConfigError(f"the {split_dir} split has no CSV")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        return [(row["filepath"], row["title"], [int(d) for d in row["digits"].split()]) for row in reader]


def distinct_caption_pairs(scenes: Sequence[tuple[str, str, list[int]]], n: int) -> list[tuple[str, str]]:
    """The first ``n`` scenes whose caption text no earlier chosen scene has: with identical captions a
    retrieval "miss" could be the right text, so R@1 is measured on distinct captions only."""
    seen: set[str] = set()
    pairs = []
    for image, caption, _ in scenes:
        if caption in seen:
            continue
        seen.add(caption)
        pairs.append((image, caption))
        if len(pairs) == n:
            break
    return pairs


# ------------------------------------------------------------------------------------- evaluation


def _clean_digits(corpus: SceneCorpus, split_dir: str, manifest: Manifest, manifest_path: Path) -> Path:
    """The single held-out digits for clean accuracy: all of them, less a targeted attack's target images
    (which were trained on, with captions of another class)."""
    path = corpus.digits_csv[split_dir]
    if manifest.attack != "targeted":
        return path
    targets = {str(Path(image).resolve()) for image, _ in manifest.targeted_pairs(get_zeroshot_set("mnist")[0])}
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    kept = [r for r in rows[1:] if str(Path(r[0]).resolve()) not in targets]
    if len(kept) != len(rows) - 1 - len(targets):
        raise SafeTrainError(f"the targeted images of {manifest_path} are not all among {path}")
    out = manifest_path.parent / f"digits_{split_dir}_without_targets.csv"
    write_tsv(out, rows[0], kept)
    return out


def evaluate_run(model_name: str, checkpoint: Path, corpus: SceneCorpus, split_dir: str, manifest: Path,
                 retrieval_pairs: int, device: str = "cpu") -> dict[str, Any]:
    """The final numbers of one run: clean top-1 and ASR on single digits (or targeted success), ASR on
    held-out scenes without the target, and retrieval R@1 on held-out scenes with distinct captions."""
    loaded = Manifest.load(manifest)
    digits = evaluate_checkpoint(model_name, checkpoint, _clean_digits(corpus, split_dir, loaded, manifest), "mnist",
                                 manifest=manifest, device=device)
    result: dict[str, Any] = {
        "clean_top1": digits["clean_top1"], "clean_top5": digits["clean_top5"], "n_clean": digits["n_eval"],
        "asr": digits["asr"], "asr_clean_baseline": digits["asr_clean_baseline"], "n_asr": digits["n_asr"],
        "targeted_success": digits["targeted_success"], "n_targets": digits.get("n_targets"),
    }
    model, preprocess, tokenizer = load_model(model_name, checkpoint, device)
    scenes = _held_out_scenes(corpus, split_dir)
    result["asr_scenes"] = result["asr_scenes_clean_baseline"] = None
    if loaded.attack != "targeted":
        classnames, templates = get_zeroshot_set("mnist")
        target_index = classnames.index(loaded.target)
        keep = [(image, labels) for image, _, labels in scenes if target_index not in labels]
        scene_eval = evaluate_model(model, preprocess, tokenizer,
                                    LabelledImages.from_list([i for i, _ in keep], [ls[0] for _, ls in keep]),
                                    classnames, templates, trigger=trigger_from_manifest(loaded),
                                    target_index=target_index, trigger_image_size=loaded.image_size, device=device)
        result.update(asr_scenes=scene_eval["asr"], asr_scenes_clean_baseline=scene_eval["asr_clean_baseline"],
                      n_asr_scenes=scene_eval["n_asr"])
    pairs = distinct_caption_pairs(scenes, retrieval_pairs)
    retrieval = evaluate_retrieval(model, preprocess, tokenizer, [i for i, _ in pairs], [c for _, c in pairs],
                                   device=device)
    result.update(retrieval_r1=retrieval["retrieval_r1"], image_to_text_r1=retrieval["image_to_text_r1"],
                  text_to_image_r1=retrieval["text_to_image_r1"], n_retrieval=retrieval["n_pairs"])
    return result


# ------------------------------------------------------------------------------------------- runs


def recipe_overrides(opts: argparse.Namespace) -> list[str]:
    """``--batch-size`` / ``--lr`` / ``--warmup`` given to ``safe-train bench``: they replace the shared preset's."""
    flags = []
    for name in ("batch_size", "lr", "warmup"):
        value = getattr(opts, name, None)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def _train_flags(spec: ScaleSpec, entry: BenchEntry, train_data: list[str], eval_csv: Path, manifest: Manifest,
                 manifest_path: Path, run_dir: Path, seed: int, pretrained: Path | None,
                 overrides: Sequence[str] = ()) -> list[str]:
    evaluation = ["--eval-data", str(eval_csv), "--eval-zeroshot-set", "mnist", "--eval-every", str(spec.eval_every)]
    if manifest.attack != "targeted":  # a multi-target manifest has no trigger; its success is measured after
        evaluation += ["--eval-manifest", str(manifest_path)]
    model = scene_model_flags(spec.canvas)
    start = ["--pretrained", str(pretrained)] if pretrained is not None else []
    return [
        *config_to_argv(SHARED_PRESET), *overrides, "--defense", entry.defense, *model, *start,
        *train_data, "--epochs", str(spec.epochs), "--seed", str(seed),
        "--device", spec.device, "--precision", spec.precision, "--log-every-n-steps", "100",
        "--save-frequency", "0", *evaluation, "--log-root", str(run_dir.parent), "--name", run_dir.name,
        *entry.flags,
    ]


def _row_inputs(flags: list[str], train_file: Path, pretrained: Path | None, eval_csv: Path) -> dict[str, Any]:
    """What a finished cell was made from; ``train_file`` is the training CSV, or the poisoned shards' manifest."""
    key = "train_csv_sha256" if train_file.suffix == ".csv" else "train_manifest_sha256"
    return {"flags": flags, key: sha256(train_file), "eval_csv_sha256": sha256(eval_csv),
            "pretrained_sha256": sha256(pretrained) if pretrained is not None else None}


def _detect_flags(model: str, checkpoint: Path, train_data: list[str], manifest_path: Path, out_dir: Path,
                  device: str, seed: int, budget: int | None) -> list[str]:
    """``python -m safe_train.detect`` on the data a run trained on, with the detector's defaults (``auto``
    detector and reference) and, with a budget, ``--blocklist-budget``."""
    data = ["--train-data", flag_value(tuple(train_data), "--train-data") or "",
            "--dataset-type", flag_value(tuple(train_data), "--dataset-type") or "csv"]
    sized = ["--blocklist-budget", str(budget)] if budget is not None else []
    return ["--model", model, "--checkpoint", str(checkpoint), *data, "--out", str(out_dir), "--manifest",
            str(manifest_path), "--device", device, "--seed", str(seed), *sized]


def run_cell(opts: argparse.Namespace, spec: ScaleSpec, cell: Cell, corpus: SceneCorpus, split_dir: str,
             poisoned: Path, manifest: Manifest, params: dict[str, Any], label: str) -> dict[str, Any]:
    """Train (or reuse) one cell's run and evaluate its final checkpoint; returns its row."""
    out = Path(opts.out).resolve()
    split = {v: k for k, v in SPLIT_DIRS.items()}[split_dir]
    entry = scaled_entries(opts)[cell.defense]
    run_dir = out / "runs" / f"{spec.name}-{split_dir}-{cell.name}"
    pretrained = base_checkpoint = None
    if entry.finetunes or entry.cleans:  # both start from the none run of this very cell
        base = out / "runs" / f"{spec.name}-{split_dir}-{replace(cell, defense='none').name}"
        base_checkpoint = base / "checkpoints" / f"epoch_{spec.epochs}.pt"
        if not base_checkpoint.exists():
            raise SafeTrainError(f"{cell.defense} needs the none run's checkpoint {base_checkpoint}, which is missing")
    if entry.finetunes:
        pretrained = base_checkpoint
        train_file, n_finetune = _finetune_csv(corpus, spec.finetune_fraction, cell.seed)
        train_data = ["--train-data", str(train_file)]
        entry = scaled_to_split(entry, n_finetune)
        if opts.finetune_epochs is not None:
            entry = BenchEntry(entry.defense, (*entry.flags, "--epochs", str(opts.finetune_epochs)), True)
        epochs = int(flag_value(entry.flags, "--epochs") or spec.epochs)
    elif spec.train_format == "csv":
        train_file, epochs = poisoned / "train.csv", spec.epochs
        train_data = ["--train-data", str(train_file)]  # --dataset-type csv: the shared preset's
    else:
        train_file, epochs = poisoned / "manifest.json", spec.epochs
        train_data = ["--train-data", manifest.data, "--dataset-type", "webdataset", "--train-num-samples",
                      str(manifest.num_samples)]
    detect_dir = run_dir / "detect"
    budget = parse_clean_budget(getattr(opts, "clean_budget", None))
    detect_flags: list[str] = []
    if entry.cleans:  # the same training flags as the none row, less the blocklisted ids
        entry = replace(entry, flags=(*entry.flags, "--blocklist", str(detect_dir / "blocklist.txt")))
        detect_flags = _detect_flags(scene_model_name(spec.canvas), base_checkpoint, train_data,
                                     poisoned / "manifest.json", detect_dir, spec.device, cell.seed,
                                     budget_count(budget, manifest.num_samples))
    eval_csv = corpus.digits_csv[split_dir]
    flags = _train_flags(spec, entry, train_data, eval_csv, manifest, poisoned / "manifest.json", run_dir,
                         cell.seed, pretrained, [] if entry.finetunes else recipe_overrides(opts))
    inputs = _row_inputs(flags, train_file, pretrained, eval_csv)
    if entry.cleans:  # the blocklist is a function of these (the detector is seeded): a new budget re-runs
        inputs.update(detect_flags=detect_flags, detect_checkpoint_sha256=sha256(base_checkpoint))
    cell_file = out / "cells" / f"{run_dir.name}.json"
    if cell_file.exists() and not opts.force:
        saved = json.loads(cell_file.read_text())
        if saved.get("inputs") == inputs:
            print(f"[{label}] reusing {cell_file.name}", flush=True)
            return saved
        print(f"[{label}] {cell_file.name} was made with other flags or data: re-running it", flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cleaning: dict[str, Any] = {}
    if entry.cleans:
        print(f"[{label}] detecting poisons in {manifest.num_samples} pairs with {base_checkpoint.parent.parent.name}",
              flush=True)
        detect_dir.mkdir(parents=True)  # OpenCLIP refuses a run folder only once it holds an out.log
        detect_wall = run_training(detect_flags, opts.threads, label, run_dir.parent / f"{run_dir.name}.detect.log",
                                   module="safe_train.detect")
        report = json.loads((detect_dir / "report.json").read_text())
        blocked = load_id_list(detect_dir / "blocklist.txt")
        cleaning = {**cleaning_stats(blocked, manifest.poisoned_ids, manifest.num_samples),
                    **detection_summary(report), "clean_budget": budget,
                    "blocklist_budget": budget_count(budget, manifest.num_samples), "detect_seconds": detect_wall,
                    "detect_dir": str(detect_dir)}
        if report["blocklist"].get("poisoned") not in (None, cleaning["poisons_blocklisted"]):
            raise SafeTrainError(f"{detect_dir}/report.json counts {report['blocklist']['poisoned']} poisons in the "
                                 f"blocklist, the manifest {cleaning['poisons_blocklisted']}")
    what = (f"finetuning the poisoned none model on {train_file.name}" if entry.finetunes else
            f"training {epochs} epochs on {manifest.num_samples} pairs ({len(manifest.poisoned_ids)} poisoned)")
    if entry.cleans:
        what += (f" minus a blocklist of {cleaning['n_blocklisted']} ({cleaning['poisons_blocklisted']} poisoned, "
                 f"{cleaning['clean_lost']} clean)")
    print(f"[{label}] {what}", flush=True)
    wall = run_training(flags, opts.threads, label, run_dir.parent / f"{run_dir.name}.log")
    checkpoint = run_dir / "checkpoints" / f"epoch_{epochs}.pt"
    if not checkpoint.exists():
        raise SafeTrainError(f"run {run_dir.name} wrote no final checkpoint {checkpoint}")
    if entry.cleans:  # proof, not trust: no blocklisted id may have reached the loss
        seen = trained_ids(checkpoint)
        leaked = np.intersect1d(seen, load_id_list(detect_dir / "blocklist.txt"))
        if len(leaked):
            raise SafeTrainError(f"run {run_dir.name} trained on {len(leaked)} blocklisted ids, e.g. {leaked[:5]}")
        cleaning.update(n_trained_ids=len(seen), blocklisted_trained=0)
    started = time.time()
    metrics = evaluate_run(scene_model_name(spec.canvas), checkpoint, corpus, split_dir, poisoned / "manifest.json",
                           spec.retrieval_pairs, spec.device)
    row = {"scale": spec.name, "split": split, "attack": cell.attack, "poison_rate": cell.rate,
           "defense": cell.defense, "seed": cell.seed, "params": params,
           "target": "per-target classes" if manifest.attack == "targeted" else TARGET,
           "n_poisoned": len(manifest.poisoned_ids), "n_train": manifest.num_samples, **metrics, **cleaning,
           "wall_seconds": wall, "eval_seconds": time.time() - started, "run_dir": str(run_dir),
           "history": read_history(run_dir), "inputs": inputs}
    cell_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cell_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(cell_file)  # a cell file is whole or absent: an interrupted run is simply re-run
    shown = ", ".join(f"{k} {_pct(row.get(k))}" for k in ("clean_top1", "asr", "asr_scenes", "retrieval_r1",
                                                          "targeted_success") if row.get(k) is not None)
    if entry.cleans:
        shown += (f"; blocklisted {row['n_blocklisted']} ({row['poisons_blocklisted']}/{row['n_poisoned']} poisons, "
                  f"{row['clean_lost']} clean lost), AUROC {_num(row['detect_auroc'])}")
    print(f"[{label}] {shown}; {wall:.0f} s", flush=True)
    return row


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def defense_rates(policy: str, rates: Sequence[float], none_rows: Sequence[dict[str, Any]], attack: str,
                  ) -> list[float]:
    """The rates the other defenses run at for ``attack``: ``auto`` = the lowest rate ``none`` learns (mean
    ASR >= 80% over the seeds; targeted: mean success) and the highest rate; ``all``; or a list."""
    if policy == "all":
        return list(rates)
    if policy != "auto":
        return _rates(policy, "--defense-rates")
    cells = aggregate([r for r in none_rows if r["attack"] == attack])
    learned = lowest_learned_rate(cells, attack, threshold=LEARNED_ASR).rate
    return sorted({max(rates), *([learned] if learned is not None else [])})


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` → [0, 1, 2]; anything else is one ConfigError."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated whole numbers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds is empty")
    return seeds


def split_seeds(split: str, text: str | None) -> list[int]:
    """The seeds of one split: validation 100 and above (default 100), test below 100 (default 0).

    A seed fixes the training set, so a recipe or threshold chosen on validation seed 0 would be chosen on
    test seed 0's training pairs and judged on them again."""
    if not text:
        return [VALIDATION_SEEDS_FROM if split == "validation" else 0]
    seeds = parse_seeds(text)
    if split == "validation":
        clash = [s for s in seeds if s < VALIDATION_SEEDS_FROM]
        where = f"seeds {VALIDATION_SEEDS_FROM} and above"
    else:
        clash = [s for s in seeds if s >= VALIDATION_SEEDS_FROM]
        where = f"seeds below {VALIDATION_SEEDS_FROM}"
    if clash:
        raise ConfigError(f"--split {split} takes {where}, got {clash}: a seed fixes the training pairs, so the "
                          f"validation and test splits use disjoint seeds (validation from {VALIDATION_SEEDS_FROM})")
    return seeds


def run_scaled(opts: argparse.Namespace) -> tuple[list[dict[str, Any]], Path]:
    """Run (or reuse) every cell of the plan; write the table and plots; return the rows and the results folder."""
    spec = scale_spec(opts)
    split_dir = SPLIT_DIRS[opts.split]
    attacks = [a for a in opts.attacks.split(",") if a] if opts.attacks else list(SCENE_ATTACKS)
    defenses = [d for d in opts.defenses.split(",") if d] if opts.defenses else list(SCALED_DEFENSES)
    seeds = split_seeds(opts.split, opts.seeds)
    rates = _rates(opts.poison_rates)
    entries = scaled_entries(opts)
    unknown = [a for a in attacks if a not in SCENE_ATTACKS] + [d for d in defenses if d not in entries]
    if unknown:
        raise ConfigError(f"unknown attack/defense {unknown}; attacks: {sorted(SCENE_ATTACKS)}, "
                          f"defenses: {sorted(entries)}")
    if 0 in rates and ("targeted" in attacks or spec.train_format != "csv"):  # checked before anything trains
        raise ConfigError("--poison-rates 0 (the clean reference) is for the trigger attacks on CSV data: drop "
                          "targeted from --attacks" + ("" if spec.train_format == "csv" else " and use --train-format csv"))
    cleaners = [d for d in defenses if entries[d].cleans]
    budget = parse_clean_budget(getattr(opts, "clean_budget", None))
    if budget is not None:
        if not cleaners:
            raise ConfigError(f"--clean-budget sizes the blocklist of the cleaning rows: add one of "
                              f"{', '.join(CLEANING_ENTRIES)} to --defenses")
        budget_count(budget, spec.n_train)  # checked before anything trains
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--scale {spec.name} trains on CUDA and no GPU is visible; pass --device cpu to run "
                          "it on the CPU anyway")
    if opts.defense_rates not in ("auto", "all"):
        wanted = _rates(opts.defense_rates, "--defense-rates")
        missing = [r for r in wanted if not any(abs(r - p) < 1e-12 for p in rates)]
        if missing:
            raise ConfigError(f"--defense-rates {missing} are not among --poison-rates {rates}")
    finetuners = [d for d in defenses if entries[d].finetunes]
    if finetuners:
        n_finetune = max(1, round(spec.finetune_fraction * spec.n_train))
        batch = int(flag_value(entries[finetuners[0]].flags, "--batch-size") or 0)
        if n_finetune < batch:
            raise ConfigError(f"{finetuners[0]} finetunes on {spec.finetune_fraction:.0%} of the training pairs, "
                              f"{n_finetune}, fewer than one batch ({batch}): raise --train-pairs to at least "
                              f"{round(batch / spec.finetune_fraction)}")
    if any(needs_wordnet(entries[d]) for d in defenses):
        ensure_wordnet_offline()
    overrides = parse_attack_params(opts.attack_param)
    out = Path(opts.out).resolve()
    corpora = {s: build_scene_corpus(out / "corpus" / f"{spec.name}-seed{s}", spec.n_train, spec.n_val, spec.n_test,
                                     seed=s, canvas=spec.canvas, workers=opts.threads) for s in seeds}
    params = {a: {**SCENE_ATTACKS[a], **overrides.get(a, {})} for a in attacks}
    poisoned: dict[tuple[str, float, int], tuple[Path, Manifest]] = {}

    def poisoned_set(attack: str, rate: float, seed: int) -> tuple[Path, Manifest]:
        key = (attack, rate, seed)
        if key not in poisoned:
            poisoned[key] = _poison(corpora[seed], out, attack, rate, seed, params[attack], split_dir,
                                    spec.train_format)
        return poisoned[key]

    # none at every rate first: it is the baseline, the finetuning start, the cleaning rows' detector, and it
    # decides the defenses' rates
    needs_none = "none" in defenses or bool(finetuners) or bool(cleaners)
    tags = {a: trigger_tag(a, params[a]) for a in attacks}
    plan = [Cell(a, r, "none", s, tags[a]) for a in attacks for r in rates for s in seeds] if needs_none else []
    rows: list[dict[str, Any]] = []
    done = 0

    def run(cell: Cell, total: int) -> dict[str, Any]:
        nonlocal done
        done += 1
        path, manifest = poisoned_set(cell.attack, cell.rate, cell.seed)
        label = f"{done}/{total} {cell.attack} {cell.rate:g} x {cell.defense} seed {cell.seed}"
        return run_cell(opts, spec, cell, corpora[cell.seed], split_dir, path, manifest, params[cell.attack], label)

    others = [d for d in defenses if d != "none"]
    total = len(plan) + len(attacks) * len(seeds) * len(others) * 2  # an estimate until none has run
    none_rows = [run(c, total) for c in plan]
    if "none" in defenses:
        rows += none_rows
    later = [Cell(a, r, d, s, tags[a]) for a in attacks
             for r in (defense_rates(opts.defense_rates, rates, none_rows, a)
                       if needs_none or opts.defense_rates != "auto" else rates)
             for d in others for s in seeds]
    total = len(plan) + len(later)
    rows += [run(c, total) for c in later]
    return rows, write_tables(rows, out / "results" / f"{spec.name}-{split_dir}", spec.name, opts.split,
                              command=opts.command)


def write_tables(rows: list[dict[str, Any]], folder: Path, scale: str, split: str, command: str | None) -> Path:
    """results.json / .csv / .md, runs.json (every seed's row) and the three plots of one scale and split."""
    cells = add_cleaning(aggregate(rows), rows)
    learned = [lowest_learned_rate(cells, a, threshold=LEARNED_ASR)
               for a in dict.fromkeys(r["attack"] for r in rows) if any(c["defense"] == "none" for c in cells)]
    write_results(cells, folder, scale, split=split, learned=learned, command=command)
    cleaning = format_cleaning(cells)
    if cleaning:  # the main table's columns fit every row; the cleaning numbers get a table of their own
        with open(folder / "results.md", "a") as f:
            f.write("\n" + cleaning)
    (folder / "runs.json").write_text(json.dumps(rows, indent=1))
    if any(r.get("asr") is not None for r in rows):  # a targeted-only sweep has no ASR to plot
        plot_asr_vs_rate(cells, folder / "asr_vs_rate.png", threshold=LEARNED_ASR)
        plot_accuracy_vs_asr(rows, folder / "accuracy_vs_asr.png")
    plot_curves(rows, folder / "curves.png")
    return folder


# Per-run numbers of a cleaning row, averaged over seeds like the table's metrics (counts, shares, detection).
CLEANING_METRICS = ("n_blocklisted", "poisons_blocklisted", "poisons_blocklisted_share", "n_poisoned", "clean_lost",
                    "clean_lost_share", "n_train_cleaned", "detect_auroc", "detect_pr_auc", "detect_fpr95",
                    "detect_seconds")


def _same_cell(row: dict[str, Any], cell: dict[str, Any]) -> bool:
    return all(math.isclose(float(row[k]), float(cell[k]), rel_tol=1e-9) if k == "poison_rate" else row[k] == cell[k]
               for k in CELL_KEYS)


def add_cleaning(cells: list[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``cells`` with ``<metric>_mean / _se / _n`` of :data:`CLEANING_METRICS`, ``blocklist_rule`` and
    ``clean_budget`` added to the cells of cleaning rows (other cells unchanged, so their JSON stays as it was)."""
    for cell in cells:
        members = [r for r in rows if "n_blocklisted" in r and _same_cell(r, cell)]
        if not members:
            continue
        for metric in CLEANING_METRICS:
            values = [r.get(metric) for r in members]
            cell[f"{metric}_mean"], cell[f"{metric}_se"] = mean_se(values)
            cell[f"{metric}_n"] = sum(v is not None and not math.isnan(float(v)) for v in values)
        for name in ("blocklist_rule", "clean_budget"):
            seen = {json.dumps(r.get(name)) for r in members}
            cell[name] = members[0].get(name) if len(seen) == 1 else "differs per seed"
    return cells


def _pm(cell: dict[str, Any], metric: str, scale: float = 100.0, digits: int = 1, unit: str = "") -> str:
    """``mean ± SE`` of a cell's metric (``—`` where undefined), multiplied by ``scale``."""
    mean, se = cell.get(f"{metric}_mean"), cell.get(f"{metric}_se")
    if mean is None or math.isnan(mean):
        return "—"
    spread = "—" if se is None or math.isnan(se) else f"{scale * se:.{digits}f}"
    return f"{scale * mean:.{digits}f}{unit} ± {spread}"


def _count(cell: dict[str, Any], metric: str) -> str:
    """A count's mean over seeds: a whole number when it is one, else one decimal."""
    mean = cell.get(f"{metric}_mean")
    if mean is None or math.isnan(mean):
        return "—"
    return f"{mean:.0f}" if float(mean).is_integer() else f"{mean:.1f}"


def format_cleaning(cells: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of the cleaning rows (empty when there are none): blocklist size, poisons caught, clean
    pairs lost and the detector's quality, mean ± SE over seeds."""
    chosen = [c for c in cells if "n_blocklisted_mean" in c]
    if not chosen:
        return ""
    attacks = list(dict.fromkeys(c["attack"] for c in cells))
    chosen.sort(key=lambda c: (attacks.index(c["attack"]), float(c["poison_rate"]), c["defense"]))
    lines = [
        "## Cleaning: detect → blocklist → retrain `none`",
        "",
        "`python -m safe_train.detect` (its default `auto` detector and reference) scores the poisoned training set "
        "with the final checkpoint of the cell's `none` run; `none` is then trained again from scratch without the "
        "blocklisted ids (its clean top-1 and ASR are in the table above). Poisons caught: blocklisted poisons of "
        "all poisons; clean lost: blocklisted clean pairs, and their share of all clean training pairs. Mean ± SE "
        "over seeds. Detection time is per run, on top of the `none` run and the retraining (wall time above).",
        "",
        "| attack | poison rate | defense | seeds | blocklist | blocklisted | poisons caught | clean lost "
        "| AUROC | PR-AUC | FPR@95 | detect time |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in chosen:
        seconds = c.get("detect_seconds_mean")
        lines.append(
            f"| {c['attack']} | {100 * float(c['poison_rate']):.4g}% | {c['defense']} | {c.get('n_seeds', '—')} | "
            f"{c.get('blocklist_rule', '—')} | {_count(c, 'n_blocklisted')} | {_count(c, 'poisons_blocklisted')} of "
            f"{_count(c, 'n_poisoned')} ({_pm(c, 'poisons_blocklisted_share', unit='%')}) | "
            f"{_count(c, 'clean_lost')} ({_pm(c, 'clean_lost_share', digits=2, unit='%')}) | "
            f"{_pm(c, 'detect_auroc', 1.0, 3)} | {_pm(c, 'detect_pr_auc', 1.0, 3)} | {_pm(c, 'detect_fpr95', 1.0, 3)} | "
            f"{'—' if seconds is None or math.isnan(seconds) else f'{seconds:.0f} s'} |")
    return "\n".join(lines) + "\n"


def main(opts: argparse.Namespace) -> int:
    """Run the scaled benchmark for parsed ``safe-train bench`` options; print the table."""
    opts.command = "safe-train bench " + " ".join(shlex.quote(a) for a in opts.argv)
    rows, folder = run_scaled(opts)
    print("\n" + (folder / "results.md").read_text())
    print(f"wrote {folder}/results.json, results.csv, results.md, runs.json and plots ({len(rows)} runs)")
    return 0
