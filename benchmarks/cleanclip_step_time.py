"""CleanCLIP's training step time against CLIP-only finetuning (``--defense none``), side by side.

Both run the same flags on the same real images (the MNIST benchmark's training set, built by
``safe_train.bench_data``), alternating, ``--repeats`` times each, the order flipping every repeat so a
drift in machine load favours neither. A step's time is ``batch_size / samples-per-second`` from its
"Train Epoch" log line (``--log-every-n-steps 1``); with ``--workers 0`` (default) it includes the
per-sample work (AutoAugment, EDA, the second preprocessing and tokenisation), i.e. everything CleanCLIP
adds. The first step of each run is dropped (warm-up). The ratio compares medians over all steps::

    python benchmarks/cleanclip_step_time.py [--repeats 2] [--threads 2] [--batch-size 64]

Goal: ratio <= 2.1 (CleanCLIP encodes twice the images and captions per step). Exits 0 whatever the
ratio (it is a measurement), 1 if a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GOAL = 2.1
KINDS = {"clip_only": ["--defense", "none"], "cleanclip": ["--defense", "cleanclip"]}
STEP_RE = re.compile(r"Train Epoch: \d+ \[\s*\d+/\d+ \([^)]*\)\] .*?Batch \(t\): (?P<avg>[0-9.]+), "
                     r"(?P<sps>[0-9.eE+-]+)/s")
_DIST_PREFIXES = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def flags(train_csv: Path, name: str, logs: Path, batch_size: int, workers: int, model: str) -> list[str]:
    """The flags both kinds share (the paper's finetuning optimizer settings, one epoch)."""
    return [
        "--model", model, "--train-data", str(train_csv), "--dataset-type", "csv",
        "--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", str(batch_size),
        "--epochs", "1", "--workers", str(workers), "--lr", "1e-5", "--warmup", "5", "--beta1", "0.9",
        "--beta2", "0.999", "--eps", "1e-8", "--wd", "0.1", "--device", "cpu", "--precision", "fp32",
        "--log-every-n-steps", "1", "--seed", "0", "--save-frequency", "0", "--name", name, "--log-root", str(logs),
    ]  # fmt: skip


def run_once(kind: str, repeat: int, args: argparse.Namespace, train_csv: Path) -> list[float]:
    """Step times (s) of one run, first step dropped."""
    name = f"{kind}-r{repeat}"
    logs = args.work_dir / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DIST_PREFIXES)}
    env["OMP_NUM_THREADS"] = str(args.threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "safe_train.main", *KINDS[kind],
           *flags(train_csv, name, logs, args.batch_size, args.workers, args.model)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log = logs / name / "out.log"
    text = log.read_text() if log.exists() else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    steps = [args.batch_size / float(m["sps"]) for m in STEP_RE.finditer(text) if float(m["sps"]) > 0]
    if len(steps) < 3:
        raise RuntimeError(f"{name}: fewer than 3 step lines in {log}")
    return steps[1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--batch-size", type=int, default=64, help="the paper's finetuning batch (default 64)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers (0: per-sample work is timed)")
    parser.add_argument("--model", default="st-tiny-vit")
    parser.add_argument("--train-csv", type=Path, default=None,
                        help="training CSV (default: the MNIST benchmark's train.csv, built under --work-dir)")
    parser.add_argument("--samples", type=int, default=1024,
                        help="train on the first N rows of the CSV (default 1024 = 16 steps of 64); 0 = all")
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench_out" / "cleanclip_step_time")
    args = parser.parse_args(argv)
    args.work_dir = args.work_dir.resolve()
    train_csv = args.train_csv
    if train_csv is None:
        from safe_train.bench_data import build_mnist_benchmark

        train_csv = build_mnist_benchmark(args.work_dir / "data", seed=0).train_csv
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.work_dir = args.work_dir / stamp
    args.work_dir.mkdir(parents=True)
    if args.samples:
        lines = Path(train_csv).read_text().splitlines(keepends=True)
        train_csv = args.work_dir / "train_subset.csv"
        train_csv.write_text("".join(lines[:args.samples + 1]))
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    per_run = []
    try:
        for repeat in range(args.repeats):
            order = list(KINDS) if repeat % 2 == 0 else list(reversed(KINDS))
            for kind in order:
                steps = run_once(kind, repeat, args, train_csv)
                times[kind] += steps
                per_run.append({"kind": kind, "repeat": repeat, "median_step_s": statistics.median(steps)})
                print(f"{kind:>10} repeat {repeat}: median step {statistics.median(steps) * 1000:.1f} ms "
                      f"over {len(steps)} steps", flush=True)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    medians = {kind: statistics.median(v) for kind, v in times.items()}
    ratio = medians["cleanclip"] / medians["clip_only"]
    result = {"ratio": ratio, "goal": GOAL, "median_step_s": medians, "batch_size": args.batch_size,
              "threads": args.threads, "workers": args.workers, "model": args.model, "runs": per_run}
    (args.work_dir / "result.json").write_text(json.dumps(result, indent=1))
    print(f"CleanCLIP / CLIP-only step time: {ratio:.2f} (goal <= {GOAL}; medians "
          f"{medians['cleanclip'] * 1000:.1f} ms vs {medians['clip_only'] * 1000:.1f} ms, batch {args.batch_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
