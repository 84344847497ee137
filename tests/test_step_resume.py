"""Exact mid-epoch resume (issue 14): a run stopped by a real SIGUSR1/SIGTERM at any step of any pass writes a
step checkpoint, exits with EXIT_PREEMPTED, and `--resume latest` continues it so that its per-step losses,
its per-sample table and its final weights equal the uninterrupted run's."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import numpy as np
import plugins  # noqa: F401  (registers the test_signal_at callback)
import pytest
import torch
from conftest import PYTHON, base_env, train_flags
from helpers import load_state_dict, load_table, run_safe_train, with_callbacks

from safe_train.errors import EXIT_PREEMPTED
from safe_train.interface import Callback

LAUNCH = str(Path(__file__).parent / "launch.py")
SAFECLIP = ["--defense", "safeclip", "--safeclip-unimodal-warmup-epochs", "1",
            "--safeclip-multimodal-warmup-epochs", "1", "--safeclip-multimodal-lr", "1e-4"]


class StepLosses(Callback):
    """Records every optimizer step's total loss (every defense, every pass)."""

    name = "test_step_losses"

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_step_end(self, ctx, step) -> None:
        self.values.append(step.losses["loss"])


def _run(monkeypatch, flags: list[str]) -> tuple[int, list[float]]:
    recorder = StepLosses()
    with_callbacks(monkeypatch, recorder)
    code = run_safe_train(flags)
    with_callbacks(monkeypatch)
    return code, recorder.values


def _assert_same_run(a: Path, b: Path, epoch: int) -> None:
    wa, wb = load_state_dict(a, epoch), load_state_dict(b, epoch)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6, msg=key)
    ta, tb = load_table(a, epoch), load_table(b, epoch)
    np.testing.assert_array_equal(ta.ids, tb.ids)
    assert ta.columns == tb.columns
    for name in ta.columns:
        np.testing.assert_allclose(ta[name].astype(np.float64), tb[name].astype(np.float64), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def _stop_and_resume(monkeypatch, tmp_path, data, *, epochs: int, stop: list[str], extra: list[str],
                     dataset_type: str = "csv", workers: int = 0) -> None:
    flags = dict(epochs=epochs, workers=workers, dataset_type=dataset_type)
    code, straight = _run(monkeypatch, train_flags(data, tmp_path, "straight", extra=extra, **flags))
    assert code == 0
    code, before = _run(monkeypatch, train_flags(data, tmp_path, "cut", extra=extra + stop, **flags))
    assert code == EXIT_PREEMPTED
    steps = sorted((tmp_path / "cut/checkpoints").glob("step_*.pt"))
    assert len(steps) == 1, steps
    code, after = _run(monkeypatch, train_flags(data, tmp_path, "cut", extra=extra + ["--resume", "latest"], **flags))
    assert code == 0
    assert len(before) + len(after) == len(straight)
    torch.testing.assert_close(torch.tensor(before + after), torch.tensor(straight), rtol=1e-5, atol=1e-6)
    _assert_same_run(tmp_path / "straight", tmp_path / "cut", epochs)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigusr1_mid_epoch_resumes_exactly_csv(workers, csv_64, tmp_path, monkeypatch):
    _stop_and_resume(monkeypatch, tmp_path, csv_64, epochs=2, workers=workers, extra=["--track-samples"],
                     stop=["--test-signal-at-step", "11"])


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_mid_epoch_resumes_exactly_webdataset(workers, wds_4x16, tmp_path, monkeypatch):
    _stop_and_resume(monkeypatch, tmp_path, wds_4x16, epochs=2, workers=workers, dataset_type="webdataset",
                     extra=["--track-samples"], stop=["--test-signal-at-step", "5", "--test-signal-name", "SIGTERM"])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_with_dataset_resampled(workers, wds_4x16, tmp_path, monkeypatch):
    _stop_and_resume(monkeypatch, tmp_path, wds_4x16, epochs=2, workers=workers, dataset_type="webdataset",
                     extra=["--track-samples", "--dataset-resampled", "--train-num-samples", "64"],
                     stop=["--test-signal-at-step", "10"])


@pytest.mark.parametrize("where", [
    pytest.param(["--test-signal-at-inference-batch", "3"], id="similarity-pass"),
    pytest.param(["--test-signal-at-step", "18"], id="risky-pass", marks=pytest.mark.slow),
    # (epoch 2 trains 55 risky samples in steps 17-23, the last a partial one of 7, then 9 safe ones in 24-25)
    pytest.param(["--test-signal-at-step", "24"], id="safe-pass", marks=pytest.mark.slow),
])
def test_safeclip_resumes_exactly_from_any_pass(where, csv_64, tmp_path, monkeypatch):
    _stop_and_resume(monkeypatch, tmp_path, csv_64, epochs=3, extra=SAFECLIP, stop=where)


@pytest.mark.slow
def test_safeclip_webdataset_two_workers_resumes_exactly(wds_4x16, tmp_path, monkeypatch):
    _stop_and_resume(monkeypatch, tmp_path, wds_4x16, epochs=3, workers=2, dataset_type="webdataset",
                     extra=SAFECLIP, stop=["--test-signal-at-step", "19"])


@pytest.mark.parametrize("reference", [
    pytest.param([], id="batch"),
    pytest.param(["--detect-reference", "global", "--detect-reference-size", "32"], id="global"),
])
def test_detection_drop_resumes_exactly(reference, csv_64, tmp_path, monkeypatch):
    extra = ["--track-samples", "--detect", "kdist", "--detect-action", "drop", "--detect-drop-fraction", "0.25",
             "--detect-drop-epoch", "0", *reference]
    _stop_and_resume(monkeypatch, tmp_path, csv_64, epochs=2, extra=extra, stop=["--test-signal-at-step", "6"])


def test_second_signal_during_the_checkpoint_write_changes_nothing(csv_64, tmp_path, monkeypatch):
    """Run as a subprocess: the test callback's second signal arrives inside the model file's write."""
    flags = train_flags(csv_64, tmp_path, "twice", epochs=1, extra=[
        "--track-samples", "--test-signal-at-step", "3", "--test-signal-twice"])
    proc = subprocess.run([PYTHON, LAUNCH, *flags], env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-2000:]
    assert "stopped by SIGUSR1 at global step 3" in proc.stderr
    checkpoint = tmp_path / "twice/checkpoints/step_000000003.pt"
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 0
    proc = subprocess.run([PYTHON, LAUNCH, *flags[:-4], "--resume", "latest"], env=base_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "twice/out.log").read_text()
    assert "mid-epoch at global step 3" in log


def _torchrun(flags: list[str]) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", LAUNCH, *flags]
    return subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=600)


def _logged_losses(run_dir: Path) -> list[float]:
    return [float(m) for m in re.findall(r"Loss: ([0-9.]+) \(", (run_dir / "out.log").read_text())]


@pytest.mark.parametrize("defense, kind, workers", [
    pytest.param([], "csv", 0, id="none-csv"),
    pytest.param([], "webdataset", 2, id="none-webdataset-2workers", marks=pytest.mark.slow),
    pytest.param(SAFECLIP, "csv", 2, id="safeclip-csv-2workers", marks=pytest.mark.slow),
    pytest.param(SAFECLIP, "webdataset", 0, id="safeclip-webdataset", marks=pytest.mark.slow),
])
def test_two_ranks_stop_at_the_same_step_and_resume_exactly(defense, kind, workers, csv_64, wds_4x16, tmp_path):
    """Rank 1 alone gets the signal: both ranks agree on the step, write their parts, and exit 75."""
    epochs = 3 if defense else 2
    data = csv_64 if kind == "csv" else wds_4x16
    extra = defense + ["--track-samples", "--dist-backend", "gloo"]

    def flags(name: str, more: list[str]) -> list[str]:
        return train_flags(data, tmp_path, name, epochs=epochs, workers=workers, dataset_type=kind, extra=extra + more)

    straight = _torchrun(flags("straight", []))
    assert straight.returncode == 0, straight.stderr[-3000:]
    cut = _torchrun(flags("cut", ["--test-signal-at-step", "3", "--test-signal-rank", "1"]))
    assert cut.returncode != 0
    assert cut.stderr.count("stopped by") == 2 or "exitcode  : 75" in cut.stderr, cut.stderr[-3000:]
    side = tmp_path / "cut/checkpoints/step_000000003.safe_train"
    assert (side / "rank0.state").exists() and (side / "rank1.state").exists()
    resumed = _torchrun(flags("cut", ["--resume", "latest"]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(tmp_path / "straight", tmp_path / "cut", epochs)
    assert _logged_losses(tmp_path / "cut") == pytest.approx(_logged_losses(tmp_path / "straight"), rel=1e-4)


def test_a_step_checkpoint_refuses_another_world_size(csv_64, tmp_path, monkeypatch, capsys):
    flags = train_flags(csv_64, tmp_path, "w", epochs=1, extra=["--track-samples", "--save-every-n-steps", "3"])
    assert run_safe_train(flags) == 0
    state = tmp_path / "w/checkpoints/step_000000006.safe_train/engine.ckpt"
    engine_state = torch.load(state, weights_only=True)
    engine_state["world_size"] = 2
    torch.save(engine_state, state)
    resume = train_flags(csv_64, tmp_path, "w2", epochs=1, extra=[
        "--track-samples", "--resume", str(tmp_path / "w/checkpoints/step_000000006.pt")])
    assert run_safe_train(resume) == 2
    assert "mid-epoch checkpoint of 2 ranks and cannot resume on 1" in capsys.readouterr().err


@pytest.mark.parametrize("in_checkpoint", [
    pytest.param(False, id="mid-step"),
    pytest.param(True, id="while-writing-a-step-checkpoint"),
])
def test_a_dead_rank_ends_the_other_within_seconds(in_checkpoint, csv_64, tmp_path):
    """SIGKILL of rank 1 (no warning): rank 0 must not wait in a collective; torchrun ends within seconds."""
    stamp = tmp_path / "killed_at"
    kill = (["--test-kill-in-checkpoint"] if in_checkpoint else ["--test-signal-name", "SIGKILL"])
    flags = train_flags(csv_64, tmp_path, "dead", epochs=2, extra=[
        "--track-samples", "--dist-backend", "gloo", "--test-signal-at-step", "3", "--test-signal-rank", "1",
        "--test-signal-stamp", str(stamp), *kill])
    proc = _torchrun(flags)
    ended = time.time()
    assert proc.returncode != 0
    assert stamp.exists(), proc.stderr[-3000:]
    assert ended - float(stamp.read_text()) < 15.0, proc.stderr[-3000:]
    # the interrupted checkpoint never becomes a resumable one
    assert not list((tmp_path / "dead/checkpoints").glob("step_*.pt"))


def test_consumed_samples_are_not_decoded_again(csv_64, wds_4x16, tmp_path, monkeypatch):
    """The resumed run transforms only the samples it still trains on (CSV and webdataset, 0 workers)."""
    import safe_train.data as data_module

    calls = {"n": 0}
    original = data_module.OpenClipTransform.__call__

    def counting(self, *args):
        calls["n"] += 1
        return original(self, *args)

    for data, kind in ((csv_64, "csv"), (wds_4x16, "webdataset")):
        flags = dict(epochs=1, dataset_type=kind)
        name = f"count-{kind}"
        code, _ = _run(monkeypatch, train_flags(data, tmp_path, name, extra=["--test-signal-at-step", "5"], **flags))
        assert code == EXIT_PREEMPTED
        monkeypatch.setattr(data_module.OpenClipTransform, "__call__", counting)
        calls["n"] = 0
        code, after = _run(monkeypatch, train_flags(data, tmp_path, name, extra=["--resume", "latest"], **flags))
        monkeypatch.setattr(data_module.OpenClipTransform, "__call__", original)
        assert code == 0 and len(after) == 3
        assert calls["n"] == 3 * 8, kind  # 3 remaining steps of 8 samples; the 40 trained on are never decoded
