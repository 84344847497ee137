"""Defense extension points: inference passes, per-epoch sample selection, blocklists, LR schedule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import plugins  # noqa: F401  (registers test_pass_plan)
import pytest
from conftest import PYTHON, base_env, train_flags
from helpers import load_table, run_safe_train

from safe_train.engine import Engine
from safe_train.interface import Defense, Selection

LAUNCH = str(Path(__file__).parent / "launch.py")


def test_selection_restricts_training_and_inference_sees_everything_csv(csv_64, tmp_path):
    assert run_safe_train(train_flags(csv_64, tmp_path, "p", epochs=2, extra=["--defense", "test_pass_plan"])) == 0
    table = load_table(tmp_path / "p", 2)
    chosen = table["chosen"]
    assert chosen.sum() == 32
    # every epoch trains exactly the chosen half once, and the inference pass saw every sample
    np.testing.assert_array_equal(table["times_seen"][chosen], 2)
    np.testing.assert_array_equal(table["times_seen"][~chosen], 0)
    np.testing.assert_array_equal(table["inference_seen"], 1)


@pytest.mark.parametrize("ranks", [1, 2])
def test_selection_with_webdataset_filters_in_the_pipeline(ranks, wds_4x16, tmp_path):
    flags = train_flags(wds_4x16, tmp_path, "w", epochs=2, dataset_type="webdataset", workers=1,
                        extra=["--defense", "test_pass_plan"])
    cmd = [PYTHON, LAUNCH, *flags] if ranks == 1 else [
        PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", LAUNCH, *flags]
    proc = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = load_table(tmp_path / "w", 2)
    chosen = table["chosen"]
    assert len(table) == 64 and chosen.sum() == 32
    # epoch 0 trained everyone (ids unknown before the first webdataset epoch), epoch 1 only the chosen
    np.testing.assert_array_equal(table["times_seen"][~chosen], 1)
    if ranks == 1:
        np.testing.assert_array_equal(table["times_seen"][chosen], 2)
    else:
        # uneven per-rank shares: every chosen sample trained, the shorter stream repeats (bounded)
        assert (table["times_seen"][chosen] >= 2).all()
        assert table["times_seen"][chosen].sum() - 64 <= 32
    np.testing.assert_array_equal(table["inference_seen"], 1)


def test_blocklist_excludes_ids_from_every_epoch(csv_64, tmp_path):
    blocked = np.arange(0, 64, 4)
    (tmp_path / "block.txt").write_text("# ids to skip\n" + "\n".join(map(str, blocked)) + "\n")
    assert run_safe_train(train_flags(csv_64, tmp_path, "b", epochs=2, batch_size=8,
                                      extra=["--track-samples", "--blocklist", str(tmp_path / "block.txt")])) == 0
    table = load_table(tmp_path / "b", 2)
    seen = table.ids[table["times_seen"] > 0]
    assert not np.isin(blocked, seen).any()
    assert len(seen) == 48 and (table["times_seen"][table["times_seen"] > 0] == 2).all()


def test_lr_schedule_spreads_subset_passes_over_the_epoch():
    engine = Engine(Defense())
    base = 10
    # a full-length epoch maps 1:1, like OpenCLIP
    assert [engine._lr_step(base, 2, i, base) for i in range(3)] == [20, 21, 22]
    # an epoch of 4 steps (e.g. a small safe set) still walks the epoch's whole share of the schedule
    steps = [engine._lr_step(base, 2, i, 4) for i in range(4)]
    assert steps == [20, 22, 25, 27] and steps[-1] < 30
    # an epoch of 25 steps (several passes) stays inside the epoch too
    steps = [engine._lr_step(base, 1, i, 25) for i in range(25)]
    assert steps[0] == 10 and steps[-1] == 19 and steps == sorted(steps)


def test_selection_semantics():
    inc = Selection.including([5, 1, 3])
    exc = Selection.excluding([3])
    np.testing.assert_array_equal(inc.allows(np.array([1, 2, 3, 5])), [True, False, True, True])
    np.testing.assert_array_equal(exc.allows(np.array([1, 3])), [True, False])
    from safe_train.engine import _intersect

    both = _intersect(inc, exc)
    assert not both.exclude and both.ids.tolist() == [1, 5]
    assert _intersect(exc, Selection.excluding([7])).ids.tolist() == [3, 7]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
