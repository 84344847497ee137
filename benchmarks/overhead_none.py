"""Throughput of safe-train's training loop (``--defense none``) against upstream OpenCLIP, side by side.

Both trainers run the same flags on the same real images (MNIST digits, built by
``safe_train.bench_data``), alternating, ``--repeats`` times each; the order flips every repeat
(upstream-ours, ours-upstream, ...) so a drift in machine load does not favour one side. Each run's
``out.log`` gives one "Train Epoch" line per step (``--log-every-n-steps 1``); the step's time is
``batch_size / samples-per-second`` from that line (the "Batch (t)" value, to 6 significant digits
instead of 3). A run's throughput is ``batch_size / median(step times)`` without the first step of each
epoch (warm-up); the ratio compares the medians over repeats::

    python benchmarks/overhead_none.py [--repeats 3] [--threads 2] [--work-dir bench_out/overhead]

Exits 0 whatever the ratio (it is a measurement), 1 if a run fails or logs no steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BATCH_SIZE = 256
GOAL = 0.98
KINDS = ("open_clip_train", "safe_train")
UPSTREAM_CODE = (
    "from safe_train.model_configs import register_model_configs; register_model_configs(); "
    "import sys; from open_clip_train.main import main; sys.exit(main(sys.argv[1:]) or 0)"
)
# A train-pass step line (safe-train labels other passes "Train Epoch: E [pass] [...", which this skips).
STEP_RE = re.compile(
    r"Train Epoch: (?P<epoch>\d+) \[\s*(?P<samples>\d+)/\d+ \([^)]*\)\] .*?"
    r"Batch \(t\): (?P<avg>[0-9.]+), (?P<sps>[0-9.eE+-]+)/s"
)
# Variables that would make a child process join a distributed job (e.g. when run inside an allocation).
_DIST_PREFIXES = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class RunResult:
    """One training run and the step times parsed from its log."""

    kind: str
    repeat: int
    name: str
    log: str
    wall_s: float
    load_before: float
    steps: list[float]
    median_step_s: float
    min_step_s: float
    samples_per_s: float


def train_flags(train_csv: Path, name: str) -> list[str]:
    """The OpenCLIP flags both trainers get (the log folder is added per kind)."""
    return [
        "--model", "st-tiny-vit", "--train-data", str(train_csv), "--dataset-type", "csv",
        "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--batch-size", str(BATCH_SIZE), "--epochs", "1", "--workers", "0", "--lr", "1e-3",
        "--warmup", "5", "--device", "cpu", "--precision", "fp32", "--log-every-n-steps", "1",
        "--seed", "0", "--name", name,
    ]  # fmt: skip


def command(kind: str, train_csv: Path, name: str, logs: Path) -> list[str]:
    """The command line of one run of ``kind``."""
    flags = train_flags(train_csv, name)
    if kind == "open_clip_train":
        return [sys.executable, "-c", UPSTREAM_CODE, *flags, "--logs", str(logs)]
    return [sys.executable, "-m", "safe_train.main", "--defense", "none", *flags, "--log-root", str(logs)]


def child_env(threads: int) -> dict[str, str]:
    """The environment of a run: single process, ``threads`` intra-op threads, this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DIST_PREFIXES)}
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def parse_step_times(log_text: str) -> list[list[float]]:
    """Per-step times (s) of each epoch's train pass, from an ``out.log`` written with one line per step."""
    epochs: dict[int, list[float]] = {}
    for m in STEP_RE.finditer(log_text):
        sps = float(m["sps"])
        step = BATCH_SIZE / sps if sps > 0 else float(m["avg"])
        epochs.setdefault(int(m["epoch"]), []).append(step)
    return [epochs[e] for e in sorted(epochs)]


def tail(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.splitlines()[-lines:])


def run_once(kind: str, repeat: int, train_csv: Path, run_root: Path, threads: int) -> RunResult:
    """Run one training of ``kind`` in a fresh log folder; raise ``RuntimeError`` if it fails."""
    name = f"{kind}-r{repeat}"
    logs = run_root / name
    logs.mkdir(parents=True, exist_ok=False)
    cmd = command(kind, train_csv, name, logs)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(threads), capture_output=True, text=True)
    wall = time.perf_counter() - start
    (logs / "stdout.txt").write_text(proc.stdout, encoding="utf-8")
    (logs / "stderr.txt").write_text(proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} repeat {repeat} exited with {proc.returncode}; stderr tail:\n{tail(proc.stderr)}")
    log_path = logs / name / "out.log"
    epochs = parse_step_times(log_path.read_text(encoding="utf-8")) if log_path.is_file() else []
    steps = [t for per_epoch in epochs for t in per_epoch[1:]]
    if not steps:
        raise RuntimeError(f"{kind} repeat {repeat}: no step lines after warm-up in {log_path}; "
                           f"stderr tail:\n{tail(proc.stderr)}")
    median = statistics.median(steps)
    return RunResult(kind, repeat, name, str(log_path), wall, load_before, steps, median, min(steps),
                     BATCH_SIZE / median)


def summarize(results: list[RunResult]) -> dict[str, float]:
    """Median over repeats of each kind's samples/s, and the ratio safe_train / open_clip_train."""
    sps = {k: statistics.median(r.samples_per_s for r in results if r.kind == k) for k in KINDS}
    best = {k: BATCH_SIZE / min(r.min_step_s for r in results if r.kind == k) for k in KINDS}
    return {
        "open_clip_train_samples_per_s": sps["open_clip_train"],
        "safe_train_samples_per_s": sps["safe_train"],
        "ratio": sps["safe_train"] / sps["open_clip_train"],
        "ratio_fastest_step": best["safe_train"] / best["open_clip_train"],
        "goal": GOAL,
    }


def print_table(results: list[RunResult], summary: dict[str, float]) -> None:
    """The per-run table and the ratio lines."""
    print(f"\n{'run':<16} {'repeat':>6} {'steps':>5} {'median step s':>13} {'min step s':>10} "
          f"{'samples/s':>10} {'wall s':>7} {'load':>5}")
    for r in sorted(results, key=lambda r: (r.kind, r.repeat)):
        print(f"{r.kind:<16} {r.repeat:>6} {len(r.steps):>5} {r.median_step_s:>13.4f} {r.min_step_s:>10.4f} "
              f"{r.samples_per_s:>10.1f} {r.wall_s:>7.1f} {r.load_before:>5.2f}")
    print(f"\nmedian samples/s: open_clip_train {summary['open_clip_train_samples_per_s']:.1f}, "
          f"safe_train {summary['safe_train_samples_per_s']:.1f}")
    print(f"ratio from fastest steps (less sensitive to other load): {summary['ratio_fastest_step']:.3f}")
    print(f"ratio safe_train/open_clip_train samples/s: {summary['ratio']:.3f} (goal >= {GOAL})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=Path("bench_out/overhead"),
                   help="data cache and run logs (default: bench_out/overhead)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each kind (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run (default: 2)")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: WORK_DIR/overhead_none.json)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM -> SystemExit, so subprocess.run kills the running trainer instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from safe_train.bench_data import build_mnist_benchmark

    work_dir = args.work_dir.resolve()
    data = build_mnist_benchmark(work_dir / "data", seed=0)
    run_root = work_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    print(f"data: {data.train_csv} ({data.n_train} rows), batch {BATCH_SIZE}, OMP_NUM_THREADS={args.threads}")
    print(f"logs: {run_root}")

    results: list[RunResult] = []
    for repeat in range(args.repeats):
        order = KINDS if repeat % 2 == 0 else KINDS[::-1]
        for kind in order:
            try:
                r = run_once(kind, repeat, data.train_csv, run_root, args.threads)
            except (RuntimeError, OSError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            results.append(r)
            print(f"  {kind:<16} repeat {repeat}: {r.samples_per_s:8.1f} samples/s "
                  f"(median step {r.median_step_s:.4f} s, wall {r.wall_s:.1f} s)", flush=True)

    summary = summarize(results)
    print_table(results, summary)
    out = (args.out or work_dir / "overhead_none.json").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "batch_size": BATCH_SIZE,
        "threads": args.threads,
        "repeats": args.repeats,
        "train_csv": str(data.train_csv),
        "n_train": data.n_train,
        "runs": [asdict(r) for r in results],
        "summary": summary,
    }
    out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
