"""The detection benchmarks of issue 16 (benchmarks/detect_overhead.py, detect_throughput.py, detect_global_scale.py)
still run: their --help, and each measurement on a tiny input. Numbers are not checked (a shared CI machine);
what is checked is that every part is measured and that the planted poisons are found, so a benchmark that
silently measures nothing (a renamed function no longer wrapped, a detector no longer reached) fails here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import detect_aggregate  # noqa: E402
import detect_auto  # noqa: E402
import detect_global_scale  # noqa: E402
import detect_overhead  # noqa: E402
import detect_throughput  # noqa: E402

import safe_train.detect  # noqa: E402,F401  (heavy: open_clip, torchvision; imported once here, not in a test)
from safe_train.detection.knn import faiss_available  # noqa: E402

BACKENDS = ["torch", "faiss"] if faiss_available() else ["torch"]


@pytest.mark.parametrize("script", ["detect_overhead.py", "detect_throughput.py", "detect_global_scale.py"])
def test_help(script: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_synthetic_embeddings_are_unit_rows_with_a_tight_poison_cluster() -> None:
    image, text, poisoned = detect_global_scale.make_embeddings(2000, 40, clusters=10)
    again = detect_global_scale.make_embeddings(2000, 40, clusters=10)
    assert image.shape == text.shape == (2000, 128) and image.dtype == np.float32
    assert np.allclose(np.linalg.norm(image, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    assert poisoned.sum() == 40
    assert np.array_equal(image, again[0]) and np.array_equal(poisoned, again[2])  # seeded
    spread = np.linalg.norm(image[poisoned] - image[poisoned].mean(0), axis=1).max()
    clean = np.linalg.norm(image[~poisoned][:40] - image[~poisoned][:40].mean(0), axis=1).max()
    assert spread < 0.1 < clean


@pytest.mark.parametrize("setting,reference_size", [("detect", None), ("callback", None), ("callback", 300)])
def test_global_scale_worker_measures_every_part(setting: str, reference_size: int | None) -> None:
    row = detect_global_scale.worker(setting, 800, "torch-fp32", 30, 8, reference_size, threads=1)
    assert row["auroc"] > 0.95
    assert row["wall"] > 0 and row["cpu"] > 0
    assert row["reference_points"] == (800 if setting == "detect" else 2 * min(800, reference_size or 800))
    assert {"knn-query", "knn-reference", "formula"} <= set(row["parts"])
    assert row["parts"]["knn-query"]["wall"] > 0
    if setting == "callback":
        assert row["parts"]["histogram"]["wall"] > 0
    assert row["peak_rss_gib"] is None or row["peak_rss_gib"] >= 0


def test_global_scale_extrapolation() -> None:
    done = [{"setting": "detect", "variant": "faiss", "n": 1000, "cpu": 2.0},
            {"setting": "callback", "variant": "faiss", "n": 1000, "cpu": 2.0, "whole": True}]
    assert detect_global_scale.predicted_cpu(done, "detect", "faiss", 4000) == pytest.approx(8.0)
    assert detect_global_scale.predicted_cpu(done, "callback", "faiss", 4000) == pytest.approx(32.0)
    assert detect_global_scale.predicted_cpu(done, "detect", "torch", 4000) is None
    peaks = [{"setting": "detect", "variant": "faiss", "n": 1000, "peak_rss_gib": 1.0},
             {"setting": "detect", "variant": "faiss", "n": 2000, "peak_rss_gib": 1.5}]
    assert detect_global_scale.predicted_peak_gib(peaks, "detect", "faiss", 4000) == pytest.approx(2.5)
    assert detect_global_scale.predicted_peak_gib(peaks[:1], "detect", "faiss", 4000) == pytest.approx(4.0)
    assert detect_global_scale.predicted_peak_gib(peaks, "callback", "faiss", 4000) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_callback_costs_split_into_parts(backend: str) -> None:
    detect_overhead.set_threads(1)
    cost = detect_overhead.callback_step_cost(64, "auto", backend, repeats=3)
    assert cost.calls == 3 and cost.wall > 0
    # a batch reference runs one self-join: the queries' neighbours are its rows (no second search)
    assert {"knn-reference", "formula"} <= set(cost.parts.parts) and "knn-query" not in cost.parts.parts
    lines = cost.parts.table(cost.total, cost.calls)
    assert lines[-1].strip().startswith("rest")
    end = detect_overhead.callback_epoch_end_cost(256, 64, "auto", backend)
    assert end.cold.wall > 0 and end.warm.wall > 0
    assert end.parts["write_histogram"].wall > 0


def test_callback_costs_with_the_auto_reference_fall_at_the_epoch_end() -> None:
    """--detect-reference auto only keeps rows per step; the whole epoch is scored (and aggregated) at its end."""
    detect_overhead.set_threads(1)
    cost = detect_overhead.callback_step_cost(64, "auto", "torch", repeats=3, reference="auto")
    assert cost.calls == 3 and not {"knn-reference", "knn-query", "formula"} & set(cost.parts.parts)
    end = detect_overhead.callback_epoch_end_cost(512, 64, "auto", "torch", reference="auto")
    assert end.parts["update_aggregate"].wall > 0  # called only when the epoch's samples were scored


def test_part_timer_restores_what_it_wraps() -> None:
    from safe_train.detection import scores
    from safe_train.detection.detectors import AutoDetector

    knn, score = scores.knn, AutoDetector.__dict__["score"]
    with detect_overhead.PartTimer().patched(["auto", "kdist"]):
        assert scores.knn is not knn
    assert scores.knn is knn and AutoDetector.__dict__["score"] is score
    assert "score" not in detect_overhead.PartTimer.__dict__


def test_throughput_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "throughput.json"
    assert detect_throughput.main(["--demo", "48", "--backends", ",".join(["torch-fp32", *BACKENDS]),
                                   "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "embed:" in printed and "torch-fp32" in printed
    import json

    result = json.loads(out.read_text())
    assert result["samples"] == 48
    assert [row["variant"] for row in result["variants"]] == ["torch-fp32", *BACKENDS]
    for row in result["variants"]:  # reported for every backend (exactness itself: tests/test_knn_backend.py;
        # the fp32 expansion |q|^2 + |r|^2 - 2 q.r moves a random model's tiny distances, so scores by ~1e-3)
        assert 0 <= row["max_abs_diff_vs_first"] < 0.05


def test_throughput_refuses_unknown_variants() -> None:
    with pytest.raises(SystemExit):
        detect_throughput.check_variants(["faiss-fp32"])
    with pytest.raises(SystemExit):
        detect_throughput.check_variants(["annoy"])


def test_auto_summary_is_mean_and_standard_error_over_seeds(tmp_path: Path) -> None:
    """The per-(attack, rate) table: AUROC mean ± sample-SD/sqrt(n) over seeds, the seeds at >= 0.98, none's ASR."""
    def result(run: str, auto: float, slof: float, emulated: int | None = None) -> dict:
        metrics = {name: {"auroc": value, "pr_auc": 0.5, "fpr95": 0.1}
                   for name, value in (("auto", auto), ("paper-slof", slof), ("paper-dao", 0.5), ("global-kdist", 0.6))}
        return {"run": run, "emulated_poisons": emulated, "metrics": metrics}

    results = [result("medium-test-badnets-rate0.01-none-seed0", 0.976, 0.86),
               result("medium-test-badnets-rate0.01-none-seed1", 1.0, 0.96),
               result("medium-test-badnets-rate0.01-none-seed2", 0.999, 0.92),
               result("medium-test-badnets-rate0.01-none-seed0", 0.5, 0.5, emulated=10),  # left out
               result("medium-test-wanet-strength3.0-rate0.0025-none-seed0", 0.64, 0.48)]
    cells = tmp_path / "cells"
    cells.mkdir()
    for seed, asr in enumerate((0.999, 1.0, 1.0)):
        (cells / f"medium-test-badnets-rate0.01-none-seed{seed}.json").write_text(f'{{"asr": {asr}}}')
    table = detect_auto.summarize(results, cells).splitlines()
    values = np.array([0.976, 1.0, 0.999])
    se = values.std(ddof=1) / np.sqrt(3)
    badnets = next(line for line in table if line.startswith("| badnets "))
    assert badnets.startswith(f"| badnets | 1% | 3 | 100.0% | {values.mean():.3f} ± {se:.3f} | 0.913 ± ")
    assert badnets.endswith("| 2 of 3 |")
    wanet = next(line for line in table if line.startswith("| wanet-strength3.0 "))
    assert wanet == "| wanet-strength3.0 | 0.25% | 1 | — | 0.640 ± — | 0.480 ± — | 0.500 ± — | 0.600 ± — | 0 of 1 |"


def test_aggregate_replay_matches_the_callback_and_chooses_by_the_documented_rule(tmp_path: Path, capsys) -> None:
    """The offline replay of score_agg equals the callback's own table arithmetic; the rule picks the best final
    AUROC, ties to the smallest recency."""
    from safe_train.detection.callback import update_aggregate
    from safe_train.state import SampleTable

    train = tmp_path / "data" / "train.csv"
    train.parent.mkdir()
    train.write_text("")
    (train.parent / "manifest.json").write_text('{"poisoned_ids": [7, 8]}')
    run = tmp_path / "run"
    (run / "detection").mkdir(parents=True)
    (run / "params.txt").write_text(f"model: tiny\ntrain_data: {train}\n")
    rng = np.random.default_rng(0)
    ids = np.arange(10)
    # epoch 0: poisons look clean; epochs 1-2: they stand out (the backdoor is learned); id 9 unscored in epoch 2
    scores = [rng.random(10), np.r_[rng.random(7), 5.0, 6.0, 0.5], np.r_[rng.random(7), 4.0, 7.0, np.nan]]
    scores[0][[7, 8]] = -1.0
    for epoch, score in enumerate(scores):
        keep = np.isfinite(score)
        np.savez(run / "detection" / f"epoch_{epoch}_scores.npz", sample_id=ids[keep], score=score[keep])
    for recency in (0.0, 0.5, 1.0):
        table = SampleTable()
        table.register(ids)
        table.add_column("score_agg", np.float32, np.nan)
        table.add_column("score_agg_count", np.int32, 0)
        for score in scores:
            update_aggregate(table, ids, score, recency)
        seen, agg = detect_aggregate.replay(detect_aggregate.epoch_scores(run), recency)[-1]
        np.testing.assert_array_equal(seen, ids)
        np.testing.assert_allclose(agg, table["score_agg"], rtol=1e-6)
    result = detect_aggregate.evaluate(run, [0.0, 0.5, 1.0])
    assert result["epoch_auroc"][0] == 0.0 and result["epoch_auroc"][2] == 1.0
    assert result["aggregate"]["1"][-1] == 1.0 and result["aggregate"]["0"][0] == 0.0
    chosen, means = detect_aggregate.choose([result], [0.0, 0.5, 1.0])
    best = max(means.values())
    assert means[f"{chosen:g}"] >= best - detect_aggregate.TIE
    assert all(means[f"{r:g}"] < best - detect_aggregate.TIE for r in (0.0, 0.5, 1.0) if r < chosen)
    assert detect_aggregate.main([str(run), "--recency", "0,1", "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert "| score_agg, R = 1 |" in out and "chosen --detect-aggregate-recency:" in out
    assert json.loads((tmp_path / "out.json").read_text())["chosen"] in (0.0, 1.0)
