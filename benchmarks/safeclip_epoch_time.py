"""SafeCLIP's epoch time against plain OpenCLIP training (``--defense none``), side by side.

Three kinds run on the same real images (the MNIST benchmark's 4,000 training pairs, tiny ViT, batch
256), alternating, ``--repeats`` times each, in this process:

- ``none``: OpenCLIP's loop;
- ``safeclip-pass``: SafeCLIP with the original's similarity pass before every split;
- ``safeclip-inloop``: SafeCLIP with ``--safeclip-similarity inloop`` (similarities from the training steps).

SafeCLIP runs 1 unimodal + 1 multimodal warmup epoch, then split epochs (risky pass + safe pass, plus
the similarity pass in ``pass`` mode). The measured quantity is the wall time of the split epochs
(what a long run is made of), per epoch, median over epochs and repeats; ``none`` is measured over the
same epoch indices. Goals (issue 4): <= 1.5 (pass), <= 1.2 (inloop)::

    python benchmarks/safeclip_epoch_time.py [--repeats 2] [--epochs 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KINDS = {
    "none": ["--defense", "none"],
    "safeclip-pass": ["--defense", "safeclip", "--safeclip-similarity", "pass"],
    "safeclip-inloop": ["--defense", "safeclip", "--safeclip-similarity", "inloop"],
}
SAFECLIP_WARMUP = ["--safeclip-unimodal-warmup-epochs", "1", "--safeclip-multimodal-warmup-epochs", "1",
                   "--safeclip-multimodal-lr", "1e-4"]
FIRST_MEASURED_EPOCH = 2  # the first split epoch


def _epoch_timer(sink: dict[int, float], ratios: list[float]):
    from safe_train.interface import Callback

    class EpochTimer(Callback):
        name = "bench_epoch_timer"

        def on_epoch_start(self, ctx) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, ctx) -> None:
            sink[ctx.epoch] = time.perf_counter() - self._start
            if ctx.table.has_column("safe") and ctx.epoch >= FIRST_MEASURED_EPOCH:
                ratios.append(float(ctx.table["safe"].mean()))

    return EpochTimer()


def run_once(kind: str, train_csv: Path, logs: Path, name: str, epochs: int) -> tuple[list[float], list[float]]:
    import safe_train.main as st_main

    times: dict[int, float] = {}
    ratios: list[float] = []
    original = st_main.create_callbacks
    st_main.create_callbacks = lambda args: original(args) + [_epoch_timer(times, ratios)]
    try:
        flags = [
            "--model", "st-tiny-vit", "--train-data", str(train_csv), "--dataset-type", "csv",
            "--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", "256",
            "--epochs", str(epochs), "--workers", "0", "--lr", "1e-3", "--warmup", "10", "--device", "cpu",
            "--precision", "fp32", "--seed", "0", "--save-frequency", "0", "--log-every-n-steps", "100",
            "--aug-cfg", "scale=(1.0, 1.0)", "--log-root", str(logs), "--name", name, *KINDS[kind],
        ]  # fmt: skip
        if kind != "none":
            flags += SAFECLIP_WARMUP
        code = st_main.main(flags)
    finally:
        st_main.create_callbacks = original
    if code != 0:
        raise SystemExit(f"{kind} run failed with exit code {code}")
    return [t for e, t in sorted(times.items()) if e >= FIRST_MEASURED_EPOCH], ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4, help="total epochs per run (>= 3; epochs 2.. are measured)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", default=None)
    opts = p.parse_args(argv)
    import torch

    from safe_train.augment import ensure_wordnet
    from safe_train.bench_data import build_mnist_benchmark

    ensure_wordnet()
    torch.set_num_threads(opts.threads)
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="safeclip-epoch-time-"))
    data = build_mnist_benchmark(work / "data", seed=0)
    epoch_times: dict[str, list[float]] = {k: [] for k in KINDS}
    safe_ratios: dict[str, list[float]] = {k: [] for k in KINDS}
    order = list(KINDS)
    for repeat in range(opts.repeats):
        for kind in order if repeat % 2 == 0 else order[::-1]:
            times, ratios = run_once(kind, data.train_csv, work / "runs", f"{kind}-{repeat}-{time.time_ns()}",
                                     opts.epochs)
            epoch_times[kind] += times
            safe_ratios[kind] += ratios
            print(f"repeat {repeat} {kind:<16} split-epoch times (s): {', '.join(f'{t:.1f}' for t in times)}",
                  flush=True)
    base = statistics.median(epoch_times["none"])
    print(f"\nmedian epoch time over epochs >= {FIRST_MEASURED_EPOCH}, {opts.repeats} repeats, {opts.threads} threads:")
    goals = {"safeclip-pass": 1.5, "safeclip-inloop": 1.2}
    for kind in KINDS:
        med = statistics.median(epoch_times[kind])
        ratio = med / base
        extra = ""
        if kind in goals:
            extra = (f"  ratio {ratio:.2f} (goal <= {goals[kind]}: {'met' if ratio <= goals[kind] else 'NOT met'}),"
                     f" safe ratio in measured epochs {statistics.mean(safe_ratios[kind]):.2f}")
        print(f"  {kind:<16} {med:7.2f} s{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
