"""In-loop detection overhead per training step: ``--detect kdist`` vs no detection, alternating runs.

    python benchmarks/detect_overhead.py [--rounds 3] [--steps 12] [--batch-size 256] [--detect kdist]

Trains the tiny model (st-tiny-vit, CPU, fp32) for one epoch of ``--steps`` steps on real 32x32
digits (scikit-learn's, resampled), once without and once with ``--detect``, ``--rounds`` times,
alternating so that load changes on a shared machine hit both alike. The per-step time is
OpenCLIP's own ``Batch (t)`` log value (logged every step); the first two steps of a run are
discarded (warm-up). Prints the median step time of each and the overhead (goal <= 3%).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_dataset(directory: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    digits = load_digits()
    rng = np.random.default_rng(0)
    rows = ["filepath\ttitle"]
    for i, j in enumerate(rng.integers(0, len(digits.images), n)):
        grey = (digits.images[j] / 16.0 * 255).astype(np.uint8)
        path = directory / f"{i:05d}.png"
        Image.fromarray(grey).resize((32, 32), Image.BILINEAR).convert("RGB").save(path)
        rows.append(f"{path}\ta handwritten {words[digits.target[j]]}.")
    csv = directory / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def step_times(csv: Path, logs: Path, name: str, batch_size: int, threads: int, extra: list[str]) -> list[float]:
    cmd = [sys.executable, "-m", "safe_train.main", "--model", "st-tiny-vit", "--train-data", str(csv),
           "--dataset-type", "csv", "--csv-img-key", "filepath", "--csv-caption-key", "title",
           "--batch-size", str(batch_size), "--epochs", "1", "--workers", "0", "--lr", "1e-3", "--warmup", "2",
           "--seed", "0", "--device", "cpu", "--precision", "fp32", "--log-every-n-steps", "1",
           "--save-frequency", "0", "--name", name, "--log-root", str(logs), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{proc.stderr[-3000:]}")
    text = (logs / name / "out.log").read_text()
    times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", text)]
    return times[2:]


def callback_cost(batch_size: int, detect: str, threads: int, repeats: int = 50) -> float:
    """Median seconds of the detection callback's ``on_step_end`` alone on one batch of 128-d features."""
    import time

    import numpy as np
    import torch

    from safe_train.detection.callback import DetectionCallback, DetectionConfig
    from safe_train.interface import StepOutput, TrainContext, TrainPass
    from safe_train.state import SampleTable

    torch.set_num_threads(threads)
    args = argparse.Namespace(seed=0)
    cb = DetectionCallback(DetectionConfig(names=detect))
    ctx = TrainContext(args=args, table=SampleTable())
    cb.setup(ctx)
    norm = torch.nn.functional.normalize
    features = {"image_features": norm(torch.randn(batch_size, 128), dim=1),
                "text_features": norm(torch.randn(batch_size, 128), dim=1)}
    ids = torch.arange(batch_size)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        cb.on_step_end(ctx, StepOutput(TrainPass(), ids + i * batch_size, features, {}, i))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--detect", default="kdist")
    args = p.parse_args()
    cost = callback_cost(args.batch_size, args.detect, args.threads)
    print(f"detection callback alone: {cost * 1000:.2f} ms per step (batch {args.batch_size})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        csv = write_dataset(tmp / "data", args.steps * args.batch_size)
        base, det = [], []
        for r in range(args.rounds):
            base += step_times(csv, tmp / "logs", f"base{r}", args.batch_size, args.threads, [])
            det += step_times(csv, tmp / "logs", f"det{r}", args.batch_size, args.threads, ["--detect", args.detect])
            print(f"round {r}: without {statistics.median(base):.4f} s/step, with --detect {args.detect} "
                  f"{statistics.median(det):.4f} s/step", flush=True)
    b, d = statistics.median(base), statistics.median(det)
    print(f"\nbatch {args.batch_size}, {args.threads} thread(s), {len(base)} + {len(det)} steps")
    print(f"median step time: without {b:.4f} s, with --detect {args.detect} {d:.4f} s")
    print(f"overhead: {100 * (d / b - 1):+.2f}% end to end; callback alone {100 * cost / b:.2f}% of a step "
          f"(goal <= 3%)")


if __name__ == "__main__":
    main()
