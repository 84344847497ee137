"""CUDA paths that a CPU can still check (issue 15): RNG state across a change in visible GPUs, the process
group's timeout, and the smoke script's dry mode."""

from __future__ import annotations

import datetime
import json
import sys

import pytest
import torch

from safe_train.openclip import capture_rng_state, restore_rng_state


class FakeCuda:
    """Per-device CUDA generators for a machine with ``visible`` GPUs, ``current`` being this task's."""

    def __init__(self, visible: int, current: int) -> None:
        self.visible, self.current = visible, current
        self.states = {d: torch.full((16,), d, dtype=torch.uint8) for d in range(visible)}

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.states[d] for d in range(self.visible)])

    def get(self, device: int | str = "cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set(self, state: torch.Tensor, device: int | str = "cuda") -> None:
        self.states[self._index(device)] = state.clone()

    def _index(self, device: int | str) -> int:
        index = device if isinstance(device, int) else self.current
        if index >= self.visible:
            raise IndexError(f"device {index} of {self.visible}")  # what torch raises for a missing GPU
        return index


def test_rng_saved_with_four_visible_gpus_resumes_on_a_task_that_sees_one(monkeypatch):
    """torchrun rank 3 (all 4 GPUs visible, its own is cuda:3) writes; the requeued job runs under srun with
    one GPU per task (cuda:0 only): the state of the GPU it trained on must come back, with no IndexError."""
    saver = FakeCuda(visible=4, current=3)
    saver.states[3] = torch.arange(16, dtype=torch.uint8)
    saver.install(monkeypatch)
    state = capture_rng_state()
    assert state["cuda"] == bytes(range(16))  # only this task's device

    loader = FakeCuda(visible=1, current=0)
    loader.install(monkeypatch)
    restore_rng_state(state)
    assert loader.states[0].tolist() == list(range(16))


def test_rng_of_the_old_per_gpu_format_still_loads_on_fewer_gpus(monkeypatch):
    old = FakeCuda(visible=4, current=0)
    state = capture_rng_state()  # CPU part only (CUDA is not faked yet)
    state["cuda"] = [s.numpy().tobytes() for s in old.states.values()]  # the earlier format: every GPU
    loader = FakeCuda(visible=1, current=0)
    loader.install(monkeypatch)
    restore_rng_state(state)
    assert loader.states[0].tolist() == [0] * 16


def test_process_group_gets_the_timeout_flag(monkeypatch):
    from safe_train.openclip.patch import process_group_timeout

    seen = {}

    def init_process_group(*args, **kwargs):
        seen.update(kwargs)

    wrapped = process_group_timeout(init_process_group, minutes=45.0)
    wrapped(backend="nccl", init_method="env://")
    assert seen["timeout"] == datetime.timedelta(minutes=45)
    wrapped(backend="gloo", timeout=datetime.timedelta(seconds=5))  # an explicit timeout wins
    assert seen["timeout"] == datetime.timedelta(seconds=5)


def test_timeout_flag_is_validated():
    from safe_train.errors import ConfigError
    from safe_train.main import build_engine

    with pytest.raises(ConfigError, match="dist-timeout-minutes"):
        build_engine(["--dist-timeout-minutes", "0", "--train-data", "x.csv"])


def test_a_run_installs_the_timeout_and_puts_init_process_group_back(monkeypatch):
    from safe_train import openclip as oc
    from safe_train.main import build_engine

    seen = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **kw: seen.update(kw))
    engine, _ = build_engine(["--dist-timeout-minutes", "7", "--train-data", "x.csv"])
    original = torch.distributed.init_process_group
    with oc.patched_openclip(engine):
        torch.distributed.init_process_group(backend="gloo")  # what open_clip_train.distributed calls
    assert seen["timeout"] == datetime.timedelta(minutes=7)
    assert torch.distributed.init_process_group is original


def _smoke_main():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("gpu_smoke", REPO / "benchmarks" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_knn_checks_run_in_dry_mode(tmp_path, capsys):
    """The smoke script's kNN checks on CPU: exact within the documented fp32 bound with TF32 switched on
    globally, and the timing line (the training checks run in the slow test below)."""
    smoke = _smoke_main()
    assert smoke.main(["--device", "cpu", "--out", str(tmp_path), "--only", "knn-exactness,knn-timing",
                       "--knn-sizes", "1500"]) == 0
    out = capsys.readouterr().out
    assert "PASS knn-exactness" in out and "PASS knn-timing-x64" in out and "2/2 passed" in out
    result = json.loads((tmp_path / "smoke.json").read_text())
    exact = next(c for c in result["checks"] if c["name"] == "knn-exactness")
    assert 0 < exact["figures"]["knn_d2_abs_err"] <= exact["figures"]["d2_bound"]
    assert torch.backends.cuda.matmul.allow_tf32 is False  # the check put the global flag back


def test_smoke_reports_a_failing_check_and_exits_non_zero(tmp_path, capsys, monkeypatch):
    smoke = _smoke_main()
    monkeypatch.setattr(smoke, "D2_ERROR_BOUND", 0.0)  # no fp32 kNN can meet a zero error bound
    assert smoke.main(["--device", "cpu", "--out", str(tmp_path), "--only", "knn-exactness"]) == 1
    assert "FAIL knn-exactness" in capsys.readouterr().out


@pytest.mark.slow
def test_smoke_runs_end_to_end_in_dry_mode(tmp_path, capsys):
    """Every check of benchmarks/gpu_smoke.py on CPU (about 11 minutes on 2 cores)."""
    smoke = _smoke_main()
    rc = smoke.main(["--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("PASS ") == 10, out
