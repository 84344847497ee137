"""Issue 15, the training loop on a GPU: no host-device sync on steps that do not log, the SafeCLIP bank on
the model's device with non-finite rows counted, and ``--dataset-type synthetic``.

A CPU cannot show a GPU stall, but it can show the code that would cause one: every conversion that waits
for the device (``float()``, ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``int()``, ``bool()``) made
by safe-train code on a tensor that may live on the device is counted, step by step, in real training runs.
"""

from __future__ import annotations

import inspect
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import train_flags
from helpers import load_table, run_safe_train

import safe_train
from safe_train.defenses.safeclip import SafeClip
from safe_train.losses import FeatureBank
from safe_train.openclip.step import TrainStep

PACKAGE_DIR = str(Path(safe_train.__file__).resolve().parent)
CONVERSIONS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
LOG_EVERY = 1000  # only each pass's first and last step log
SAFECLIP = ["--defense", "safeclip", "--safeclip-unimodal-warmup-epochs", "1", "--safeclip-multimodal-warmup-epochs",
            "1", "--safeclip-memory-bank", "16", "--safeclip-similarity", "inloop", "--safeclip-safe-input", "raw",
            "--safeclip-window-samples", "16", "--record-similarity"]


class ConversionCounter:
    """Counts host conversions called directly from safe-train code, keyed by the training step running.

    Sample ids are host tensors by design (int64, one per sample): converting them costs no sync, so int64
    tensors with at least one dimension are not counted; scalars and floating-point tensors are.
    """

    def __init__(self) -> None:
        self.step: tuple[int, str, int] | None = None  # (epoch, pass, index in pass) of the running step
        self.counts: Counter = Counter()
        self.where: dict[tuple, list[str]] = {}
        self.log_due: dict[tuple, bool] = {}

    def install(self, monkeypatch) -> None:
        for name in CONVERSIONS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        original_step, original_log = TrainStep.step, TrainStep.log
        counter = self

        def step(runner, i, batch):
            counter.step = (runner.ctx.epoch, runner.pass_.name, i)
            return original_step(runner, i, batch)

        def log(runner, i_accum, result, step_):
            batch_count = i_accum + 1
            due = i_accum % runner.ctx.args.log_every_n_steps == 0 or batch_count == runner.num_batches_per_epoch
            counter.log_due[counter.step] = due
            return original_log(runner, i_accum, result, step_)

        monkeypatch.setattr(TrainStep, "step", step)
        monkeypatch.setattr(TrainStep, "log", log)

    def _wrap(self, method, name: str):
        counter = self

        def counted(tensor, *args, **kwargs):
            caller = inspect.currentframe().f_back
            if caller.f_code.co_filename.startswith(PACKAGE_DIR) and counter.step is not None and not (
                    tensor.dtype == torch.int64 and tensor.dim() > 0):
                counter.counts[counter.step] += 1
                counter.where.setdefault(counter.step, []).append(
                    f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return method(tensor, *args, **kwargs)

        return counted


@pytest.mark.usefixtures("wordnet")
def test_no_host_sync_on_steps_that_do_not_log(csv_64, tmp_path, monkeypatch):
    """SafeCLIP with the memory bank, in-loop similarity and the similarity recorder (every per-step hook this
    package has): steps that do not log convert nothing; logging steps do (the counter sees them). The bank
    lives on the model's device and a non-finite row is counted, not enqueued."""
    counter = ConversionCounter()
    counter.install(monkeypatch)
    banks: list[tuple[torch.device, torch.device, bool]] = []
    original_step_end = SafeClip.on_step_end

    def on_step_end(defense, ctx, step):
        if ctx.epoch == 0 and step.batch_index == 2:  # an fp16 overflow in one row of view 1
            features = dict(step.features)
            features["image_features"] = features["image_features"].clone()
            features["image_features"][0] = math.inf
            original, step.features = step.features, features
            original_step_end(defense, ctx, step)
            step.features = original
        else:
            original_step_end(defense, ctx, step)
        banks.extend((bank.device, ctx.device, bool(torch.isfinite(bank.features).all()))
                     for bank in defense.banks.values())

    monkeypatch.setattr(SafeClip, "on_step_end", on_step_end)
    flags = train_flags(csv_64, tmp_path, "nosync", epochs=3, batch_size=8, workers=1, extra=SAFECLIP)
    flags[flags.index("--log-every-n-steps") + 1] = str(LOG_EVERY)
    assert run_safe_train(flags) == 0

    assert len(counter.log_due) == 24  # 3 epochs (unimodal, multimodal, one in-loop split epoch) x 8 steps
    assert {name for _, name, _ in counter.log_due} == {"unimodal", "multimodal", "split"}
    quiet = [key for key, due in counter.log_due.items() if not due]
    assert len(quiet) == 18  # the first and the last step of each epoch log
    syncs = {key: counter.where[key] for key in quiet if counter.counts[key]}
    assert not syncs, f"host conversions on steps that do not log: {syncs}"
    assert all(counter.counts[key] > 0 for key, due in counter.log_due.items() if due)  # the counter sees them

    assert banks and all(bank == model for bank, model, _ in banks)
    assert all(finite for _, _, finite in banks)
    log = (tmp_path / "nosync" / "out.log").read_text()
    assert re.search(r"Epoch 0 safe-train: .*safeclip_bank_rejected_rows: 1\b", log)
    assert re.search(r"Epoch 1 safe-train: .*safeclip_bank_rejected_rows: 0\b", log)
    table = load_table(tmp_path / "nosync", 3)  # buffered similarities reached the table at the epoch end
    assert np.isfinite(table["similarity"]).sum() >= 56 and np.isfinite(table["train_similarity"]).sum() >= 56


def test_bank_rejects_non_finite_rows_and_keeps_the_old_entries():
    bank = FeatureBank(size=4, dim=3, seed=0, device="cpu")
    assert bank.device == torch.device("cpu")
    before = bank.features.clone()
    rows = torch.full((3, 3), 2.0)
    rows[1, 2] = float("nan")
    bank.enqueue(rows)
    assert bank.pointer == 3 and int(bank.rejected) == 1
    assert (bank.features[[0, 2]] == 2.0).all() and torch.equal(bank.features[1], before[1])
    wrap = torch.full((2, 3), 5.0)
    wrap[0, 0] = float("-inf")  # goes to slot 3: keeps its old entry
    bank.enqueue(wrap)
    assert bank.pointer == 1 and int(bank.rejected) == 2
    assert torch.equal(bank.features[3], before[3]) and (bank.features[0] == 5.0).all()
    whole = torch.full((6, 3), 7.0)
    whole[-1] = float("nan")  # longer than the bank: the last 4 rows replace it, the bad one keeps its slot
    bank.enqueue(whole)
    assert int(bank.rejected) == 3 and (bank.features[:3] == 7.0).all() and torch.equal(bank.features[3], before[3])
    assert torch.isfinite(bank.features).all()
    # all-finite rows: exactly the plain FIFO (no change on CPU)
    plain = FeatureBank(size=4, dim=3, seed=1)
    fresh = F.normalize(torch.randn(3, 3, generator=torch.Generator().manual_seed(5)), dim=-1)
    expected = plain.features.clone()
    expected[:3] = fresh
    plain.enqueue(fresh)
    assert torch.equal(plain.features, expected) and int(plain.rejected) == 0
    restored = FeatureBank.from_state(plain.state_dict(), device="cpu")
    assert torch.equal(restored.features, plain.features) and restored.pointer == 3


def test_synthetic_dataset_trains_with_defense_none(tmp_path):
    """OpenCLIP's smoke-test data: one constant pair, so the loss stays at ln(batch); ids are the indices."""
    flags = train_flags("unused", tmp_path, "synthetic", epochs=1, batch_size=8, dataset_type="synthetic",
                        extra=["--train-num-samples", "24", "--record-similarity"])
    del flags[flags.index("--train-data"):flags.index("--train-data") + 2]
    assert run_safe_train(flags) == 0
    log = (tmp_path / "synthetic" / "out.log").read_text()
    losses = [float(v) for v in re.findall(r"Contrastive_loss: ([0-9.]+)", log)]
    assert len(losses) == 3 and all(v == pytest.approx(math.log(8), abs=1e-3) for v in losses)
    table = load_table(tmp_path / "synthetic", 1)
    assert set(table.ids.tolist()) <= set(range(24)) and np.isfinite(table["train_similarity"]).sum() == 24


@pytest.mark.parametrize("extra, message", [
    (["--train-num-samples", "24", "--defense", "cleanclip"], "runs only with --defense none"),
    ([], "needs --train-num-samples"),
])
def test_synthetic_dataset_rejects_what_it_cannot_run(extra, message, tmp_path, capsys):
    flags = train_flags("unused", tmp_path, "synthetic_bad", dataset_type="synthetic", extra=extra)
    del flags[flags.index("--train-data"):flags.index("--train-data") + 2]
    assert run_safe_train(flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
