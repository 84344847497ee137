"""What step checkpoints and an exact mid-epoch resume cost, measured side by side in one run.

Four in-process trainings of the same tiny CLIP on the same generated CSV (CPU):

- A: one epoch, no step checkpoints (the reference);
- B: the same with ``--save-every-n-steps K`` (write cost per checkpoint, overhead on the epoch);
- C: ``--resume`` of B's step checkpoint at step S (what the resume costs beyond training the rest);
- D: a real SIGUSR1 at step S (the work lost to a preemption: steps after the checkpoint).

Printed: seconds per checkpoint, its share of a 10-minute checkpoint interval (the goal is <= 2%), the
resume's extra time as a share of training S steps (goal <= 5%), and the steps lost (goal <= 1).

    python benchmarks/checkpoint_cost.py [--samples 1536] [--batch-size 32] [--every 8] [--stop-at 32]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from state_scale import cpu_model  # noqa: E402  (the CPU named next to every figure, one definition)


def run(flags: list[str]) -> tuple[int, float, dict[str, list]]:
    """One in-process training; returns its exit code, wall time, and the time and global step of every
    optimizer step's end."""
    import safe_train.main as st_main
    from safe_train.args import create_callbacks
    from safe_train.interface import Callback

    clock: dict[str, list] = {"times": [], "steps": []}

    class StepClock(Callback):
        name = "bench_step_clock"

        def on_step_end(self, ctx, step) -> None:
            clock["times"].append(time.perf_counter())
            clock["steps"].append(ctx.global_step)

    original = st_main.create_callbacks
    st_main.create_callbacks = lambda args: create_callbacks(args) + [StepClock()]
    clock["start"] = [time.perf_counter()]
    try:
        code = st_main.main(flags)
    finally:
        st_main.create_callbacks = original
    return code, time.perf_counter() - clock["start"][0], clock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1536, help="at most 1797 (the digits the tests draw from)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--every", type=int, default=8, help="--save-every-n-steps of run B")
    parser.add_argument("--stop-at", type=int, default=32, help="the step checkpoint C resumes and D stops at")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    opts = parser.parse_args()

    import torch

    torch.set_num_threads(opts.threads)
    import plugins  # noqa: F401  (the test_signal_at callback, a real SIGUSR1 to this process)
    from conftest import train_flags, write_csv_dataset

    work = Path(tempfile.mkdtemp(prefix="ckpt-cost-"))
    data = write_csv_dataset(work / "data", opts.samples)
    steps = opts.samples // opts.batch_size

    def flags(name: str, extra: list[str]) -> list[str]:
        return train_flags(data, work / "logs", name, epochs=1, batch_size=opts.batch_size,
                           extra=["--track-samples"] + extra)

    code_a, time_a, clock_a = run(flags("a", []))
    code_b, time_b, clock_b = run(flags("b", ["--save-every-n-steps", str(opts.every),
                                                "--keep-step-checkpoints", "100"]))
    checkpoint = work / "logs/b/checkpoints" / f"step_{opts.stop_at:09d}.pt"
    code_c, time_c, clock_c = run(flags("c", ["--resume", str(checkpoint)]))
    code_d, time_d, clock_d = run(flags("d", ["--test-signal-at-step", str(opts.stop_at)]))
    assert (code_a, code_b, code_c, code_d) == (0, 0, 0, 75), (code_a, code_b, code_c, code_d)

    log_b = (work / "logs/b/out.log").read_text()
    writes = [float(s) for s in re.findall(r"step checkpoint step_\d+\.pt .*? in ([0-9.]+)s", log_b)]
    size_mb = checkpoint.stat().st_size / 2**20
    sidecar_mb = sum(p.stat().st_size for p in checkpoint.with_name(checkpoint.stem + ".safe_train").rglob("*")
                     if p.is_file()) / 2**20
    per_write = sum(writes) / len(writes)
    # time to train the first S steps in A, from its first step's end (start-up excluded on both sides)
    train_first_s = clock_a['times'][opts.stop_at - 1] - clock_a['times'][0]
    per_step_a = (clock_a['times'][-1] - clock_a['times'][0]) / (len(clock_a['times']) - 1)
    # C: start-up to its first step, minus A's start-up to its first step, minus one step of training
    startup_a = clock_a['times'][0] - clock_a['start'][0]
    startup_c = clock_c['times'][0] - clock_c['start'][0]
    resume_extra = startup_c - startup_a
    d_checkpoints = sorted((work / "logs/d/checkpoints").glob("step_*.pt"))
    lost = clock_d['steps'][-1] - int(d_checkpoints[-1].stem.split("_")[1])

    print(f"# step checkpoints and mid-epoch resume ({cpu_model()}, {opts.threads} threads, torch "
          f"{torch.__version__})")
    print(f"tiny CLIP (st-tiny-vit), {opts.samples} pairs, batch {opts.batch_size}: {steps} steps per epoch")
    print("| measurement | value | goal | ratio to goal |")
    print("|---|---|---|---|")
    print(f"| epoch without step checkpoints (A) | {time_a:.1f} s ({per_step_a * 1000:.0f} ms/step) | | |")
    print(f"| epoch with a checkpoint every {opts.every} steps (B) | {time_b:.1f} s "
          f"(+{100 * (time_b - time_a) / time_a:.1f}%, {len(writes)} checkpoints) | | |")
    print(f"| one step checkpoint: model+optimizer {size_mb:.1f} MiB, sidecar {sidecar_mb:.2f} MiB | "
          f"{per_write:.2f} s | | |")
    print(f"| one checkpoint every 10 minutes | {100 * per_write / 600:.3f}% of training time | <= 2% | "
          f"{per_write / 600 / 0.02:.3f} |")
    print(f"| resume at step {opts.stop_at}: extra start-up over a fresh run (C) | {resume_extra:.2f} s "
          f"= {100 * resume_extra / train_first_s:.1f}% of training those {opts.stop_at} steps "
          f"({train_first_s:.1f} s) | <= 5% | {resume_extra / train_first_s / 0.05:.2f} |")
    print(f"| steps lost to SIGUSR1 at step {opts.stop_at} (D) | {lost} | <= 1 | |")
    print(f"| run C's remaining steps | {len(clock_c['times'])} (expected {steps - opts.stop_at}) | | |")
    print(f"runs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
