"""`--defense none` IS OpenCLIP: same per-step losses and weights as open_clip_train.main."""

from __future__ import annotations

import torch
from conftest import train_flags
from helpers import load_state_dict, recording_losses, run_safe_train, run_upstream


def _upstream_flags(flags: list[str]) -> list[str]:
    i = flags.index("--log-root")
    return flags[:i] + ["--logs", flags[i + 1]] + flags[i + 2:]


def test_defense_none_matches_open_clip_train(csv_64, tmp_path):
    flags = train_flags(csv_64, tmp_path, "x", epochs=2, batch_size=8)
    with recording_losses() as upstream_losses:
        assert run_upstream(_upstream_flags(flags[:-4] + ["--name", "upstream"] + flags[-2:])) in (None, 0)
    with recording_losses() as our_losses:
        assert run_safe_train(flags[:-4] + ["--name", "ours", "--defense", "none"] + flags[-2:]) == 0
    assert len(upstream_losses) == 16  # 64 samples / batch 8 x 2 epochs
    assert len(our_losses) == len(upstream_losses)
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(upstream_losses), rtol=1e-5, atol=1e-6)
    ours, theirs = load_state_dict(tmp_path / "ours", 2), load_state_dict(tmp_path / "upstream", 2)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
    # and training did move the weights (the comparison is not between two untouched inits)
    assert not torch.equal(ours["logit_scale"], torch.tensor(torch.log(torch.tensor(1 / 0.07)).item()))


def test_defense_none_matches_with_accum_freq(csv_64, tmp_path):
    flags = train_flags(csv_64, tmp_path, "x", epochs=1, batch_size=8, extra=["--accum-freq", "2"])
    with recording_losses() as upstream_losses:
        assert run_upstream(_upstream_flags(flags[:-6] + ["--name", "upstream"] + flags[-4:])) in (None, 0)
    with recording_losses() as our_losses:
        assert run_safe_train(flags[:-6] + ["--name", "ours"] + flags[-4:]) == 0
    assert len(our_losses) == len(upstream_losses) == 8  # 4 optimizer steps x 2 re-forwards
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(upstream_losses), rtol=1e-5, atol=1e-6)
