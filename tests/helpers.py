"""In-process run helpers shared by the tests."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from safe_train.interface import Callback


@contextlib.contextmanager
def recording_losses() -> Iterator[list[float]]:
    """Record every loss value OpenCLIP's loss object returns (patches open_clip_train.main.create_loss)."""
    import open_clip_train.main as oc_main

    original = oc_main.create_loss
    values: list[float] = []

    def create_loss(args):
        loss = original(args)

        def recorded(*a, **kw):
            out = loss(*a, **kw)
            values.append(float(sum(v.detach() for v in out.values())))
            return out

        return recorded

    oc_main.create_loss = create_loss
    try:
        yield values
    finally:
        oc_main.create_loss = original


def run_upstream(argv: list[str]) -> int | None:
    """OpenCLIP's own trainer, in this process (with safe-train's tiny model config registered)."""
    from open_clip_train.main import main as upstream_main

    from safe_train.model_configs import register_model_configs

    register_model_configs()
    return upstream_main(argv)


def run_safe_train(argv: list[str]) -> int:
    from safe_train.main import main

    return main(argv)


def load_state_dict(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / f"epoch_{epoch}.pt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


def load_table(run_dir: Path, epoch: int | str):
    from safe_train.state import SampleTable

    table = SampleTable()
    table.load(run_dir / "checkpoints" / f"epoch_{epoch}.safe_train" / "table")
    return table


class Killed(Exception):
    """Raised by :class:`KillAtEpoch`: stands in for a run killed between epochs."""


class KillAtEpoch(Callback):
    """Stops a run at the start of ``epoch`` (after the previous epoch's checkpoint and sidecar)."""

    name = "test_kill"

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, ctx) -> None:
        if ctx.epoch == self.epoch:
            raise Killed()


def with_callbacks(monkeypatch, *extra: Callback) -> None:
    """The run's own callbacks plus ``extra`` (replacing extras given earlier in the test)."""
    import safe_train.main as st_main
    from safe_train.args import create_callbacks

    monkeypatch.setattr(st_main, "create_callbacks", lambda args: create_callbacks(args) + list(extra))


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """``n`` seeded random unit vectors of width ``d`` (embeddings for loss hand computations)."""
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def hand_ce(rows: torch.Tensor, cols: torch.Tensor, scale: float) -> float:
    """Mean over rows i of -log softmax_j(scale * <row_i, col_j>)[i], with plain Python loops."""
    total = 0.0
    for i in range(len(rows)):
        logits = [scale * float(rows[i] @ cols[j]) for j in range(len(cols))]
        top = max(logits)
        total += -(logits[i] - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / len(rows)


def assert_repeatable_without_touching_global_rngs(make_views) -> list:
    """Call ``make_views()`` twice with other global draws in between: the outputs must be equal tensor for tensor
    and the process-global generators (``random``, numpy's, torch's CPU one) must be where the second call found
    them (seeded per-sample views, :func:`safe_train.augment.private_global_rngs`). Returns the first outputs."""
    import random

    import numpy as np

    def states() -> tuple:
        return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()

    first = make_views()
    torch.manual_seed(123)  # other draws in between (a sampler's seed, another sample, ...)
    random.seed(7)
    np.random.seed(7)
    before = states()
    again = make_views()
    after = states()
    assert before[0] == after[0] and before[1] == after[1] and torch.equal(before[2], after[2])
    for a, b in zip(first, again, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    return first
