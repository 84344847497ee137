"""Upstream flags keep working through safe-train: validation, precision, grad checkpointing,
tensorboard, save-most-recent / delete-previous-checkpoint (with our sidecars following them)."""

from __future__ import annotations

import json

from conftest import train_flags
from helpers import run_safe_train


def test_upstream_flags_keep_working(csv_64, tmp_path):
    flags = train_flags(csv_64, tmp_path, "up", epochs=2, batch_size=8, extra=[
        "--val-data", str(csv_64), "--val-frequency", "1", "--precision", "amp_bf16", "--grad-checkpointing",
        "--report-to", "tensorboard", "--save-most-recent", "--delete-previous-checkpoint", "--track-samples",
    ])
    assert run_safe_train(flags) == 0
    run = tmp_path / "up"
    results = [json.loads(line) for line in (run / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in results] == [1, 2]  # OpenCLIP's own validation ran on the val set
    assert results[-1]["num_samples"] == 64 and "image_to_text_R@1" in results[-1]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    # sidecars follow OpenCLIP's checkpoint policy: latest kept, previous epoch deleted
    assert checkpoints == ["epoch_2.pt", "epoch_2.safe_train", "epoch_latest.pt", "epoch_latest.safe_train",
                           "results.jsonl"]
    log = (run / "out.log").read_text()
    assert "grad_checkpointing: True" in log and "precision: amp_bf16" in log


def test_in_loop_zeroshot_evaluation(csv_64, tmp_path):
    """--eval-data: clean accuracy every epoch, written to evaluations.jsonl and the log."""
    labels = ["filepath\tlabel"]
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for line in csv_64.read_text().splitlines()[1:]:
        path, caption = line.split("\t")
        labels.append(f"{path}\t{words.index(caption.split()[-1].rstrip('.'))}")
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("\n".join(labels) + "\n")
    flags = train_flags(csv_64, tmp_path, "ev", epochs=2, extra=["--eval-data", str(test_csv), "--eval-every", "1"])
    assert run_safe_train(flags) == 0
    evaluations = [json.loads(x) for x in (tmp_path / "ev" / "evaluations.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evaluations] == [1, 2]
    assert all(0.0 <= e["clean_top1"] <= 1.0 and e["n_eval"] == 64 and e["asr"] is None for e in evaluations)
    assert "eval_clean_top1" in (tmp_path / "ev" / "out.log").read_text()
