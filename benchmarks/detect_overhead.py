"""In-loop detection overhead per training step: ``--detect auto`` per kNN backend vs no detection, alternating runs.

    python benchmarks/detect_overhead.py [--rounds 3] [--steps 20] [--batch-size 256] [--threads 1] \\
        [--detect auto] [--backends torch,faiss] [--epoch-samples 20000] [--profile]

Issue 16's goal: in-loop detection costs <= 1% of a training step. Three measurements, side by side in one run:

1. **End to end**: the tiny model (st-tiny-vit, CPU, fp32) trains one epoch of ``--steps`` steps on real 32x32
   digits (scikit-learn's, resampled), without detection and with ``--detect NAMES --detect-backend B`` for each
   of ``--backends``, ``--rounds`` times; the order of the variants rotates each round, so that load changes on a
   shared machine hit all alike. The step time is OpenCLIP's own ``Batch (t)`` log value (logged every step;
   it covers data loading, the step and every ``on_step_end`` hook, not the epoch end); the first two steps of a
   run are discarded (warm-up). Each run's CPU time (``os.wait4``) is reported too: wall time is distorted by
   load, CPU time much less. A short run without detection (``SHORT_STEPS`` steps) per round gives a real step's
   CPU time (data loading and logging included): the CPU difference to the full run over the step difference.
   The in-process step below has no data loading, so shares of it err on the high side.
2. **The callback's per-step work alone** (``on_step_end`` on one batch of unit 128-d features, median of
   ``--repeats``), split into the kNN of the queries, the reference's self-join kNN, the detector formulas and the
   rest (gathers, the caption mismatch, conversions, ``table.record``): where the time goes.
3. **The callback's epoch-end work** (``on_epoch_end`` after an epoch of ``--epoch-samples`` samples: the score
   aggregate, ``epoch_<E>_scores.npz`` and ``epoch_<E>_hist.png``), cold (first call in the process: imports
   matplotlib) and warm, and what it adds per step when spread over that epoch. Not in ``Batch (t)``.

The backends are passed explicitly (``--detect-backend``): the callback's default may change (``auto``).
``--profile`` also prints cProfile's top functions of the per-step and epoch-end work.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GOAL_PERCENT = 1.0
"""Issue 16: in-loop detection may cost at most this share of a training step."""

SHORT_STEPS = 2
"""Steps of the short calibration run: the CPU difference to a ``--steps`` run over the step difference is a real
step's CPU time (data loading and logging included, start-up and epoch end cancelled)."""


# ---- timing helpers (shared with detect_throughput.py and detect_global_scale.py) --------------------------
@dataclass
class Clock:
    """Wall and CPU seconds of a block (CPU: ``time.process_time``, every thread of this process), because on a
    shared machine the wall time also counts the time other processes held the cores."""

    wall: float = 0.0
    cpu: float = 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator[Clock]:
        """Add the block's wall and CPU seconds to this clock."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield self
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu


@dataclass
class PartTimer:
    """Wall/CPU seconds of the parts of a detection call, by wrapping the functions it calls (measurement only:
    everything is restored on exit). Parts: ``knn-query`` (the queries' kNN; a batch reference has none: its
    queries' neighbours are rows of the self-join), ``knn-reference`` (the reference self-join, ``exclude_self=True``), ``formula`` (the detectors' ``score`` methods); the caller's total minus
    these is the rest."""

    parts: dict[str, Clock] = field(default_factory=dict)

    def clock(self, name: str) -> Clock:
        return self.parts.setdefault(name, Clock())

    @contextlib.contextmanager
    def patched(self, detectors: list[str]) -> Iterator[PartTimer]:
        """Wrap ``safe_train.detection.scores.knn`` and the chosen detectors' ``score`` for the block."""
        from safe_train.detection import scores
        from safe_train.registry import DETECTORS

        original_knn = scores.knn

        def timed_knn(*args: Any, **kwargs: Any) -> Any:
            part = "knn-reference" if kwargs.get("exclude_self") else "knn-query"
            with self.clock(part).measure():
                return original_knn(*args, **kwargs)

        classes = [DETECTORS.get(name) for name in detectors]
        originals = {cls: cls.__dict__.get("score") for cls in classes}

        def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
            def timed_score(detector: Any, x: Any) -> Any:
                with self.clock("formula").measure():
                    return method(detector, x)
            return timed_score

        scores.knn = timed_knn
        for cls in classes:
            cls.score = wrap(cls.score)
        try:
            yield self
        finally:
            scores.knn = original_knn
            for cls, method in originals.items():
                if method is None:
                    del cls.score
                else:
                    cls.score = method

    def table(self, total: Clock, calls: int, unit: float = 1000.0, label: str = "ms") -> list[str]:
        """Lines ``part  wall  cpu  share`` per call (``unit``: 1000 for ms), the rest last."""
        lines = []
        known = Clock()
        for name in ("knn-query", "knn-reference", "formula"):
            clock = self.parts.get(name)
            if clock is None:
                continue
            known.wall, known.cpu = known.wall + clock.wall, known.cpu + clock.cpu
            lines.append(_part_line(name, clock, total, calls, unit, label))
        rest = Clock(max(total.wall - known.wall, 0.0), max(total.cpu - known.cpu, 0.0))
        lines.append(_part_line("rest", rest, total, calls, unit, label))
        return lines


def _part_line(name: str, clock: Clock, total: Clock, calls: int, unit: float, label: str) -> str:
    share = 100 * clock.cpu / total.cpu if total.cpu > 0 else float("nan")
    return (f"  {name:<14} wall {unit * clock.wall / calls:9.2f} {label}  cpu {unit * clock.cpu / calls:9.2f} {label}"
            f"  ({share:4.1f}% of the cpu)")


def set_threads(threads: int) -> None:
    """Torch's intra-op threads (faiss follows torch where safe_train sets it; OpenMP via the environment)."""
    import torch

    torch.set_num_threads(threads)


def machine() -> str:
    """CPU model, cores and the load average: a shared machine distorts wall times."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, load average {load}"


# ---- end to end: training runs ---------------------------------------------------------------------------
def write_dataset(directory: Path, n: int) -> Path:
    """``n`` real handwritten digits (scikit-learn's 8x8, resampled to 32x32 RGB) with captions, as a CSV."""
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


@dataclass
class RunTimes:
    """One training run: its per-step wall times (warm-up dropped) and the process's CPU and wall seconds."""

    steps: list[float]
    cpu: float
    wall: float


def training_run(csv: Path, logs: Path, name: str, batch_size: int, threads: int, extra: list[str],
                 model: str = "st-tiny-vit") -> RunTimes:
    """Train one epoch in a child process and read OpenCLIP's per-step ``Batch (t)`` from its log."""
    cmd = [sys.executable, "-m", "safe_train.main", "--model", model, "--train-data", str(csv),
           "--dataset-type", "csv", "--csv-img-key", "filepath", "--csv-caption-key", "title",
           "--batch-size", str(batch_size), "--epochs", "1", "--workers", "0", "--lr", "1e-3", "--warmup", "2",
           "--seed", "0", "--device", "cpu", "--precision", "fp32", "--log-every-n-steps", "1",
           "--save-frequency", "0", "--name", name, "--log-root", str(logs), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"training failed ({' '.join(cmd)}):\n{err.read().decode()[-3000:]}")
    text = (logs / name / "out.log").read_text()
    times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", text)]
    return RunTimes(times[2:], usage.ru_utime + usage.ru_stime, wall)


def _median_step(runs: list[RunTimes]) -> float:
    """The median step time over every timed step of these runs."""
    return statistics.median([s for run in runs for s in run.steps])


def step_times(csv: Path, logs: Path, name: str, batch_size: int, threads: int, extra: list[str]) -> list[float]:
    """Per-step wall times of one training run (kept for callers of the earlier interface)."""
    return training_run(csv, logs, name, batch_size, threads, extra).steps


def train_step_cost(model_name: str = "st-tiny-vit", batch_size: int = 256, steps: int = 6,
                    warmup: int = 2) -> Clock:
    """Median wall and CPU seconds of one fp32 CLIP training step in this process (forward, contrastive loss,
    backward, AdamW) on random images and real tokenised captions, with no data loading: a denominator that load
    on a shared machine distorts far less than the training log's wall ``Batch (t)`` (its CPU time), and smaller
    than a real step (no PNG decoding), so a share of it errs on the high side."""
    import numpy as np
    import open_clip
    import torch

    from safe_train.evaluate import load_model

    model, _, tokenizer = load_model(model_name, None)
    model.train()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, size, size, generator=g)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    texts = tokenizer([f"a handwritten {words[i % 10]}." for i in range(batch_size)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = open_clip.ClipLoss()
    walls, cpus = [], []
    for i in range(warmup + steps):
        clock = Clock()
        with clock.measure():
            optimizer.zero_grad()
            out = model(images, texts)
            if isinstance(out, dict):
                out = (out["image_features"], out["text_features"], out["logit_scale"])
            loss = loss_fn(*out[:3])
            loss.backward()
            optimizer.step()
        if i >= warmup:
            walls.append(clock.wall)
            cpus.append(clock.cpu)
    return Clock(float(np.median(walls)), float(np.median(cpus)))


# ---- the callback alone --------------------------------------------------------------------------------
def _callback(detect: str, backend: str, run_dir: str | None = None, reference: str = "batch") -> tuple[Any, Any]:
    """A set-up detection callback and its context (one process, CPU). Without a model, the ``auto`` reference keeps
    the forward's features (no tower hook): the same rows, so the same cost."""
    from safe_train.detection.callback import DetectionCallback, DetectionConfig
    from safe_train.interface import TrainContext
    from safe_train.state import SampleTable

    cb = DetectionCallback(DetectionConfig(names=detect, backend=backend, reference=reference))
    ctx = TrainContext(args=argparse.Namespace(seed=0, log_base_path=run_dir), table=SampleTable())
    cb.setup(ctx)
    return cb, ctx


def _features(batch_size: int, seed: int) -> dict[str, Any]:
    """Unit image/caption features of one batch (what OpenCLIP's forward hands the hooks)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    return {"image_features": norm(torch.randn(batch_size, 128, generator=g), dim=1),
            "text_features": norm(torch.randn(batch_size, 128, generator=g), dim=1)}


@dataclass
class StepCost:
    """The callback's ``on_step_end``: every call's wall/CPU seconds and the parts' totals over all calls."""

    walls: list[float]
    cpus: list[float]
    total: Clock
    parts: PartTimer

    @property
    def calls(self) -> int:
        return len(self.walls)

    @property
    def wall(self) -> float:
        """Median wall seconds per call."""
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        """Median CPU seconds per call."""
        return statistics.median(self.cpus)

    def merge(self, other: StepCost) -> StepCost:
        """Both measurements' calls together (rounds alternating with other variants)."""
        parts = PartTimer()
        for source in (self.parts, other.parts):
            for name, clock in source.parts.items():
                mine = parts.clock(name)
                mine.wall, mine.cpu = mine.wall + clock.wall, mine.cpu + clock.cpu
        total = Clock(self.total.wall + other.total.wall, self.total.cpu + other.total.cpu)
        return StepCost(self.walls + other.walls, self.cpus + other.cpus, total, parts)


def callback_step_cost(batch_size: int, detect: str, backend: str, repeats: int = 50,
                       profile: bool = False, reference: str = "batch") -> StepCost:
    """``on_step_end`` alone on one batch of 128-d features, ``repeats`` times after 3 warm-up calls."""
    import torch

    from safe_train.detection.scores import parse_detectors
    from safe_train.interface import StepOutput, TrainPass

    cb, ctx = _callback(detect, backend, reference=reference)
    features = _features(batch_size, 0)
    ids = torch.arange(batch_size)
    for i in range(3):
        cb.on_step_end(ctx, StepOutput(TrainPass(), ids + i * batch_size, features, {}, i))
    walls, cpus = [], []
    total, parts = Clock(), PartTimer()
    profiler = cProfile.Profile() if profile else None
    with parts.patched(parse_detectors(detect)):
        for i in range(3, 3 + repeats):
            out = StepOutput(TrainPass(), ids + i * batch_size, features, {}, i)
            one = Clock()
            if profiler:
                profiler.enable()
            with one.measure():
                cb.on_step_end(ctx, out)
            if profiler:
                profiler.disable()
            walls.append(one.wall)
            cpus.append(one.cpu)
            total.wall, total.cpu = total.wall + one.wall, total.cpu + one.cpu
    if profiler:
        print(f"\n--- cProfile: on_step_end, --detect {detect} --detect-backend {backend}, {repeats} calls ---")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(18)
    return StepCost(walls, cpus, total, parts)


def callback_cost(batch_size: int, detect: str, threads: int, repeats: int = 50, backend: str = "torch") -> float:
    """Median wall seconds of ``on_step_end`` alone (the earlier interface of this script)."""
    set_threads(threads)
    return callback_step_cost(batch_size, detect, backend, repeats).wall


@dataclass
class EpochEndCost:
    """``on_epoch_end`` wall/CPU seconds, cold (first call in the process) and warm, and the parts of the cold one."""

    cold: Clock
    warm: Clock
    parts: dict[str, Clock]
    matplotlib_was_loaded: bool


def callback_epoch_end_cost(samples: int, batch_size: int, detect: str, backend: str,
                            profile: bool = False, reference: str = "batch") -> EpochEndCost:
    """One epoch of ``samples`` scored by ``on_step_end``, then ``on_epoch_end`` timed (writing its npz and
    histogram into a temporary run folder), twice: the first call imports matplotlib, as a real run's first
    detection epoch does unless something else loaded it."""
    import torch

    from safe_train import dist
    from safe_train.detection import callback as callback_module
    from safe_train.interface import StepOutput, TrainPass

    was_loaded = "matplotlib" in sys.modules
    results: list[Clock] = []
    parts: dict[str, Clock] = {}
    with tempfile.TemporaryDirectory() as run_dir:
        cb, ctx = _callback(detect, backend, run_dir, reference)
        features = _features(batch_size, 1)
        steps = max(1, samples // batch_size)
        for epoch in range(2):
            ctx.epoch = epoch
            cb.on_epoch_start(ctx)
            for i in range(steps):
                ids = torch.arange(i * batch_size, (i + 1) * batch_size)
                ctx.table.observe(ids.numpy())
                cb.on_step_end(ctx, StepOutput(TrainPass(), ids, features, {}, i))
            ctx.table.sync(dist.gather_arrays)  # as the engine does before on_epoch_end
            originals = {name: getattr(callback_module, name) for name in ("write_histogram", "update_aggregate")}
            if epoch == 0:
                for name, function in originals.items():
                    setattr(callback_module, name, _timed(function, parts.setdefault(name, Clock())))
            profiler = cProfile.Profile() if profile and epoch == 0 else None
            clock = Clock()
            try:
                if profiler:
                    profiler.enable()
                with clock.measure():
                    cb.on_epoch_end(ctx)
            finally:
                if profiler:
                    profiler.disable()
                for name, function in originals.items():
                    setattr(callback_module, name, function)
            if profiler:
                print(f"\n--- cProfile: on_epoch_end (cold), {steps * batch_size} samples ---")
                pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(14)
            results.append(clock)
    return EpochEndCost(results[0], results[1], parts, was_loaded)


def _timed(function: Callable[..., Any], clock: Clock) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        with clock.measure():
            return function(*args, **kwargs)
    return timed


# ---- main ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="Training runs per variant (alternating).")
    p.add_argument("--steps", type=int, default=20, help="Steps per training run (the first two are dropped).")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="Torch / OpenMP threads, training and callback alike.")
    p.add_argument("--detect", default="auto", help="Detector names for --detect (default: auto, the default "
                   "detector).")
    p.add_argument("--backends", default="torch,faiss", help="Comma-separated --detect-backend values, one "
                   "variant each.")
    p.add_argument("--repeats", type=int, default=50, help="Calls of on_step_end alone per backend.")
    p.add_argument("--epoch-samples", type=int, default=20000,
                   help="Samples per epoch for the epoch-end cost (20,000: the medium benchmark).")
    p.add_argument("--reference", default="batch", choices=("batch", "global", "auto"),
                   help="--detect-reference of every variant (default batch; auto and global score the whole epoch "
                        "at its end, so their cost is in part 3).")
    p.add_argument("--no-training", action="store_true", help="Skip the end-to-end training runs.")
    p.add_argument("--profile", action="store_true", help="Also print cProfile's top functions.")
    return p


def _label(detect: str, backend: str) -> str:
    return f"{detect}/{backend}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    set_threads(args.threads)
    steps_per_epoch = max(1, args.epoch_samples // args.batch_size)
    print(f"machine: {machine()} (shared: wall times include other processes' load; CPU times much less)")
    print(f"--detect {args.detect} --detect-reference {args.reference}, batch {args.batch_size}, "
          f"{args.threads} thread(s)", flush=True)

    # the epoch end first: its cold call must be the process's first matplotlib import
    epoch_end = {b: callback_epoch_end_cost(args.epoch_samples, args.batch_size, args.detect, b, args.profile,
                                            args.reference)
                 for b in backends}
    # the step and the callback alone, alternating in rounds so that load changes hit all alike
    step_clocks: list[Clock] = []
    step_cost: dict[str, StepCost] = {}
    rounds = max(1, args.rounds)
    for r in range(rounds):
        step_clocks.append(train_step_cost("st-tiny-vit", args.batch_size, steps=2, warmup=1 if r else 2))
        for b in backends:
            cost = callback_step_cost(args.batch_size, args.detect, b, max(1, args.repeats // rounds),
                                      args.profile and r == 0, args.reference)
            step_cost[b] = step_cost[b].merge(cost) if b in step_cost else cost
    step = Clock(statistics.median(c.wall for c in step_clocks), statistics.median(c.cpu for c in step_clocks))

    runs: dict[str, list[RunTimes]] = {"none": [], **{b: [] for b in backends}}
    short: list[RunTimes] = []  # "none" on SHORT_STEPS batches: start-up CPU, to get a real step's CPU time
    if not args.no_training:
        variants = list(runs)
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            (tmp_path / "data").mkdir()
            csv = write_dataset(tmp_path / "data", args.steps * args.batch_size)
            (tmp_path / "short").mkdir()
            short_csv = write_dataset(tmp_path / "short", SHORT_STEPS * args.batch_size)
            for r in range(args.rounds):
                order = variants[r % len(variants):] + variants[: r % len(variants)]
                for variant in order:
                    extra = [] if variant == "none" else ["--detect", args.detect, "--detect-backend", variant,
                                                          "--detect-reference", args.reference]
                    runs[variant].append(training_run(csv, tmp_path / "logs", f"{variant}{r}", args.batch_size,
                                                      args.threads, extra))
                short.append(training_run(short_csv, tmp_path / "logs", f"short{r}", args.batch_size, args.threads, []))
                print(f"round {r}: " + ", ".join(f"{v} {_median_step(runs[v]):.4f} s/step" for v in variants),
                      flush=True)

    print(f"\n== 1. training step, st-tiny-vit, batch {args.batch_size}, fp32, {args.threads} thread(s) ==")
    print(f"in process (no data loading, median of {2 * rounds}): wall {step.wall:.3f} s, cpu {step.cpu:.3f} s")
    base_step = _median_step(runs["none"]) if runs["none"] else None
    real_cpu = None
    if base_step is not None:
        base_cpu = statistics.median(run.cpu for run in runs["none"])
        print(f"training runs ({args.rounds} x {args.steps - 2} timed steps per variant, order rotating):")
        print(f"  {'variant':<12} {'median Batch (t)':>16} {'vs none':>8} {'run CPU s':>10} {'CPU diff/step':>14}")
        print(f"  {'none':<12} {base_step:>14.4f} s {'':>8} {base_cpu:>10.2f}")
        for b in backends:
            wall = _median_step(runs[b])
            cpu = statistics.median(run.cpu for run in runs[b])
            print(f"  {_label(args.detect, b):<12} {wall:>14.4f} s {100 * (wall / base_step - 1):>+7.2f}% {cpu:>10.2f} "
                  f"{1000 * (cpu - base_cpu) / args.steps:>11.1f} ms")
        print("  ('run CPU': the whole child process, start-up, steps and epoch end; its difference per step "
              "includes the epoch end spread over these few steps)")
        real_cpu = (base_cpu - statistics.median(run.cpu for run in short)) / (args.steps - SHORT_STEPS)
        print(f"real step CPU (with data loading, logging): ({base_cpu:.2f} s - {SHORT_STEPS}-step run "
              f"{statistics.median(run.cpu for run in short):.2f} s) / {args.steps - SHORT_STEPS} = {real_cpu:.3f} s")

    print(f"\n== 2. the callback's on_step_end alone ({step_cost[backends[0]].calls} calls per backend, "
          "alternating with the step) ==")
    for b in backends:
        cost = step_cost[b]
        print(f"{_label(args.detect, b)}: wall {1000 * cost.wall:.2f} ms, cpu {1000 * cost.cpu:.2f} ms per step = "
              f"{100 * cost.cpu / step.cpu:.2f}% of a step's CPU time (medians); parts, mean per call:")
        for line in cost.parts.table(cost.total, cost.calls):
            print(line)

    print(f"\n== 3. the callback's on_epoch_end, an epoch of {steps_per_epoch * args.batch_size} samples = "
          f"{steps_per_epoch} steps ==")
    for b in backends:
        cost = epoch_end[b]
        parts = ", ".join(f"{name} {c.wall:.2f} s wall / {c.cpu:.2f} s cpu" for name, c in cost.parts.items())
        print(f"{_label(args.detect, b)}: cold {cost.cold.wall:.2f} s wall / {cost.cold.cpu:.2f} s cpu (matplotlib "
              f"{'already' if cost.matplotlib_was_loaded else 'not yet'} imported), warm {cost.warm.wall:.2f} s wall / "
              f"{cost.warm.cpu:.2f} s cpu; cold call: {parts}")
        print(f"  spread over the epoch: warm {1000 * cost.warm.cpu / steps_per_epoch:.2f} ms cpu per step = "
              f"{100 * cost.warm.cpu / steps_per_epoch / step.cpu:.2f}% of a step, cold "
              f"{100 * cost.cold.cpu / steps_per_epoch / step.cpu:.2f}%")

    print(f"\n== goal: in-loop detection <= {GOAL_PERCENT:g}% of a training step (CPU time; wall in brackets) ==")
    for b in backends:
        per_step = 100 * step_cost[b].cpu / step.cpu
        with_end = per_step + 100 * epoch_end[b].warm.cpu / steps_per_epoch / step.cpu
        wall = f" [end to end, wall: {100 * (_median_step(runs[b]) / base_step - 1):+.2f}%]" if base_step else ""
        verdict = "met" if with_end <= GOAL_PERCENT else "MISSED"
        print(f"  {_label(args.detect, b)}: per step {per_step:.2f}%, with the epoch end {with_end:.2f}% of the "
              f"in-process step -> {verdict}{wall}")
        if real_cpu and real_cpu > 0:
            real_per_step = 100 * step_cost[b].cpu / real_cpu
            real_with_end = real_per_step + 100 * epoch_end[b].warm.cpu / steps_per_epoch / real_cpu
            verdict = "met" if real_with_end <= GOAL_PERCENT else "MISSED"
            print(f"  {'':<{len(_label(args.detect, b))}}  per step {real_per_step:.2f}%, with the epoch end "
                  f"{real_with_end:.2f}% of the real step (with data loading) -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
