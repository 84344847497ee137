"""slurm/train.sbatch on a real one-node Slurm cluster (tests/slurm_cluster.py): 2 CPU ranks over gloo.

- a plain sbatch run trains exactly like the same 2 ranks started directly by torchrun;
- ``scontrol requeue`` mid-run: the job comes back (same id and run name, SLURM_RESTART_COUNT=1),
  resumes and ends with the uninterrupted run's per-step losses;
- ``scancel --signal=USR1`` mid-epoch: the tasks write a step checkpoint and exit 75, the script
  requeues the job, which resumes mid-epoch and again matches the uninterrupted run;
- a one-task ``srun`` step evaluates the sbatch run's checkpoint.

Per-step values (LR, logit scale, every loss term) come from the run's out.log.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PYTHON, REPO, base_env, digit_images, train_flags, write_csv_dataset
from slurm_cluster import FINISHED, SlurmCluster

pytestmark = pytest.mark.slurm

RANKS, PAIRS, BATCH, EPOCHS = 2, 256, 8, 2
STEPS = PAIRS // (RANKS * BATCH)  # per epoch
SBATCH = REPO / "slurm" / "train.sbatch"
CPU_NODE = ["--gpus-per-node=0", f"--ntasks-per-node={RANKS}", "--cpus-per-task=1"]  # the script asks for GPUs
STEP_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\d+ .*? LR: (\S+) Logit Scale: (\S+) (.*)$")
TERM = re.compile(r"(\w+): (\S+) \(")  # a loss term's current value (its running mean follows in brackets)
RUN_START = re.compile(r"\| INFO \| Running (in distributed mode|with a single process)")
RESUMING = re.compile(r"=> resuming checkpoint '([^']+)'")


@dataclass(frozen=True)
class Step:
    epoch: int
    samples: int
    values: tuple[float, ...]  # LR, logit scale, then every loss term


def parse_steps(lines: list[str]) -> list[Step]:
    steps = []
    for line in lines:
        m = STEP_LINE.search(line)
        if m:
            terms = tuple(float(v) for _, v in TERM.findall(m.group(5)))
            steps.append(Step(int(m.group(1)), int(m.group(2)), (float(m.group(3)), float(m.group(4)), *terms)))
    return steps


def starts(log: Path) -> list[list[str]]:
    """out.log split into the lines of each start of the run (a requeued job appends to it)."""
    parts: list[list[str]] = [[]]
    started = False  # lines before a start's first "Running ..." line (checkpoint lookup) stay with the previous
    for line in log.read_text().splitlines():
        if RUN_START.search(line):
            if started:
                parts.append([])
            started = True
        parts[-1].append(line)
    return parts


def assert_same(got: list[Step], want: list[Step], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} steps, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        close = len(g.values) == len(w.values) and all(
            math.isclose(a, b, rel_tol=2e-4, abs_tol=1e-6) for a, b in zip(g.values, w.values, strict=True))
        assert g.epoch == w.epoch and close, f"{what}: step {i} differs: {g} != {w}"


def flags(train_csv: Path, logs: Path, name: str) -> list[str]:
    return train_flags(train_csv, logs, name, epochs=EPOCHS, batch_size=BATCH, extra=["--dist-backend", "gloo"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Job:
    id: str
    run: Path  # LOG_ROOT/NAME
    output: Path  # the job's Slurm output file (appended to by every start)
    slurm_log: str = ""  # slurmctld's and slurmd's lines about it, kept when it finishes

    def text(self) -> str:
        return self.output.read_text() if self.output.exists() else "(no output file yet)"

    def tail(self, lines: int = 40) -> str:
        """The end of the output, without OpenCLIP's parameter dump, for assertion messages."""
        noise = re.compile(r"\| INFO \|   \w+: |^[IW]\d{4} ")  # the parameter dump, torch's info/warning lines
        kept = [line for line in self.text().splitlines() if not noise.search(line)]
        return f"--- {self.output} (last {lines} lines)\n" + "\n".join(kept[-lines:])


def submit(cluster: SlurmCluster, train_csv: Path, directory: Path, name: str) -> Job:
    """sbatch slurm/train.sbatch for 2 CPU ranks; submitted from ``directory`` (its submit directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    logs = directory / "logs"
    output = directory / f"{name}.out"
    env = {**base_env(), "SLURM_CONF": cluster.env["SLURM_CONF"], "NAME": name, "LOG_ROOT": str(logs),
           "MASTER_PORT": str(_free_port()),
           "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # `python` in the script
    proc = cluster.run("sbatch", "--parsable", *CPU_NODE, "--time=15", f"--job-name={name}",
                       f"--output={output}", str(SBATCH), *flags(train_csv, logs, name), env=env, cwd=directory)
    return Job(proc.stdout.strip().split(";")[0], logs / name, output)


def reached(job: Job, epoch: int, step: int) -> bool:
    """Rank 0 has logged ``step`` (1-based) of ``epoch``."""
    log = job.run / "out.log"
    return log.exists() and any(s.epoch == epoch and s.samples >= step * RANKS * BATCH
                                for s in parse_steps(log.read_text().splitlines()))


def assert_completed(info: dict[str, str], job: Job, restarts: int) -> None:
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), \
        f"{info}\n{job.tail()}\n{job.slurm_log}"
    assert info.get("Restarts") == str(restarts), f"{info}\n{job.tail()}"
    assert f"SLURM_RESTART_COUNT={restarts}" in job.text(), job.tail()


@dataclass
class Runs:
    reference: list[Step]  # torchrun, uninterrupted
    jobs: dict[str, Job]
    infos: dict[str, dict[str, str]]  # scontrol show job at the end
    missed: dict[str, str]  # job -> why its interruption did not happen


# job name -> (epoch, step at or after which to interrupt it, command with {id})
INTERRUPTS = {
    "requeued": (1, 1, ["scontrol", "requeue", "{id}"]),  # epoch 0's checkpoint is written
    # mid-epoch, after epoch 0's checkpoint; without --batch the signal goes to the job step's tasks,
    # as with sbatch --signal=USR1@120
    "usr1": (1, 3, ["scancel", "--signal=USR1", "{id}"]),
}


@pytest.fixture(scope="module")
def train_csv(tmp_path_factory) -> Path:
    return write_csv_dataset(tmp_path_factory.mktemp("slurm_csv"), PAIRS)


@pytest.fixture(scope="module")
def runs(slurm_cluster, train_csv, tmp_path_factory) -> Runs:
    """All training at once (the partition lets jobs share the CPUs): the reference run of the same 2 ranks
    started directly by torchrun, a plain sbatch job, and the two jobs that are interrupted when their log
    reaches the step in INTERRUPTS; requeued jobs are released from their BeginTime hold at once."""
    root = tmp_path_factory.mktemp("slurm_runs")
    direct = root / "direct"
    direct.mkdir()
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
           "-m", "safe_train.main", *flags(train_csv, direct / "logs", "direct")]
    with open(direct / "torchrun.out", "wb") as out:
        torchrun = subprocess.Popen(cmd, env=base_env(), stdout=out, stderr=subprocess.STDOUT, cwd=direct)
    try:
        jobs = {name: submit(slurm_cluster, train_csv, root / name, name) for name in ("plain", *INTERRUPTS)}
        pending = dict(INTERRUPTS)
        infos: dict[str, dict[str, str]] = {}
        missed: dict[str, str] = {}
        deadline = time.monotonic() + 420
        polled = 0.0
        while len(infos) < len(jobs) or torchrun.poll() is None:
            for name, (epoch, step, command) in list(pending.items()):
                if reached(jobs[name], epoch, step):
                    slurm_cluster.run(*(c.format(id=jobs[name].id) for c in command))
                    del pending[name]
            if time.monotonic() - polled > 1:
                polled = time.monotonic()
                for name, job in jobs.items():
                    if name in infos:
                        continue
                    info = slurm_cluster.job(job.id)
                    if info.get("JobState") in FINISHED:
                        infos[name] = info
                        job.slurm_log = slurm_cluster.job_log(job.id)
                        if name in pending:
                            missed[name] = f"the job ended ({info.get('JobState')}) before its interruption point"
                            del pending[name]
                    elif info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                        slurm_cluster.release(job.id)  # a requeued job would wait ~2 minutes; released
                        # once its previous start has left no process (as the hold is there for)
            if time.monotonic() > deadline:
                slurm_cluster.run("scancel", *(j.id for j in jobs.values()), check=False)
                raise AssertionError(f"not done in 420 s: finished {sorted(infos)}, torchrun {torchrun.poll()}")
            time.sleep(0.2)
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.wait()
    assert torchrun.returncode == 0, (direct / "torchrun.out").read_text()[-3000:]
    reference = parse_steps((direct / "logs" / "direct" / "out.log").read_text().splitlines())
    assert len(reference) == EPOCHS * STEPS and [s.epoch for s in reference] == sorted(s.epoch for s in reference)
    return Runs(reference, jobs, infos, missed)


def test_sbatch_trains_like_torchrun(runs):
    job, info = runs.jobs["plain"], runs.infos["plain"]
    assert_completed(info, job, restarts=0)
    assert "2 task(s)" in job.text()
    assert len(starts(job.run / "out.log")) == 1
    assert_same(parse_steps((job.run / "out.log").read_text().splitlines()), runs.reference, "sbatch vs torchrun")
    assert (job.run / "checkpoints" / f"epoch_{EPOCHS}.pt").exists()


def _check_resumed(job: Job, reference: list[Step]) -> tuple[str, list[Step]]:
    """Two starts; the second resumed a checkpoint and trained exactly the rest of the reference run.
    Returns the checkpoint it resumed from and the steps it trained."""
    parts = starts(job.run / "out.log")
    assert len(parts) == 2, f"{len(parts)} starts in {job.run / 'out.log'}\n{job.tail()}"
    first, second = parts
    resumed = [m.group(1) for line in second if (m := RESUMING.search(line))]
    assert resumed, "the restarted job did not resume:\n" + job.tail()
    before, after = parse_steps(first), parse_steps(second)
    assert after, "the restarted job trained no step:\n" + job.tail()
    done = len(reference) - len(after)  # steps the checkpoint already held
    assert 0 < done <= len(before), (done, len(before))
    assert_same(before, reference[:len(before)], "before the interruption")
    assert_same(after, reference[done:], "after the resume")
    return resumed[0], after


def test_scontrol_requeue_resumes_and_matches(runs):
    job, info = runs.jobs["requeued"], runs.infos["requeued"]
    assert "requeued" not in runs.missed, runs.missed["requeued"] + "\n" + job.tail()
    assert_completed(info, job, restarts=1)
    checkpoint, after = _check_resumed(job, runs.reference)
    # The epoch checkpoint; or, where the tasks caught Slurm's SIGTERM in time, a newer step checkpoint.
    if Path(checkpoint).name == "epoch_1.pt":
        assert [s.epoch for s in after] == [1] * STEPS
    else:
        assert re.fullmatch(r"step_\d+\.pt", Path(checkpoint).name), checkpoint
    assert (job.run / "checkpoints" / f"epoch_{EPOCHS}.pt").exists()


def test_usr1_writes_a_step_checkpoint_exits_75_and_requeues(runs):
    job, info = runs.jobs["usr1"], runs.infos["usr1"]
    assert "usr1" not in runs.missed, runs.missed["usr1"] + "\n" + job.tail()
    assert "training exited 75" in job.text(), job.tail()
    assert_completed(info, job, restarts=1)
    checkpoint, after = _check_resumed(job, runs.reference)
    assert re.fullmatch(r"step_\d+\.pt", Path(checkpoint).name), f"resumed {checkpoint}, not a step checkpoint"
    assert after[0].epoch == 1 and len(after) < STEPS  # mid-epoch
    assert (job.run / "checkpoints" / f"epoch_{EPOCHS}.pt").exists()


def test_one_task_srun_step_evaluates_the_checkpoint(slurm_cluster, runs, tmp_path):
    job, info = runs.jobs["plain"], runs.infos["plain"]
    assert info.get("JobState") == "COMPLETED", info
    images, labels = digit_images(20, seed=1)
    rows = ["filepath\tlabel"]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        image.save(tmp_path / f"t{i}.png")
        rows.append(f"t{i}.png\t{label}")  # class index
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    env = {**base_env(), "SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}
    proc = slurm_cluster.run(
        "srun", "-n", "1", "--cpus-per-task=1", PYTHON, "-m", "safe_train.evaluate_cli", "--model", "st-tiny-vit",
        "--checkpoint", str(job.run / "checkpoints" / f"epoch_{EPOCHS}.pt"), "--test-data", str(tmp_path / "test.csv"),
        "--zeroshot-set", "mnist", "--out", str(tmp_path / "result.json"), env=env, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["n_eval"] == 20 and 0.0 <= result["clean_top1"] <= 1.0
