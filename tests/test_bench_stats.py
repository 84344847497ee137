"""The scaled benchmark's statistics and reports: hand-computed mean ± SE, cells, lowest learned rate, writers."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from safe_train import bench_stats as bs


def run(attack="badnets", rate=0.01, defense="none", seed=0, top1=0.9, asr=0.9, r1=0.5, targeted=None,
        wall=100.0, scale="medium", **extra):
    return {"scale": scale, "attack": attack, "poison_rate": rate, "defense": defense, "seed": seed,
            "clean_top1": top1, "asr": asr, "retrieval_r1": r1, "targeted_success": targeted,
            "wall_seconds": wall, **extra}


def test_mean_se_hand_computed():
    mean, se = bs.mean_se([0.9, 0.8, 1.0])
    # deviations -0.0, -0.1, +0.1 -> sample variance 0.02 / 2 = 0.01 -> sd 0.1 -> se 0.1 / sqrt(3)
    assert mean == pytest.approx(0.9) and se == pytest.approx(0.1 / math.sqrt(3)) and se == pytest.approx(0.0577, abs=1e-4)
    assert bs.mean_se([0.5, 0.7]) == (pytest.approx(0.6), pytest.approx(0.1))  # sd 0.1414 / sqrt 2
    assert bs.mean_se([0.3, 0.3, 0.3, 0.3]) == (pytest.approx(0.3), 0.0)
    xs = np.random.default_rng(0).random(7)
    assert bs.mean_se(xs) == (pytest.approx(xs.mean()), pytest.approx(xs.std(ddof=1) / math.sqrt(7)))


def test_mean_se_one_value_none_and_nan():
    mean, se = bs.mean_se([0.42])
    assert mean == 0.42 and math.isnan(se)  # one seed: the SE is undefined, not 0
    assert all(math.isnan(x) for x in bs.mean_se([]))
    assert all(math.isnan(x) for x in bs.mean_se([None, float("nan")]))
    # NaN and None are left out: the same as the two real values alone
    assert bs.mean_se([0.5, float("nan"), 0.7, None]) == bs.mean_se([0.5, 0.7])
    with pytest.raises(ValueError, match="infinite"):
        bs.mean_se([0.5, float("inf")])


def test_aggregate_groups_cells_and_keeps_seeds():
    rows = [
        run(seed=2, top1=1.0, asr=0.7), run(seed=0, top1=0.9, asr=0.9), run(seed=1, top1=0.8, asr=0.8),
        run(defense="safeclip", seed=0, top1=0.85, asr=0.01, wall=150.0),
        run(rate=0.001, seed=0, asr=float("nan")), run(rate=0.001, seed=1, asr=0.3),
        run(attack="targeted", rate=0.0005, seed=0, asr=None, targeted=0.75),
        run(attack="targeted", rate=0.0005, seed=1, asr=None, targeted=1.0),
    ]
    cells = bs.aggregate(rows)
    assert [(c["attack"], c["poison_rate"], c["defense"]) for c in cells] == [
        ("badnets", 0.01, "none"), ("badnets", 0.01, "safeclip"), ("badnets", 0.001, "none"),
        ("targeted", 0.0005, "none")]
    first = cells[0]
    assert first["n_seeds"] == 3 and first["seeds"] == [0, 1, 2] and first["scale"] == "medium"
    assert first["clean_top1_mean"] == pytest.approx(0.9) and first["clean_top1_se"] == pytest.approx(0.0577, abs=1e-4)
    assert first["asr_mean"] == pytest.approx(0.8) and first["asr_se"] == pytest.approx(0.0577, abs=1e-4)
    assert first["retrieval_r1_mean"] == pytest.approx(0.5) and first["retrieval_r1_se"] == 0.0
    assert math.isnan(first["targeted_success_mean"]) and first["targeted_success_n"] == 0
    assert first["wall_seconds_mean"] == 100.0
    single = cells[1]
    assert single["n_seeds"] == 1 and single["seeds"] == [0] and math.isnan(single["asr_se"])
    nan_asr = cells[2]  # the NaN is left out and counted: 2 seeds, 1 ASR
    assert nan_asr["n_seeds"] == 2 and nan_asr["asr_n"] == 1 and nan_asr["asr_mean"] == pytest.approx(0.3)
    targeted = cells[3]
    assert targeted["targeted_success_mean"] == pytest.approx(0.875) and targeted["targeted_success_se"] == pytest.approx(0.125)
    required = {"n_seeds", "seeds", "clean_top1_mean", "clean_top1_se", "asr_mean", "asr_se", "retrieval_r1_mean",
                "retrieval_r1_se", "targeted_success_mean", "targeted_success_se", "wall_seconds_mean",
                "poison_rate", "scale"}
    assert all(required <= set(c) for c in cells)


def test_aggregate_rejects_bad_rows():
    with pytest.raises(ValueError, match="more than once"):
        bs.aggregate([run(seed=0), run(seed=0)])
    row = run()
    del row["retrieval_r1"]
    with pytest.raises(ValueError, match="no retrieval_r1"):
        bs.aggregate([row])
    with pytest.raises(ValueError, match="disagree on 'params'"):
        bs.aggregate([run(seed=0, params={"patch_size": 3}), run(seed=1, params={"patch_size": 4})])
    cell, = bs.aggregate([run(seed=0, params={"patch_size": 4}, split="test"), run(seed=1, params={"patch_size": 4},
                                                                                    split="test")])
    assert cell["params"] == {"patch_size": 4} and cell["split"] == "test"
    # a rate parsed twice (0.1 * 0.01 vs 0.001) is one cell
    assert len(bs.aggregate([run(rate=0.1 * 0.01, seed=0), run(rate=0.001, seed=1)])) == 1
    # custom keys: pool over rates
    assert [c["n_seeds"] for c in bs.aggregate([run(rate=0.01), run(rate=0.001, seed=1)], keys=("attack",))] == [2]


def test_lowest_learned_rate_hand_case():
    rows = []
    for rate, asrs in ((0.0005, [0.1, 0.3, 0.2]), (0.001, [0.9, 0.6, 0.8]), (0.0025, [0.85, 0.8, 0.9]),
                       (0.01, [1.0, 1.0, 0.97])):
        rows += [run(rate=rate, seed=s, asr=a) for s, a in enumerate(asrs)]
    rows += [run(rate=0.0025, defense="safeclip", seed=0, asr=0.0), run(rate=0.0, seed=0, asr=0.95)]
    rows += [run(attack="wanet", rate=r, seed=0, asr=0.1) for r in (0.001, 0.01)]
    cells = bs.aggregate(rows)
    learned = bs.lowest_learned_rate(cells, "badnets")
    # 0.001 has mean 0.7667 < 0.8; 0.0025 has 0.85; the clean cell (rate 0) is not tried
    assert learned.rate == 0.0025 and learned.tried == (0.0005, 0.001, 0.0025, 0.01)
    assert learned.metric == "asr" and learned.means[1] == pytest.approx(0.7667, abs=1e-4)
    assert "learns it from 0.25%" in learned.describe()
    assert bs.lowest_learned_rate(cells, "badnets", threshold=0.75).rate == 0.001
    wanet = bs.lowest_learned_rate(cells, "wanet")
    assert wanet.rate is None and wanet.tried == (0.001, 0.01) and "does not learn it" in wanet.describe()
    assert bs.lowest_learned_rate(cells, "badnets", defense="safeclip").rate is None
    assert bs.lowest_learned_rate(cells, "sig").tried == ()
    with pytest.raises(ValueError, match="several scales"):
        bs.lowest_learned_rate(cells + bs.aggregate([run(scale="small")]), "badnets")
    assert bs.lowest_learned_rate(cells + bs.aggregate([run(scale="small")]), "badnets", scale="medium").rate == 0.0025
    # the targeted attack has no trigger: it is learned when its targets are hit
    targeted = bs.aggregate([run(attack="targeted", rate=r, seed=s, asr=None, targeted=t)
                             for r, ts in ((0.0005, (0.5, 0.75)), (0.001, (0.875, 1.0))) for s, t in enumerate(ts)])
    learned = bs.lowest_learned_rate(targeted, "targeted")
    assert learned.metric == "targeted_success" and learned.rate == 0.001 and learned.means == (0.625, 0.9375)
    assert "mean targeted success 93.8%" in learned.describe()


@pytest.fixture()
def table_rows():
    rows = [run(seed=s, top1=t, asr=a, r1=r) for s, t, a, r in ((0, 0.9, 0.9, 0.4), (1, 0.8, 0.8, 0.5), (2, 1.0, 1.0, 0.6))]
    rows += [run(defense="safeclip", seed=s, top1=0.88, asr=a, wall=250.0) for s, a in ((0, 0.0), (1, 0.02))]
    rows += [run(rate=0.001, seed=0, asr=0.5)]
    rows += [run(attack="targeted", rate=0.0005, seed=s, asr=None, targeted=t) for s, t in ((0, 0.75), (1, 0.875))]
    return rows


def test_writers_json_csv_markdown(tmp_path, table_rows):
    cells = bs.aggregate(table_rows) + bs.aggregate([run(scale="small")])  # another scale's cell is left out
    learned = [bs.lowest_learned_rate(cells, "badnets", scale="medium")]
    text = bs.write_results(cells, tmp_path, "medium", split="test", learned=learned,
                            command="safe-train bench --scale medium --seeds 0,1,2")
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["scale"] == "medium" and doc["split"] == "test" and len(doc["rows"]) == 4
    for key in ("n_seeds", "clean_top1_mean", "clean_top1_se", "asr_mean", "asr_se", "retrieval_r1_mean",
                "poison_rate", "scale", "targeted_success_mean", "wall_seconds_mean", "seeds", "split"):
        assert all(key in r for r in doc["rows"]), key
    # rows ordered attack (first seen), rate ascending, defense (first seen); NaN becomes null
    assert [(r["attack"], r["poison_rate"], r["defense"]) for r in doc["rows"]] == [
        ("badnets", 0.001, "none"), ("badnets", 0.01, "none"), ("badnets", 0.01, "safeclip"),
        ("targeted", 0.0005, "none")]
    assert doc["rows"][0]["asr_se"] is None and doc["rows"][1]["asr_se"] == pytest.approx(0.0577, abs=1e-4)
    assert doc["lowest_learned_rates"][0]["rate"] == 0.01

    with open(tmp_path / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and table[1]["n_seeds"] == "3" and table[1]["seeds"] == "0;1;2"
    assert float(table[1]["clean_top1_mean"]) == pytest.approx(0.9) and table[0]["asr_se"] == ""
    assert table[0]["split"] == "test" and table[0]["scale"] == "medium"

    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# Benchmark results: scale `medium`, test split") and text in md
    assert "**test** split" in text and "chosen on the validation split" in text
    assert "| attack | poison rate | defense | seeds | clean top-1 | R@1 | ASR | ASR (scenes) | targeted success " in text
    assert "| badnets | 1% | none | 3 | 90.0 ± 5.8 | 50.0 ± 5.8 | 90.0 ± 5.8 | — | — | 100 s |" in text
    assert "| badnets | 1% | safeclip | 2 | 88.0 ± 0.0 | 50.0 ± 0.0 | 1.0 ± 1.0 | — | — | 250 s |" in text
    assert "| badnets | 0.1% | none | 1 | 90.0 ± — | 50.0 ± — | 50.0 ± — | — | — | 100 s |" in text
    assert "| targeted | 0.05% | none | 2 | 90.0 ± 0.0 | 50.0 ± 0.0 | — | — | 81.2 ± 6.2 | 100 s |" in text
    assert "badnets: none learns it from 1%" in text and "safe-train bench --scale medium" in md


def test_writers_validation_split_and_errors(tmp_path, table_rows):
    cells = bs.aggregate(table_rows)
    text = bs.write_results(cells, tmp_path, "medium", split="validation")
    assert "**validation** split" in text and json.loads((tmp_path / "results.json").read_text())["split"] == "validation"
    with pytest.raises(ValueError, match="split must be one of"):
        bs.write_results(cells, tmp_path, "medium", split="train")
    with pytest.raises(ValueError, match="no cells of scale 'large'"):
        bs.write_results(cells, tmp_path, "large")
    with pytest.raises(ValueError, match="comes from the validation split"):
        bs.write_results(bs.aggregate([run(split="validation")]), tmp_path, "medium", split="test")


def _assert_real_png(path, min_bytes=8000):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > min_bytes
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("L"))
    assert img.width > 300 and img.height > 200 and len(np.unique(pixels)) > 20  # drawn, not blank


def test_plots_are_drawn(tmp_path, table_rows):
    rows = table_rows + [run(attack="blended", rate=r, defense=d, seed=s, asr=a)
                         for r in (0.001, 0.01) for d in ("none", "safeclip") for s, a in ((0, 0.4), (1, 0.6))]
    cells = bs.aggregate(rows)
    bs.plot_asr_vs_rate(cells, tmp_path / "asr_vs_rate.png")
    _assert_real_png(tmp_path / "asr_vs_rate.png")
    bs.plot_accuracy_vs_asr(rows, tmp_path / "accuracy_vs_asr.png")
    _assert_real_png(tmp_path / "accuracy_vs_asr.png")
    with pytest.raises(ValueError, match="no cell"):
        bs.plot_asr_vs_rate(bs.aggregate([run(asr=None)]), tmp_path / "empty.png")


def test_optional_scene_asr_is_aggregated_when_runs_carry_it():
    """asr_scenes (the scene corpus's second ASR) is a mean ± SE like the others; absent means not measured."""
    cells = bs.aggregate([run(seed=0, asr_scenes=0.5), run(seed=1, asr_scenes=0.7), run(seed=2)])
    assert cells[0]["asr_scenes_mean"] == pytest.approx(0.6) and cells[0]["asr_scenes_se"] == pytest.approx(0.1)
    assert cells[0]["asr_scenes_n"] == 2 and cells[0]["n_seeds"] == 3
    assert "| 60.0 ± 10.0 (n=2) |" in bs.format_markdown(cells, "medium", "test")
    assert math.isnan(bs.aggregate([run()])[0]["asr_scenes_mean"])
