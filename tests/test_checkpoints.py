"""Checkpoint and sidecar are one unit: atomic writes, stamps, and a resolver that only resumes a pair that belongs
together (issue 14, faults 3-5 and 7-8)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from safe_train.checkpoint import (
    CORRUPT_SUFFIX,
    STAMP_KEY,
    atomic_save,
    load_checkpoint_file,
    prune_step_checkpoints,
    remove_orphan_sidecars,
    resolve_latest,
    retire_replaced_sidecars,
    sidecar_path,
    step_checkpoint_path,
)
from safe_train.errors import CheckpointError


def _write_pair(directory, name: str, global_step: int, token: str, sidecar_token: str | None = "same",
                epoch: int = 1) -> None:
    path = directory / name
    stamp = {"token": token, "global_step": global_step, "epoch": epoch}
    atomic_save({"epoch": epoch, "state_dict": {"w": torch.zeros(2)}, "optimizer": {}, STAMP_KEY: stamp}, path)
    if sidecar_token is not None:
        side = sidecar_path(path)
        side.mkdir()
        meta_token = token if sidecar_token == "same" else sidecar_token
        (side / "meta.json").write_text(json.dumps({"token": meta_token, "global_step": global_step,
                                                    "world_size": 1}))
        if name.startswith("step_"):
            (side / "rank0.state").write_bytes(b"")  # every rank's part of a step checkpoint


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "epoch_1.pt"
    atomic_save({"epoch": 1}, target)
    real_save = torch.save

    def dies_half_way(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # stands in for a kill during the write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(target, weights_only=True) == {"epoch": 1}  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pt"]


def test_resolver_picks_the_newest_consistent_pair_and_sets_broken_files_aside(tmp_path, caplog):
    _write_pair(tmp_path, "epoch_1.pt", 8, "a")
    (tmp_path / "epoch_2.pt").write_bytes(b"")  # fault 4: a kill during OpenCLIP's in-place save
    _write_pair(tmp_path, "epoch_latest.pt", 16, "b", sidecar_token="c")  # fault 3: state of another save
    _write_pair(tmp_path, "step_000000012.pt", 12, "d", sidecar_token=None)  # its sidecar was deleted by hand
    _write_pair(tmp_path, "step_000000010.pt", 10, "e")
    (tmp_path / "tmp.pt").write_bytes(b"garbage")  # OpenCLIP's temporary name is never a candidate

    chosen = resolve_latest(tmp_path, needs_sidecar=True, set_aside=True)
    assert chosen == tmp_path / "step_000000010.pt"
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "epoch_2.pt is empty" in messages
    assert "come from different saves" in messages
    assert "step_000000012.pt has no complete safe-train state" in messages
    assert (tmp_path / ("epoch_2.pt" + CORRUPT_SUFFIX)).exists() and not (tmp_path / "epoch_2.pt").exists()
    assert (tmp_path / "epoch_latest.pt").exists()  # readable files are never renamed


def test_the_previous_sidecar_still_pairs_with_the_checkpoint_it_belongs_to(tmp_path):
    """epoch_latest: its new sidecar is published at the epoch's end, the model only after evaluation; a kill
    in between must leave the old pair usable (the replaced sidecar is kept as NAME.prev)."""
    from safe_train.checkpoint import matching_sidecar, publish_sidecar

    _write_pair(tmp_path, "epoch_latest.pt", 8, "old")
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "meta.json").write_text(json.dumps({"token": "new", "global_step": 16}))
    publish_sidecar(staged, sidecar_path(tmp_path / "epoch_latest.pt"))  # ... and the kill comes here
    assert resolve_latest(tmp_path, needs_sidecar=True) == tmp_path / "epoch_latest.pt"
    assert matching_sidecar(tmp_path / "epoch_latest.pt", "old").name == "epoch_latest.safe_train.prev"
    retire_replaced_sidecars(tmp_path)  # the old model is still in place: its sidecar must stay
    assert matching_sidecar(tmp_path / "epoch_latest.pt", "old").name == "epoch_latest.safe_train.prev"

    # OpenCLIP then moves tmp.pt over epoch_latest.pt: the kept sidecar has nothing left to pair with
    atomic_save({"epoch": 2, "state_dict": {}, "optimizer": {}, STAMP_KEY: {"token": "new", "global_step": 16}},
                tmp_path / "tmp.pt")
    os.replace(tmp_path / "tmp.pt", tmp_path / "epoch_latest.pt")
    retire_replaced_sidecars(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_latest.pt", "epoch_latest.safe_train"]


def test_resolver_prefers_an_epoch_checkpoint_at_the_same_step_and_returns_none_when_nothing_fits(tmp_path):
    _write_pair(tmp_path, "step_000000008.pt", 8, "a")
    _write_pair(tmp_path, "epoch_1.pt", 8, "b")
    assert resolve_latest(tmp_path, needs_sidecar=True) == tmp_path / "epoch_1.pt"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "epoch_1.pt").write_bytes(b"\x00" * 10)
    assert resolve_latest(empty, needs_sidecar=True) is None
    assert resolve_latest(tmp_path / "missing", needs_sidecar=True) is None


def test_unstamped_upstream_checkpoints_resume_when_no_state_is_needed(tmp_path):
    torch.save({"epoch": 2, "state_dict": {}, "optimizer": {}}, tmp_path / "epoch_2.pt")
    assert resolve_latest(tmp_path, needs_sidecar=False) == tmp_path / "epoch_2.pt"
    assert resolve_latest(tmp_path, needs_sidecar=True) is None


def test_prune_keeps_the_newest_step_checkpoints_and_orphans_are_removed(tmp_path):
    for step in (4, 8, 12):
        _write_pair(tmp_path, step_checkpoint_path(tmp_path, step).name, step, f"t{step}")
    prune_step_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_000000008.pt", "step_000000012.pt"]
    assert not sidecar_path(tmp_path / "step_000000004.pt").exists()
    (tmp_path / "epoch_1.safe_train").mkdir()  # fault 5: its epoch_1.pt was deleted by --delete-previous-checkpoint
    (tmp_path / "step_000000016.safe_train.writing").mkdir()  # a write that was killed
    remove_orphan_sidecars(tmp_path)
    assert not (tmp_path / "epoch_1.safe_train").exists()
    assert not (tmp_path / "step_000000016.safe_train.writing").exists()
    assert sidecar_path(tmp_path / "step_000000008.pt").exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickle_with_code_is_refused_with_one_clear_error(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"epoch": 1, "state_dict": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint_file(path)
    truncated = tmp_path / "truncated.pt"
    torch.save({"epoch": 1, "state_dict": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint_file(truncated)


# ---- a kill at every phase of a checkpoint write, then --resume latest ------------------------------------------
class KilledDuringWrite(Exception):
    """Stands in for a SIGKILL at one phase of a checkpoint write."""


def _kill_when(monkeypatch, phase: str) -> None:
    import safe_train.engine as engine_module
    from safe_train.state import SampleTable

    real_atomic_save, real_table_save, real_savez = engine_module.atomic_save, SampleTable.save, engine_module.np.savez

    def atomic_save(obj, path):
        name = os.path.basename(str(path))
        if phase == "epoch-before-model" and name == "epoch_2.pt":
            raise KilledDuringWrite
        if phase == "epoch-during-model" and name == "epoch_2.pt":
            with open(f"{path}.{os.getpid()}.partial", "wb") as f:
                f.write(b"PK\x03\x04 half a checkpoint")
            raise KilledDuringWrite
        if phase == "latest-after-epoch-model" and name == "tmp.pt":
            raise KilledDuringWrite
        if phase == "step-before-model" and name == "step_000000012.pt":
            raise KilledDuringWrite
        real_atomic_save(obj, path)

    def table_save(self, directory):
        if phase == "epoch-sidecar" and "epoch_2.safe_train" in str(directory):
            raise KilledDuringWrite
        real_table_save(self, directory)

    def savez(path, **arrays):
        if phase == "step-rank-state" and "step_000000012" in str(path):
            raise KilledDuringWrite
        real_savez(path, **arrays)

    monkeypatch.setattr(engine_module, "atomic_save", atomic_save)
    monkeypatch.setattr(engine_module.np, "savez", savez)
    monkeypatch.setattr(SampleTable, "save", table_save)


@pytest.fixture(scope="module")
def uninterrupted(csv_64, tmp_path_factory):
    from conftest import train_flags
    from helpers import run_safe_train

    logs = tmp_path_factory.mktemp("uninterrupted")
    flags = train_flags(csv_64, logs, "straight", epochs=3, extra=_KILL_FLAGS)
    assert run_safe_train(flags) == 0
    return logs / "straight"


_KILL_FLAGS = ["--record-similarity", "--track-samples", "--save-most-recent", "--save-every-n-steps", "4"]


@pytest.mark.parametrize("phase", [
    pytest.param("epoch-sidecar", marks=pytest.mark.slow),
    pytest.param("epoch-before-model", marks=pytest.mark.slow),
    "epoch-during-model",
    pytest.param("latest-after-epoch-model", marks=pytest.mark.slow),
    pytest.param("step-rank-state", marks=pytest.mark.slow),
    "step-before-model",
])
def test_a_kill_at_any_phase_of_a_checkpoint_write_resumes_exactly(phase, csv_64, tmp_path, monkeypatch,
                                                                    uninterrupted):
    import numpy as np
    from conftest import train_flags
    from helpers import load_state_dict, load_table, run_safe_train

    _kill_when(monkeypatch, phase)
    with pytest.raises(KilledDuringWrite):
        run_safe_train(train_flags(csv_64, tmp_path, "cut", epochs=3, extra=_KILL_FLAGS))
    monkeypatch.undo()
    assert run_safe_train(train_flags(csv_64, tmp_path, "cut", epochs=3, extra=_KILL_FLAGS + ["--resume", "latest"])) == 0
    wa, wb = load_state_dict(uninterrupted, 3), load_state_dict(tmp_path / "cut", 3)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6, msg=key)
    ta, tb = load_table(uninterrupted, 3), load_table(tmp_path / "cut", 3)
    for name in ("times_seen", "train_similarity", "last_epoch"):
        np.testing.assert_allclose(ta[name], tb[name], rtol=1e-5, atol=1e-6, err_msg=name)
