"""The rate-robust ``auto`` detector and the in-loop per-sample aggregate (issue 16, parts 2 and 3)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from safe_train.detection.callback import (
    DetectionCallback,
    DetectionConfig,
    fold_rank,
    percentile_ranks,
    update_aggregate,
)
from safe_train.detection.detectors import (
    AUTO_K_MAX,
    AUTO_K_MIN,
    auto_ladder,
    auto_tau,
    auto_top_k,
)
from safe_train.detection.scores import batch_scores, global_scores
from safe_train.errors import ConfigError
from safe_train.interface import StepOutput, TrainContext, TrainPass
from safe_train.metrics import detection_metrics
from safe_train.state import SampleTable


def _kth_distances(points: np.ndarray, reference: np.ndarray, excluded: list[set[int]], ks: list[int]) -> np.ndarray:
    """``r_k`` of every point for every k, one point at a time, straight from the definition."""
    d = np.sqrt(((points[:, None, :].astype(np.float64) - reference[None, :, :]) ** 2).sum(-1))
    out = np.zeros((len(points), len(ks)))
    for i, row in enumerate(d):
        admissible = np.sort([row[j] for j in range(len(reference)) if j not in excluded[i]])
        out[i] = [admissible[k - 1] for k in ks]
    return out


def _robust_z(values: np.ndarray, sample: np.ndarray) -> np.ndarray:
    med = np.median(sample, axis=0)
    return (values - med) / (1.4826 * np.median(np.abs(sample - med), axis=0))


def brute_auto(image: np.ndarray, text: np.ndarray, ks: list[int], with_text: bool) -> np.ndarray:
    """``max(S, D - tau) + max(C - tau, 0)`` from the docstring, with a brute-force kNN."""
    n = len(image)
    reference = np.concatenate([image, text]) if with_text else image
    m = len(reference)
    q_excl = [{i, i + n} if with_text else {i} for i in range(n)]
    r_excl = [{o, (o + n) % (2 * n)} if with_text else {o} for o in range(m)]
    zq = _robust_z(np.log(_kth_distances(image, reference, q_excl, ks)),
                   np.log(_kth_distances(reference, reference, r_excl, ks)))
    tau = np.sqrt(2 * np.log(m))
    cos = (image * text).sum(1) / np.linalg.norm(image, axis=1) / np.linalg.norm(text, axis=1)
    caption = _robust_z(1 - cos, 1 - cos)
    return np.maximum(zq.max(1), (-zq).max(1) - tau) + np.maximum(caption - tau, 0)


@pytest.mark.parametrize("with_text", [True, False])
def test_auto_equals_brute_force(with_text):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 6))
    text = image + rng.normal(scale=0.5, size=(40, 6))
    image[:6] = image[0] + rng.normal(scale=0.05, size=(6, 6))  # a tight group: the dense side is exercised
    got = batch_scores(image, text, ["auto"], k=12, with_text=with_text)["auto"]
    np.testing.assert_allclose(got, brute_auto(image, text, [4, 8, 12], with_text), rtol=1e-4, atol=1e-4)
    # global_scores over the whole set is the same reference
    again = global_scores(image, text, ["auto"], k=12, with_text=with_text)["auto"]
    np.testing.assert_allclose(again, got, rtol=1e-6, atol=1e-6)


def test_auto_rule_is_a_documented_function_of_the_reference_size():
    assert AUTO_K_MIN == 4 and AUTO_K_MAX == 256
    # deepest scale: largest power of two <= m / 64, within [4, 256], never more than the points
    assert [auto_top_k(m) for m in (3, 100, 511, 2046, 4096, 20000, 10**6)] == [3, 4, 4, 16, 64, 256, 256]
    assert auto_ladder(256) == [4, 8, 16, 32, 64, 128, 256]
    assert auto_ladder(12) == [4, 8, 12] and auto_ladder(3) == [3]
    assert auto_tau(20000) == pytest.approx(np.sqrt(2 * np.log(20000)))
    # without --k the ladder follows the reference: 40 pairs = 80 points, 78 admissible -> k = 4
    rng = np.random.default_rng(1)
    image, text = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
    default = batch_scores(image, text, ["auto"])["auto"]
    np.testing.assert_allclose(default, batch_scores(image, text, ["auto"], k=4)["auto"])
    np.testing.assert_array_equal(default, batch_scores(image, text, ["auto"])["auto"])  # deterministic


def _planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """2,000 clean pairs, a tight cluster of 60 near-duplicates (more than k = 16) and 5 isolated points."""
    rng = np.random.default_rng(seed)
    d = 16
    clean = rng.normal(size=(2000, d))
    centre = clean[0] + rng.normal(scale=0.5, size=d)
    cluster = centre + rng.normal(scale=0.02, size=(60, d))
    sparse = rng.normal(size=(5, d)) * 4.0
    image = np.concatenate([clean, cluster, sparse]).astype(np.float32)
    text = (image + rng.normal(scale=0.3, size=image.shape)).astype(np.float32)
    is_cluster = np.r_[np.zeros(2000, bool), np.ones(60, bool), np.zeros(5, bool)]
    is_sparse = np.r_[np.zeros(2060, bool), np.ones(5, bool)]
    return image, text, is_cluster, is_sparse


def test_auto_finds_a_dense_cluster_and_sparse_outliers_where_kdist_and_slof_fail_one():
    image, text, is_cluster, is_sparse = _planted()
    scores = global_scores(image, text, ["auto", "kdist", "slof"], with_text=False)
    poisoned = is_cluster | is_sparse

    def auroc(name: str, mask: np.ndarray) -> float:
        keep = mask | ~poisoned
        return detection_metrics(scores[name][keep], mask[keep])["auroc"]

    assert auroc("auto", is_cluster) > 0.999 and auroc("auto", is_sparse) > 0.999
    assert auroc("auto", poisoned) > 0.999
    for name in ("kdist", "slof"):  # each fails the cluster: its members are each other's neighbours
        assert min(auroc(name, is_cluster), auroc(name, is_sparse)) < 0.6, name
    assert auroc("kdist", is_sparse) > 0.99  # ... while the isolated points are easy for it


# ---- the per-sample aggregate -----------------------------------------------------------------------

def test_percentile_ranks_by_hand():
    np.testing.assert_allclose(percentile_ranks(np.array([3.0, 1.0, 2.0, 2.0])), [1.0, 0.25, 0.625, 0.625])
    assert len(percentile_ranks(np.zeros(0))) == 0


def test_aggregate_is_the_mean_percentile_rank_over_detection_epochs():
    table = SampleTable()
    table.register(np.arange(5))
    table.add_column("score_agg", np.float32, np.nan)
    table.add_column("score_agg_count", np.int32, 0)
    update_aggregate(table, np.array([0, 1, 2, 3]), np.array([0.4, 0.1, 0.3, 0.2]))  # ranks 1, .25, .75, .5
    update_aggregate(table, np.array([1, 2, 3, 4]), np.array([9.0, np.nan, 1.0, 5.0]))  # 2 unscored: 1, 1/3, 2/3
    np.testing.assert_allclose(table["score_agg"], [1.0, (0.25 + 1.0) / 2, 0.75, (0.5 + 1 / 3) / 2, 2 / 3], rtol=1e-6)
    np.testing.assert_array_equal(table["score_agg_count"], [1, 2, 1, 2, 1])


def test_fold_rank_spans_the_mean_and_the_latest_epoch():
    """Recency 0 is the running mean, 1 the latest epoch alone, 0.5 an exponential moving average; the first
    epoch always enters whole."""
    ranks = [np.array([0.2, 1.0]), np.array([0.4, 0.5]), np.array([1.0, 0.25])]

    def folded(recency: float) -> np.ndarray:
        agg, count = np.full(2, np.nan), np.zeros(2, dtype=np.int64)
        for rank in ranks:
            agg, count = fold_rank(agg, count, rank, recency), count + 1
        return agg

    np.testing.assert_allclose(folded(0.0), np.mean(ranks, axis=0))
    np.testing.assert_allclose(folded(1.0), ranks[-1])
    # weights max(0.5, 1/count): 1, then 0.5, 0.5 -> ((r0 + r1) / 2 + r2) / 2
    np.testing.assert_allclose(folded(0.5), ((ranks[0] + ranks[1]) / 2 + ranks[2]) / 2)
    # a small recency is the mean until 1/count falls below it: 1, 1/2, then 0.4
    np.testing.assert_allclose(folded(0.4), 0.6 * (ranks[0] + ranks[1]) / 2 + 0.4 * ranks[2])


def test_aggregate_recency_reaches_the_table_and_is_checked():
    table = SampleTable()
    table.register(np.arange(3))
    table.add_column("score_agg", np.float32, np.nan)
    table.add_column("score_agg_count", np.int32, 0)
    for score in ([3.0, 2.0, 1.0], [1.0, 2.0, 3.0]):
        update_aggregate(table, np.arange(3), np.array(score), recency=1.0)
    np.testing.assert_allclose(table["score_agg"], [1 / 3, 2 / 3, 1.0], rtol=1e-6)  # the latest epoch alone
    cb = DetectionCallback.from_args(_args(detect_aggregate_recency=0.75))
    assert cb.aggregate_recency == 0.75
    with pytest.raises(ConfigError, match="--detect-aggregate-recency must be in"):
        DetectionConfig.from_args(_args(detect_aggregate_recency=1.5)).validate()


def _args(**changes) -> argparse.Namespace:
    base = dict(detect="auto,kdist", detect_reference="batch", detect_k=None, detect_metric="l2",
                detect_backend="torch", detect_action="drop", detect_drop_fraction=0.25, detect_drop_epoch=1,
                detect_every=1, detect_reference_size=None, detect_manifest=None, detect_blocklist_budget=None,
                seed=0)
    base.update(changes)
    return argparse.Namespace(**base)


DISAGREEING_EPOCHS = {0: np.array([8, 7, 6, 5, 4, 3, 2, 1.0]), 1: np.array([1, 2, 3, 4, 5, 6, 8, 7.0])}


def _two_detection_epochs(tmp_path, **changes) -> tuple[DetectionCallback, TrainContext]:
    """A kdist drop callback after two detection epochs whose scores disagree (``DISAGREEING_EPOCHS``)."""
    cb = DetectionCallback.from_args(_args(detect="kdist", **changes))
    ctx = TrainContext(args=_args(log_base_path=str(tmp_path)), table=SampleTable(), rank=0, world_size=1)
    cb.setup(ctx)
    ids = np.arange(8)
    ctx.table.register(ids)
    for epoch, scores in DISAGREEING_EPOCHS.items():
        ctx.epoch = epoch
        ctx.table.set("score_kdist", ids, scores)
        ctx.table.set("score_epoch", ids, epoch)
        cb.on_epoch_end(ctx)
    return cb, ctx


def test_drop_takes_the_highest_aggregate_not_the_last_epoch(tmp_path):
    """Epoch 0 and 1 disagree; with recency 0, drop after epoch 1 follows the mean of both epochs' ranks."""
    _, ctx = _two_detection_epochs(tmp_path, detect_blocklist_budget=2, detect_aggregate_recency=0.0)
    expected = (percentile_ranks(DISAGREEING_EPOCHS[0]) + percentile_ranks(DISAGREEING_EPOCHS[1])) / 2
    np.testing.assert_allclose(ctx.table["score_agg"], expected, rtol=1e-6)
    # mean ranks: id 6 (2/8 + 1)/2 = 0.625, ids 0-5 0.5625 (ties: lowest id first), id 7 0.5; epoch 1 alone: 6, 7
    np.testing.assert_array_equal(ctx.table.ids[ctx.table["dropped"]], [0, 6])
    np.testing.assert_allclose(ctx.table["drop_score"][[0, 6]], [0.5625, 0.625])
    lines = (tmp_path / "detection" / "blocklist.csv").read_text().splitlines()
    assert lines[0] == "sample_id,score,detector" and len(lines) == 3


def test_by_default_drop_follows_the_latest_detection_epoch(tmp_path):
    """The default recency (1, chosen on validation runs) ranks by the latest detection epoch alone."""
    cb, ctx = _two_detection_epochs(tmp_path)
    assert cb.aggregate_recency == 1.0
    np.testing.assert_allclose(ctx.table["score_agg"], percentile_ranks(DISAGREEING_EPOCHS[1]), rtol=1e-6)
    np.testing.assert_array_equal(ctx.table.ids[ctx.table["dropped"]], [6, 7])
    np.testing.assert_array_equal(ctx.table["score_agg_count"], 2)


def test_in_loop_auto_scores_a_batch():
    cb = DetectionCallback.from_args(_args(detect_action="log", detect_drop_fraction=None))
    ctx = TrainContext(args=_args(), table=SampleTable(), rank=0, world_size=1)
    cb.setup(ctx)
    cb.on_epoch_start(ctx)
    gen = torch.Generator().manual_seed(0)
    image, text = torch.randn(32, 8, generator=gen), torch.randn(32, 8, generator=gen)
    ids = torch.arange(32)
    ctx.table.register(ids.numpy())
    cb.on_step_end(ctx, StepOutput(TrainPass(), ids, {"image_features": image, "text_features": text}, {}, 0))
    ctx.table.sync()
    cb.on_epoch_end(ctx)
    expected = batch_scores(image.numpy(), text.numpy(), ["auto"])["auto"]
    np.testing.assert_allclose(ctx.table["score_auto"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ctx.table["score_agg"], percentile_ranks(expected.astype(np.float32)), rtol=1e-6)
    np.testing.assert_array_equal(ctx.table["score_agg_count"], 1)
