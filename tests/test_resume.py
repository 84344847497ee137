"""Kill a run after an epoch, resume it: state, losses and weights continue as if uninterrupted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import train_flags
from helpers import (
    KillAtEpoch,
    Killed,
    load_state_dict,
    load_table,
    recording_losses,
    run_safe_train,
    with_callbacks,
)


def test_resume_continues_as_if_uninterrupted(csv_64, tmp_path, monkeypatch):
    extra = ["--record-similarity", "--track-samples"]
    with recording_losses() as straight:
        assert run_safe_train(train_flags(csv_64, tmp_path, "straight", epochs=3, extra=extra)) == 0

    with_callbacks(monkeypatch, KillAtEpoch(2))
    with recording_losses() as before_kill, pytest.raises(Killed):
        run_safe_train(train_flags(csv_64, tmp_path, "killed", epochs=3, extra=extra))
    with_callbacks(monkeypatch)
    assert (tmp_path / "killed/checkpoints/epoch_2.safe_train/table").exists()
    with recording_losses() as after_resume:
        assert run_safe_train(train_flags(csv_64, tmp_path, "killed", epochs=3, extra=extra + ["--resume", "latest"])) == 0

    assert len(straight) == 24 and len(before_kill) == 16 and len(after_resume) == 8
    torch.testing.assert_close(torch.tensor(before_kill + after_resume), torch.tensor(straight), rtol=1e-5, atol=1e-6)
    a, b = load_table(tmp_path / "straight", 3), load_table(tmp_path / "killed", 3)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a["times_seen"], np.full(64, 3))
    np.testing.assert_array_equal(a["times_seen"], b["times_seen"])
    np.testing.assert_allclose(a["train_similarity"], b["train_similarity"], rtol=1e-5, atol=1e-6)
    assert not np.isnan(a["train_similarity"]).any()
    wa, wb = load_state_dict(tmp_path / "straight", 3), load_state_dict(tmp_path / "killed", 3)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_refuses_state_of_another_defense(csv_64, tmp_path, capsys):
    import plugins  # noqa: F401  (registers test_pass_plan)

    assert run_safe_train(train_flags(csv_64, tmp_path, "r", epochs=1, extra=["--track-samples"])) == 0
    ckpt = tmp_path / "r/checkpoints/epoch_1.pt"
    code = run_safe_train(train_flags(csv_64, tmp_path, "r2", epochs=2,
                                      extra=["--defense", "test_pass_plan", "--resume", str(ckpt)]))
    assert code == 2  # one line on stderr, exit 2, no traceback
    assert "was trained with --defense none, not --defense test_pass_plan" in capsys.readouterr().err
