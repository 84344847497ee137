"""Global ``auto`` scoring at scale (10^5 to 10^6 x 128 embeddings): time and peak memory per kNN backend,
against the time of one training epoch over the same samples.

    python benchmarks/detect_global_scale.py --sizes 100000,250000,500000,1000000 \\
        [--backends torch,torch-fp32,faiss] [--setting detect] [--poisons 1000] [--threads 1] \\
        [--max-predicted-cpu 3600] [--step-model st-tiny-vit] [--json out.json]

Issue 16's goal: scoring N samples globally takes less than one training epoch over those N samples. The data are
synthetic unit vectors (``--clusters`` clean clusters of images, their captions offset from them) with a planted
tight cluster of ``--poisons`` poisoned images (a learnt trigger collapses them) whose captions name one target
class; the AUROC of the planted poisons is printed as a sanity check. Settings, as the code would run them:

- ``detect``: ``safe-train detect``'s default (``--detectors auto --reference auto``): every image against a random
  sample of ``min(N, 32768)`` images (``safe_train.detect.score``);
- ``callback``: the in-loop callback with ``--detect auto --detect-reference global --detect-reference-size M``
  (``--reference-size``, default 32768 pairs: images and captions, 2M points): the epoch's rows fed through
  ``on_step_end`` in batches of 256, then ``on_epoch_end`` timed (global scoring, table, npz, histogram);
  ``--reference-size 0`` is the callback's default, the whole epoch as reference: quadratic in N.

Every (setting, size, variant) runs in a fresh child process, so that its peak memory is its own: the peak RSS
during scoring is ``VmHWM`` after resetting it (``/proc/self/clear_refs``) once the data exist, next to the RSS of
the data alone. Variants: ``torch`` / ``faiss`` / ``auto`` (``--backend``; torch's precision stays the library
default, which on CPUs with AMX or AVX512-BF16 picks bf16 candidates for large searches) and ``torch-fp32`` /
``torch-bf16`` (that precision forced). Wall and CPU time (``time.process_time``, all threads) are both printed:
on a shared machine the wall time also counts other processes. A run whose CPU time, extrapolated linearly from a
smaller size of the same variant, exceeds ``--max-predicted-cpu``, or whose extrapolated peak RSS exceeds
``--max-memory-fraction`` of the memory available when it would start, is skipped and shown as the prediction;
each child volunteers for the OOM killer (``oom_score_adj`` 1000), so that on a shared machine a run that
still runs out of memory ends itself, not another job.

The epoch is an ESTIMATE: the median wall and CPU time of an in-process fp32 training step of ``--step-model``
at batch 256 (no data loading, so the estimate is low and the comparison errs against scoring) times
``ceil(N / 256)`` steps.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from detect_overhead import Clock, PartTimer, machine, set_threads, train_step_cost  # noqa: E402

DIM = 128
BATCH = 256
CHUNK = 1 << 16  # rows generated at a time: bounds the float64 temporaries of the generator


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_embeddings(n: int, poisons: int, clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image [n, 128], caption [n, 128], poisoned mask [n])``, unit float32 rows.

    Clean image ``i`` of class ``c``: ``centre_c`` plus noise of norm about 0.6; its caption: ``text_centre_c``
    (the class centre offset by a fixed random direction of norm 0.5) plus its own noise. Poisons: ``poisons``
    random rows whose images sit within noise of norm about 0.05 of one poison centre (a learnt trigger: a tight
    cluster) and whose captions are of class 0 (the target)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((clusters, DIM), dtype=np.float32))
    text_centres = _unit(centres + 0.5 * _unit(rng.standard_normal((clusters, DIM), dtype=np.float32)))
    poison_centre = _unit(rng.standard_normal((1, DIM), dtype=np.float32))
    labels = rng.integers(0, clusters, n)
    image = np.empty((n, DIM), np.float32)
    text = np.empty((n, DIM), np.float32)
    spread = np.float32(0.6 / math.sqrt(DIM))
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        rows = labels[start:stop]
        image[start:stop] = _unit(centres[rows] + spread * rng.standard_normal((stop - start, DIM), dtype=np.float32))
        text[start:stop] = _unit(text_centres[rows] + spread * rng.standard_normal((stop - start, DIM),
                                                                                    dtype=np.float32))
    poisoned = np.zeros(n, bool)
    chosen = rng.choice(n, min(poisons, n), replace=False)
    poisoned[chosen] = True
    tight = np.float32(0.05 / math.sqrt(DIM))
    image[chosen] = _unit(poison_centre + tight * rng.standard_normal((len(chosen), DIM), dtype=np.float32))
    text[chosen] = _unit(text_centres[0] + spread * rng.standard_normal((len(chosen), DIM), dtype=np.float32))
    return image, text, poisoned


# ---- memory -----------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (None where there is no procfs)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def available_gib() -> float | None:
    """``MemAvailable`` of the machine in GiB (None where there is no procfs)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return None


def volunteer_for_oom_killer() -> None:
    """``oom_score_adj`` 1000 for this measurement process: should a large run exhaust a shared machine's memory,
    the kernel ends this process first, not another user's job."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5), so the next peak is the scoring's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ---- one measurement (child process) ----------------------------------------------------------------------
@contextlib.contextmanager
def forced_precision(module: Any, precision: str) -> Iterator[None]:
    """``module.global_scores`` with ``precision=`` added for the block (the command and the callback have no flag
    for it); restored afterwards."""
    before = module.global_scores
    if precision:
        module.global_scores = functools.partial(before, precision=precision)
    try:
        yield
    finally:
        module.global_scores = before


def score_detect(image: np.ndarray, text: np.ndarray, variant: str) -> np.ndarray:
    """``safe-train detect``'s default scoring (``safe_train.detect.score``, the parser's defaults)."""
    import safe_train.detect as detect

    backend, _, precision = variant.partition("-")
    args = detect.build_parser().parse_args(["--model", "x", "--checkpoint", "x", "--train-data", "x",
                                             "--out", "x", "--backend", backend, "--device", "cpu"])
    with forced_precision(detect, precision):
        return detect.score(args, ["auto"], image, text)["auto"]


def score_callback(image: np.ndarray, text: np.ndarray, variant: str, reference_size: int | None,
                   run_dir: str) -> tuple[np.ndarray, Clock]:
    """The in-loop callback, global reference: rows fed by ``on_step_end``, then ``on_epoch_end`` (whose clock is
    returned: the epoch's feed is per-step work, measured in detect_overhead.py)."""
    import torch

    from safe_train import dist
    from safe_train.detection import callback as callback_module
    from safe_train.detection.callback import DetectionCallback, DetectionConfig
    from safe_train.interface import StepOutput, TrainContext, TrainPass
    from safe_train.state import SampleTable

    backend, _, precision = variant.partition("-")
    cb = DetectionCallback(DetectionConfig(names="auto", reference="global", reference_size=reference_size,
                                           backend=backend))
    ctx = TrainContext(args=argparse.Namespace(seed=0, log_base_path=run_dir), table=SampleTable())
    cb.setup(ctx)
    cb.on_epoch_start(ctx)
    image_t, text_t = torch.from_numpy(image), torch.from_numpy(text)
    for i, start in enumerate(range(0, len(image), BATCH)):
        ids = torch.arange(start, min(len(image), start + BATCH))
        ctx.table.observe(ids.numpy())
        features = {"image_features": image_t[ids], "text_features": text_t[ids]}
        cb.on_step_end(ctx, StepOutput(TrainPass(), ids, features, {}, i))
    ctx.table.sync(dist.gather_arrays)
    clock = Clock()
    with forced_precision(callback_module, precision), clock.measure():
        cb.on_epoch_end(ctx)
    scores = ctx.table.get("score_auto", np.arange(len(image))).astype(np.float64)
    return scores, clock


def worker(setting: str, n: int, variant: str, poisons: int, clusters: int, reference_size: int | None,
           threads: int) -> dict[str, Any]:
    """One measurement in this (fresh) process; returns its numbers."""
    from safe_train.detect import auto_reference_size
    from safe_train.detection import callback as callback_module
    from safe_train.detection.callback import score_metrics

    set_threads(threads)
    image, text, poisoned = make_embeddings(n, poisons, clusters)
    data_kib = _status_kib("VmRSS")
    peak_reset = reset_peak_rss()
    parts = PartTimer()
    histogram = Clock()
    total = Clock()
    write_histogram = callback_module.write_histogram

    def timed_histogram(*args: Any, **kwargs: Any) -> None:
        with histogram.measure():
            write_histogram(*args, **kwargs)

    callback_module.write_histogram = timed_histogram
    try:
        with parts.patched(["auto"]), tempfile.TemporaryDirectory() as run_dir:
            if setting == "detect":
                with total.measure():
                    scores = score_detect(image, text, variant)
                reference = auto_reference_size(n)
            else:
                scores, total = score_callback(image, text, variant, reference_size, run_dir)
                reference = 2 * min(n, reference_size or n)
    finally:
        callback_module.write_histogram = write_histogram
    peak_kib = _status_kib("VmHWM")
    parts.parts["histogram"] = histogram
    auroc = score_metrics({"auto": scores}, poisoned).get("auto", {}).get("auroc")
    return {"setting": setting, "n": n, "variant": variant, "threads": threads, "reference_points": reference,
            "wall": total.wall, "cpu": total.cpu, "auroc": auroc,
            "data_rss_gib": data_kib / 2**20 if data_kib else None,
            "peak_rss_gib": peak_kib / 2**20 if peak_kib and peak_reset else None,
            "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "parts": {name: {"wall": c.wall, "cpu": c.cpu} for name, c in parts.parts.items()}}


def run_child(setting: str, n: int, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """``worker`` in a fresh interpreter (its peak memory is its own); its JSON line back."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--setting", setting, "--sizes", str(n),
           "--backends", variant, "--poisons", str(args.poisons), "--clusters", str(args.clusters),
           "--reference-size", str(args.reference_size), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"setting": setting, "n": n, "variant": variant, "error": proc.stderr.strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predicted_cpu(done: list[dict[str, Any]], setting: str, variant: str, n: int) -> float | None:
    """Linear extrapolation of the CPU time from the largest measured size of this setting and variant (the
    reference is fixed above 32,768 samples, so the query kNN grows linearly; the whole-epoch reference
    grows quadratically)."""
    same = [r for r in done if r["setting"] == setting and r["variant"] == variant and "cpu" in r and r["n"] < n]
    if not same:
        return None
    last = max(same, key=lambda r: r["n"])
    power = 2 if setting == "callback" and last.get("whole") else 1
    return last["cpu"] * (n / last["n"]) ** power


def predicted_peak_gib(done: list[dict[str, Any]], setting: str, variant: str, n: int) -> float | None:
    """Linear extrapolation of the peak RSS from the two largest measured sizes of this setting and variant (the
    neighbour arrays are ``N x K``), or proportional from one."""
    same = sorted((r for r in done if r["setting"] == setting and r["variant"] == variant
                   and r.get("peak_rss_gib") and r["n"] < n), key=lambda r: r["n"])
    if not same:
        return None
    if len(same) == 1:
        return same[0]["peak_rss_gib"] * n / same[0]["n"]
    a, b = same[-2], same[-1]
    slope = (b["peak_rss_gib"] - a["peak_rss_gib"]) / (b["n"] - a["n"])
    return b["peak_rss_gib"] + slope * (n - b["n"])


def _auroc(row: dict[str, Any]) -> str:
    """The planted poisons' AUROC, or '-' without poisons (one class only)."""
    return "-" if row.get("auroc") is None else f"{row['auroc']:.4f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,250000,500000,1000000", help="Comma-separated sample counts.")
    p.add_argument("--backends", default="torch,faiss", help="Comma-separated variants: torch, faiss, auto, "
                   "torch-fp32, torch-bf16.")
    p.add_argument("--setting", default="detect", choices=("detect", "callback"))
    p.add_argument("--reference-size", type=int, default=32768, help="callback: --detect-reference-size in pairs "
                   "(0: the callback's default, the whole epoch).")
    p.add_argument("--poisons", type=int, default=1000, help="Planted poisons (one tight cluster).")
    p.add_argument("--clusters", type=int, default=100, help="Clean clusters.")
    p.add_argument("--threads", type=int, default=1,
                   help="Torch threads, scoring and the training step alike (1: with more, OpenMP threads spin while "
                        "a shared machine deschedules their partners, which inflates the CPU time).")
    p.add_argument("--max-predicted-cpu", type=float, default=3600.0,
                   help="Skip a run whose extrapolated CPU seconds exceed this.")
    p.add_argument("--max-memory-fraction", type=float, default=0.7,
                   help="Skip a run whose extrapolated peak RSS exceeds this share of the machine's available memory "
                        "(MemAvailable) when it would start: other jobs share the machine.")
    p.add_argument("--step-model", default="st-tiny-vit", help="Model of the training-step estimate ('' to skip).")
    p.add_argument("--step-time", type=float, default=None, help="Use this step time (s) instead of measuring it.")
    p.add_argument("--json", type=Path, default=None, help="Also write every result here.")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    variants = [v.strip() for v in args.backends.split(",") if v.strip()]
    reference_size = args.reference_size or None
    if args.worker:  # a child of this script: its own process, so it may volunteer for the OOM killer
        volunteer_for_oom_killer()
        print(json.dumps(worker(args.setting, sizes[0], variants[0], args.poisons, args.clusters, reference_size,
                                args.threads)))
        return 0
    from detect_throughput import check_variants

    check_variants(variants)
    print(f"machine: {machine()} (shared: wall times include other processes' load; CPU times much less)")
    reference = ("reference min(N, 32768) images" if args.setting == "detect" else
                 f"reference {'the whole epoch' if reference_size is None else f'{reference_size} pairs'}")
    print(f"setting {args.setting} ({reference}), {args.poisons} planted poisons, {args.threads} thread(s)", flush=True)
    step = None
    if args.step_time:
        step = Clock(args.step_time, args.step_time)
    elif args.step_model:
        set_threads(args.threads)
        step = train_step_cost(args.step_model, BATCH, steps=4)
        print(f"training step ({args.step_model}, batch {BATCH}, fp32, in process, no data loading): wall "
              f"{step.wall:.3f} s, cpu {step.cpu:.3f} s", flush=True)

    results: list[dict[str, Any]] = []
    for n in sizes:
        for variant in variants:
            guess = predicted_cpu(results, args.setting, variant, n)
            if guess is not None and guess > args.max_predicted_cpu:
                results.append({"setting": args.setting, "n": n, "variant": variant, "skipped": True,
                                "predicted_cpu": guess})
                print(f"n={n} {variant}: skipped, predicted {guess:.0f} s CPU > --max-predicted-cpu", flush=True)
                continue
            peak = predicted_peak_gib(results, args.setting, variant, n)
            free = available_gib()
            if peak is not None and free is not None and peak > args.max_memory_fraction * free:
                results.append({"setting": args.setting, "n": n, "variant": variant, "skipped": True,
                                "predicted_cpu": guess, "predicted_peak_gib": peak, "available_gib": free})
                print(f"n={n} {variant}: skipped, predicted peak {peak:.1f} GiB > {args.max_memory_fraction:g} x "
                      f"{free:.1f} GiB available", flush=True)
                continue
            row = run_child(args.setting, n, variant, args)
            row["whole"] = reference_size is None
            results.append(row)
            if "error" in row:
                print(f"n={n} {variant}: FAILED\n{row['error']}", flush=True)
            else:
                print(f"n={n} {variant}: wall {row['wall']:.1f} s, cpu {row['cpu']:.1f} s, peak "
                      f"{row['peak_rss_gib'] or row['ru_maxrss_gib']:.2f} GiB, AUROC {_auroc(row)}", flush=True)

    print(f"\n== global auto scoring, setting {args.setting} ({reference}), {args.threads} thread(s) ==")
    print(f"{'N':>9} {'variant':<11} {'wall s':>8} {'cpu s':>8} {'us/sample':>9} {'data GiB':>8} {'peak GiB':>8} "
          f"{'AUROC':>6} {'epoch est. s (wall/cpu)':>24} {'scoring/epoch':>13}  parts (cpu s)")
    for row in results:
        n = row["n"]
        epoch = Clock(step.wall * math.ceil(n / BATCH), step.cpu * math.ceil(n / BATCH)) if step else None
        epoch_text = f"{epoch.wall:.0f} / {epoch.cpu:.0f}" if epoch else "-"
        if row.get("skipped"):
            cpu = row.get("predicted_cpu")
            ratio = f"~{cpu / epoch.cpu:.2f}x cpu" if epoch and cpu else "-"
            peak = f"~{row['predicted_peak_gib']:.1f}" if row.get("predicted_peak_gib") else ""
            why = "memory" if row.get("predicted_peak_gib") else "CPU time"
            print(f"{n:>9} {row['variant']:<11} {'':>8} {'~' + format(cpu, '.0f') if cpu else '':>8} {'':>9} "
                  f"{'':>8} {peak:>8} {'':>6} {epoch_text:>24} {ratio:>13}  (predicted, not run: {why})")
            continue
        if "error" in row:
            print(f"{n:>9} {row['variant']:<11} failed")
            continue
        ratio = f"{row['wall'] / epoch.wall:.2f}/{row['cpu'] / epoch.cpu:.2f}" if epoch else "-"
        parts = ", ".join(f"{name} {c['cpu']:.0f}" for name, c in row["parts"].items() if c["cpu"] >= 0.5)
        peak = row["peak_rss_gib"] if row["peak_rss_gib"] is not None else row["ru_maxrss_gib"]
        print(f"{n:>9} {row['variant']:<11} {row['wall']:>8.1f} {row['cpu']:>8.1f} {1e6 * row['cpu'] / n:>9.1f} "
              f"{row['data_rss_gib'] or 0:>8.2f} {peak:>8.2f} {_auroc(row):>6} {epoch_text:>24} {ratio:>13}  "
              f"{parts}")
    print("(us/sample: CPU microseconds per sample; data GiB: RSS with the embeddings made, before scoring; peak "
          "GiB: VmHWM during scoring; scoring/epoch: wall/cpu ratios, < 1 meets the goal; the epoch is an "
          "estimate: an in-process step without data loading x ceil(N/256))")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "setting": args.setting, "threads": args.threads,
                                         "step_wall": step.wall if step else None,
                                         "step_cpu": step.cpu if step else None, "results": results}, indent=1)
                             + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
