"""Training passes over a selection keep their last partial batch (issue 17): every selected sample is trained
once per epoch, every rank takes the same number of steps, the step count feeds the LR schedule, and a
mid-epoch resume through the partial step is exact. Passes over all data still drop it, as OpenCLIP does."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import plugins  # noqa: F401  (registers test_pass_plan: a training pass over every other sample)
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import PYTHON, base_env, train_flags
from helpers import load_table, run_safe_train, with_callbacks
from test_step_resume import _stop_and_resume

from safe_train.data import EpochSeededSampler, PlannedBatches
from safe_train.interface import Callback
from safe_train.losses import GatherSpec, clip_loss

LAUNCH = str(Path(__file__).parent / "launch.py")
PLAN = ["--defense", "test_pass_plan"]  # trains the 32 samples ids[::2] of csv_64 each epoch


def _shares(n: int, batch: int, world: int, accum: int = 1, epoch: int = 3) -> list[list[list[int]]]:
    """Every rank's batches (lists of positions) of one epoch of a keep_partial sampler over n positions."""
    shares = []
    for rank in range(world):
        sampler = EpochSeededSampler(np.arange(n), batch, rank, world, seed=0, salt=1, keep_partial=True,
                                     accum_freq=accum)
        sampler.set_epoch(epoch)
        shares.append(list(PlannedBatches(sampler)))
    return shares


@pytest.mark.parametrize(("n", "batch", "accum", "sizes"), [
    (13, 8, 1, [8, 5]),
    (7, 16, 1, [7]),  # a selection smaller than one batch: one step, not none
    (57, 16, 1, [16, 16, 16, 9]),
    (13, 4, 2, [4, 4, 3, 2]),  # the tail split over the --accum-freq micro-batches of one step
    (9, 4, 2, [5, 4]),  # one row left for two micro-batches: it joins the previous step
])
def test_one_rank_trains_every_selected_sample_exactly_once(n, batch, accum, sizes):
    (batches,) = _shares(n, batch, 1, accum)
    assert [len(b) for b in batches] == sizes and len(batches) % accum == 0
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert _shares(n, batch, 1, accum, epoch=4) != [batches]  # a new order every epoch


@pytest.mark.parametrize(("n", "batch", "world", "left_out"), [(14, 8, 2, 0), (32, 6, 2, 0), (13, 8, 2, 1),
                                                               (37, 8, 3, 1), (48, 8, 3, 0)])
def test_ranks_take_equal_steps_of_equal_rows_and_leave_out_fewer_than_the_ranks(n, batch, world, left_out):
    shares = _shares(n, batch, world)
    sizes = [[len(b) for b in share] for share in shares]
    assert all(s == sizes[0] for s in sizes)  # the same steps, each gathering equal rows from every rank
    trained = [i for share in shares for b in share for i in b]
    assert len(trained) == len(set(trained)) == n - left_out  # nothing twice; at most world-1 left out
    sampler = EpochSeededSampler(np.arange(n), batch, 0, world, keep_partial=True)
    assert sampler.untrained == left_out and sampler.num_batches == len(sizes[0])


def test_drop_and_pad_modes_are_unchanged():
    """Passes over all data drop the partial batch (OpenCLIP); inference passes pad it."""
    dropped = EpochSeededSampler(np.arange(13), 4)
    assert dropped.num_batches == 3 and len(list(dropped)) == 12
    padded = EpochSeededSampler(np.arange(13), 4, complete=True)
    assert padded.num_batches == 4 and set(padded) == set(range(13))


class _PassSteps(Callback):
    """Records (epoch, pass name, rows) of every optimizer step."""

    name = "test_pass_steps"

    def __init__(self, sink: list) -> None:
        self.sink = sink

    def on_step_end(self, ctx, step) -> None:
        self.sink.append((ctx.epoch, step.pass_.name, len(step.sample_ids)))


def test_selection_pass_trains_its_partial_batch_and_the_schedule_counts_it(csv_64, tmp_path, monkeypatch):
    steps: list = []
    with_callbacks(monkeypatch, _PassSteps(steps))
    assert run_safe_train(train_flags(csv_64, tmp_path, "p", epochs=2, batch_size=6, extra=PLAN)) == 0
    # 32 chosen samples in batches of 6: five full steps and one of 2, every epoch
    assert steps == [(e, "evens", rows) for e in (0, 1) for rows in (6, 6, 6, 6, 6, 2)]
    table = load_table(tmp_path / "p", 2)
    np.testing.assert_array_equal(table["times_seen"][table["chosen"]], 2)
    np.testing.assert_array_equal(table["times_seen"][~table["chosen"]], 0)
    state = torch.load(tmp_path / "p/checkpoints/epoch_2.safe_train/engine.ckpt", weights_only=False)
    assert state["global_step"] == len(steps)  # the engine's step count is the steps actually taken
    progress = re.findall(r"\[evens\] \[\s*(\d+)/(\d+) ", (tmp_path / "p" / "out.log").read_text())
    assert progress[5:6] == [("32", "32")]  # the partial step ends the pass at its size, not at 6 x 6


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # 2: -m slow (CI time)
def test_resume_through_the_partial_step_is_exact(workers, csv_64, tmp_path, monkeypatch):
    # steps 1-5 of epoch 0 are full, step 6 is the partial one: stop after step 5, resume, then train it
    _stop_and_resume(monkeypatch, tmp_path, csv_64, epochs=2, workers=workers, extra=PLAN + ["--batch-size", "6"],
                     stop=["--test-signal-at-step", "5"])


def test_accum_freq_trains_the_partial_step_too(csv_64, tmp_path, monkeypatch):
    steps: list = []
    with_callbacks(monkeypatch, _PassSteps(steps))
    flags = train_flags(csv_64, tmp_path, "acc", epochs=1, batch_size=6, extra=PLAN + ["--accum-freq", "2"])
    assert run_safe_train(flags) == 0
    # 32 = 2 steps of 2x6 rows, then 8 rows in two micro-batches of 4
    assert [rows for _, _, rows in steps] == [12, 12, 8]
    table = load_table(tmp_path / "acc", 1)
    np.testing.assert_array_equal(table["times_seen"][table["chosen"]], 1)


@pytest.mark.slow
def test_two_ranks_train_every_chosen_sample_exactly_once(csv_64, tmp_path):
    """2 gloo ranks, batch 6 per rank: 32 chosen samples = 2 global steps of 12 and one of 8 (4 per rank)."""
    flags = train_flags(csv_64, tmp_path, "ddp", epochs=2, batch_size=6, extra=PLAN + ["--dist-backend", "gloo"])
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", LAUNCH, *flags]
    proc = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = load_table(tmp_path / "ddp", 2)
    np.testing.assert_array_equal(table["times_seen"][table["chosen"]], 2)
    np.testing.assert_array_equal(table["times_seen"][~table["chosen"]], 0)
    state = torch.load(tmp_path / "ddp/checkpoints/epoch_2.safe_train/engine.ckpt", weights_only=False)
    assert state["global_step"] == 2 * 3


# ---- the partial step's gradients on 2 ranks equal one process on the concatenated batch --------------------
WORLD, N, BATCH, DIM, SCALE = 2, 14, 8, 6, 7.3  # 14 samples, 8 per rank: one partial step of 7 rows per rank


def _features() -> dict[str, torch.Tensor]:
    """Per-sample embeddings indexed by position, the same in every process."""
    g = torch.Generator().manual_seed(5)
    return {name: F.normalize(torch.randn(N, DIM, generator=g), dim=-1) for name in ("image", "text")}


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        sampler = EpochSeededSampler(np.arange(N), BATCH, rank, WORLD, seed=0, keep_partial=True)
        (rows,) = list(PlannedBatches(sampler))
        x = {name: t[rows].clone().requires_grad_(True) for name, t in _features().items()}
        scale = torch.tensor(SCALE, requires_grad=True)
        loss = clip_loss(x["image"], x["text"], scale, GatherSpec(rank=rank, world_size=WORLD))
        loss.backward()
        torch.save({"rows": rows, "loss": loss.detach(), "grads": {k: v.grad for k, v in x.items()}},
                   f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_partial_step_on_two_ranks_has_one_process_gradients(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(WORLD)]
    rows = [r["rows"] for r in ranks]
    assert [len(r) for r in rows] == [7, 7] and sorted(rows[0] + rows[1]) == list(range(N))
    # one process on the concatenated batch (rank 0's rows, then rank 1's): the loss and each rank's row gradients
    order = rows[0] + rows[1]
    x = {name: t[order].clone().requires_grad_(True) for name, t in _features().items()}
    scale = torch.tensor(SCALE)
    logits = scale * x["image"] @ x["text"].T
    labels = torch.arange(len(order))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    grads = torch.autograd.grad(loss, list(x.values()))
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        part = slice(7 * rank, 7 * (rank + 1))
        for name, grad in zip(x, grads, strict=True):
            assert grad[part].abs().max() > 1e-3
            torch.testing.assert_close(result["grads"][name], grad[part], rtol=1e-5, atol=1e-6)
