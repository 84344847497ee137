"""Standalone detection throughput on the CPU: ``safe-train detect`` with its default (``auto``), embed and score.

    python benchmarks/detect_throughput.py --run /work/bench_medium/runs/medium-test-badnets-rate0.01-none-seed0 \\
        [--backends torch,torch-fp32,faiss] [--limit 20000] [--threads 1] [--cli-backends torch]
    python benchmarks/detect_throughput.py --model st-tiny-rn-scenes --checkpoint ck.pt --train-data train.csv \\
        [--manifest manifest.json]
    python benchmarks/detect_throughput.py --demo 256      # a smoke run: sklearn digits, a random-init st-tiny-vit

Issue 16 asks for samples/s of the standalone command on real images. This script calls the command's own
functions (``safe_train.detect.embed`` and ``safe_train.detect.score``, with the parser's defaults: ``--detectors
auto --reference auto``, i.e. every image against a random sample of ``min(N, 32768)`` images) and times them
separately: the embedding once (it does not depend on the kNN backend), then the scoring once per backend
variant, so the backends' ratios come from one run on the same embeddings:

- ``torch`` / ``faiss`` / ``auto``: ``--backend`` as given (``auto`` only where ``safe_train`` has it); the
  torch backend's precision stays the library default (``auto``: bf16 candidates on CPUs with AMX or
  AVX512-BF16 for large searches, else fp32);
- ``torch-fp32`` / ``torch-bf16``: the torch backend with that precision forced (the command has no flag for
  it; ``safe_train.detect.global_scores`` is wrapped for the call), to show what the precision choice costs.

Wall time and CPU time (``time.process_time``: all threads of this process) are both reported: on a shared
machine the wall time also counts other processes. ``--cli-backends`` also runs ``python -m safe_train.detect``
end to end in a child process (embedding again, writing scores, report, histogram and blocklist) as a cross-check
of the in-process numbers. With a manifest the AUROC of every variant is printed, and every variant's scores are
compared with the first one's (the backends are exact: they should agree).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from detect_overhead import Clock, machine, write_dataset  # noqa: E402


def _params(run: Path) -> dict[str, str]:
    """A run's ``params.txt`` as a dict (``key: value`` lines)."""
    pairs = (line.split(": ", 1) for line in (run / "params.txt").read_text().splitlines() if ": " in line)
    return {key: value.strip() for key, value in pairs}


def from_run(run: Path) -> tuple[str, Path, Path, Path | None]:
    """(model, last checkpoint, training CSV, manifest beside it or None) of a training run folder."""
    params = _params(run)
    checkpoints = sorted((run / "checkpoints").glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not checkpoints:
        raise SystemExit(f"no checkpoints/epoch_*.pt under {run}")
    data = Path(params["train_data"])
    manifest = data.parent / "manifest.json"
    return params["model"], checkpoints[-1], data, manifest if manifest.is_file() else None


def limit_csv(csv: Path, limit: int, directory: Path) -> Path:
    """The first ``limit`` data rows of ``csv`` (sample ids are data rows, so a manifest still matches)."""
    with open(csv) as f:
        lines = [next(f) for _ in range(limit + 1)] if limit else f.readlines()
    out = directory / "train_limited.csv"
    out.write_text("".join(lines))
    return out


def demo_inputs(n: int, directory: Path) -> tuple[str, Path, Path]:
    """A tiny offline setup: ``n`` sklearn digits as a CSV and a random-init ``st-tiny-vit`` state dict."""
    import torch

    from safe_train.evaluate import load_model

    (directory / "data").mkdir(parents=True, exist_ok=True)
    csv = write_dataset(directory / "data", n)
    model, _, _ = load_model("st-tiny-vit", None)
    checkpoint = directory / "init.pt"
    torch.save(model.state_dict(), checkpoint)
    return "st-tiny-vit", checkpoint, csv


@contextlib.contextmanager
def variant_settings(args: argparse.Namespace, variant: str) -> Iterator[None]:
    """``args.backend`` (and, for ``torch-<precision>``, that precision forced on the command's global scoring)
    for the block; everything restored afterwards."""
    import safe_train.detect as detect

    backend, _, precision = variant.partition("-")
    before_backend, before_scores = args.backend, detect.global_scores
    args.backend = backend
    if precision:
        detect.global_scores = functools.partial(before_scores, precision=precision)
    try:
        yield
    finally:
        args.backend, detect.global_scores = before_backend, before_scores


def check_variants(variants: list[str]) -> None:
    """Refuse unknown variants before anything slow runs."""
    from safe_train.detection.knn import BACKENDS, PRECISIONS, faiss_available

    for variant in variants:
        backend, _, precision = variant.partition("-")
        if backend not in BACKENDS or (precision and (backend != "torch" or precision not in PRECISIONS)):
            raise SystemExit(f"unknown variant {variant!r}: one of {', '.join(BACKENDS)} or torch-<precision> "
                             f"({', '.join(PRECISIONS)})")
        if backend == "faiss" and not faiss_available():
            raise SystemExit("variant faiss needs faiss (pip install faiss-cpu)")


@dataclass
class CliRun:
    """One end-to-end ``python -m safe_train.detect`` child: its report and its wall/CPU seconds."""

    variant: str
    report: dict[str, Any]
    wall: float
    cpu: float


def run_cli(detect_argv: list[str], variant: str, out: Path, threads: int) -> CliRun:
    """The command itself in a child process (``--backend`` from the variant; a forced precision cannot be passed)."""
    backend = variant.partition("-")[0]
    cmd = [sys.executable, "-m", "safe_train.detect", *detect_argv, "--out", str(out), "--backend", backend]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"safe_train.detect failed:\n{err.read().decode()[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return CliRun(variant, report, wall, usage.ru_utime + usage.ru_stime)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="A training run folder: model from params.txt, its last "
                        "checkpoint, its training CSV and the manifest beside it.")
    source.add_argument("--checkpoint", type=Path, help="A checkpoint (with --model and --train-data).")
    source.add_argument("--demo", type=int, metavar="N", help="A smoke run on N sklearn digits with a random-init "
                        "st-tiny-vit (numbers mean nothing).")
    p.add_argument("--model", help="With --checkpoint: the model config.")
    p.add_argument("--train-data", type=Path, help="With --checkpoint: the training CSV.")
    p.add_argument("--manifest", type=Path, default=None, help="With --checkpoint: a poison manifest (AUROC).")
    p.add_argument("--limit", type=int, default=0, help="Only the first N rows of the CSV (0: all).")
    p.add_argument("--backends", default="torch,faiss", help="Comma-separated scoring variants: torch, faiss, "
                   "auto, torch-fp32, torch-bf16.")
    p.add_argument("--threads", type=int, default=1,
                   help="Torch threads (0: torch's default, every core). 1 by default: with more, OpenMP threads spin "
                        "while a shared machine deschedules their partners, which inflates the CPU time.")
    p.add_argument("--batch-size", type=int, default=256, help="Embedding batch size (the command's default).")
    p.add_argument("--cli-backends", default="", help="Comma-separated variants to also run end to end as "
                   "`python -m safe_train.detect` children (each embeds again).")
    p.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from safe_train.detect import auto_reference_size, default_threshold, embed, score
    from safe_train.detect import build_parser as detect_parser
    from safe_train.detection.callback import score_metrics
    from safe_train.manifest import Manifest

    variants = [v.strip() for v in args.backends.split(",") if v.strip()]
    cli_variants = [v.strip() for v in args.cli_backends.split(",") if v.strip()]
    check_variants(variants + cli_variants)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.run:
            model, checkpoint, data, manifest = from_run(args.run)
        elif args.demo:
            (model, checkpoint, data), manifest = demo_inputs(args.demo, tmp_path), None
        else:
            if not (args.model and args.train_data):
                raise SystemExit("--checkpoint needs --model and --train-data")
            model, checkpoint, data, manifest = args.model, args.checkpoint, args.train_data, args.manifest
        if args.limit:
            data = limit_csv(data, args.limit, tmp_path)
        detect_argv = ["--model", model, "--checkpoint", str(checkpoint), "--train-data", str(data),
                       "--dataset-type", "csv", "--device", "cpu", "--batch-size", str(args.batch_size)]
        dargs = detect_parser().parse_args([*detect_argv, "--out", str(tmp_path / "out")])
        detectors = [d.strip() for d in dargs.detectors.split(",")]
        print(f"machine: {machine()} (shared: wall times include other processes' load; CPU times much less)")
        print(f"model {model}, checkpoint {checkpoint}, data {data}, {threads} torch thread(s)", flush=True)

        embed_clock = Clock()
        with embed_clock.measure():
            ids, image, text = embed(dargs)
        n = len(ids)
        print(f"embedded {n} samples: wall {embed_clock.wall:.1f} s, cpu {embed_clock.cpu:.1f} s", flush=True)
        labels = Manifest.load(manifest).poisoned_mask(ids) if manifest else None
        threshold = default_threshold(dargs, detectors, n)

        rows, reference_scores = [], None
        for variant in variants:
            clock = Clock()
            with variant_settings(dargs, variant), clock.measure():
                values = score(dargs, detectors, image, text)[detectors[0]]
            row: dict[str, Any] = {"variant": variant, "score_wall": clock.wall, "score_cpu": clock.cpu}
            if threshold is not None:
                flagged = values > threshold
                row["blocklisted"] = int(flagged.sum())
                row["blocklisted_poisons"] = int((flagged & labels).sum()) if labels is not None else None
            if labels is not None:
                row["auroc"] = score_metrics({"s": values}, labels).get("s", {}).get("auroc")
            if reference_scores is None:
                reference_scores = values
            row["max_abs_diff_vs_first"] = float(np.max(np.abs(values - reference_scores))) if n else 0.0
            rows.append(row)
            print(f"scored with {variant}: wall {clock.wall:.1f} s, cpu {clock.cpu:.1f} s", flush=True)

        cli_runs = [run_cli(detect_argv, v, tmp_path / f"cli-{v}", threads) for v in cli_variants]

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n== safe-train detect --detectors auto --reference auto: {n} samples, reference "
          f"{auto_reference_size(n)} images, {threads} thread(s), peak RSS {peak_gb:.2f} GiB ==")
    print(f"embed: wall {embed_clock.wall:.1f} s ({n / embed_clock.wall:.0f} samples/s), cpu {embed_clock.cpu:.1f} s "
          f"({n / embed_clock.cpu:.0f} samples per CPU-s)")
    header = (f"{'variant':<11} {'score wall':>10} {'score cpu':>9} {'score/s':>8} {'embed+score wall':>16} "
              f"{'total/s':>8} {'total/CPU-s':>11} {'vs first':>8} {'AUROC':>6} {'blocklist':>10} {'max|diff|':>9}")
    print(header)
    first_wall = rows[0]["score_wall"] if rows else 0.0
    for row in rows:
        total_wall = embed_clock.wall + row["score_wall"]
        total_cpu = embed_clock.cpu + row["score_cpu"]
        auroc = f"{row['auroc']:.4f}" if row.get("auroc") is not None else "-"
        blocked = (f"{row['blocklisted']}" + (f" ({row['blocklisted_poisons']}p)" if row.get("blocklisted_poisons")
                                              is not None else "")) if "blocklisted" in row else "-"
        row.update(total_wall=total_wall, total_cpu=total_cpu, samples_per_s=n / total_wall)
        print(f"{row['variant']:<11} {row['score_wall']:>8.1f} s {row['score_cpu']:>7.1f} s "
              f"{n / row['score_wall']:>8.0f} {total_wall:>14.1f} s {n / total_wall:>8.0f} {n / total_cpu:>11.0f} "
              f"{row['score_wall'] / first_wall:>7.2f}x {auroc:>6} {blocked:>10} {row['max_abs_diff_vs_first']:>9.2g}")
    print("(score/s, total/s: samples per wall second; total/CPU-s: per CPU second of this process; 'vs first': "
          "score wall time relative to the first variant; blocklist: above sqrt(2 ln m), '(Np)': N poisons)")
    for run in cli_runs:
        r = run.report
        print(f"end to end `python -m safe_train.detect --backend {run.variant}`: wall {run.wall:.1f} s, cpu "
              f"{run.cpu:.1f} s ({r['num_samples'] / run.wall:.0f} samples/s incl. start-up and writing); its "
              f"report: embed {r['embed_seconds']:.1f} s, score {r['score_seconds']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine(), "model": model, "checkpoint": str(checkpoint), "samples": n, "threads": threads,
            "embed_wall": embed_clock.wall, "embed_cpu": embed_clock.cpu, "variants": rows, "peak_rss_gib": peak_gb,
            "cli": [{"variant": c.variant, "wall": c.wall, "cpu": c.cpu, "embed_seconds": c.report["embed_seconds"],
                     "score_seconds": c.report["score_seconds"]} for c in cli_runs]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
