"""Detection scores and kNN backends against brute-force computations on small random data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safe_train.detection.detectors import Detector, ScoreInputs
from safe_train.detection.knn import faiss_available, knn
from safe_train.detection.scores import (
    batch_scores,
    global_scores,
    local_scores,
    parse_detectors,
    partitioned_scores,
)
from safe_train.errors import ConfigError
from safe_train.registry import DETECTORS, list_detectors

faiss_missing = not faiss_available()


def _dist(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    if metric == "cosine":
        an = a / np.linalg.norm(a, axis=1, keepdims=True)
        bn = b / np.linalg.norm(b, axis=1, keepdims=True)
        return 1.0 - an @ bn.T
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def _sorted_admissible(row: np.ndarray, excluded: set[int]) -> tuple[np.ndarray, np.ndarray]:
    keep = np.array([j for j in range(len(row)) if j not in excluded])
    order = keep[np.argsort(row[keep], kind="stable")]
    return row[order], order


def brute_scores(query, reference, q_excl, r_excl, k, metric):
    """Straight from the formulas in safe_train/detection/scores.py, one point at a time."""
    dq = _dist(query, reference, metric)
    dr = _dist(reference, reference, metric)
    m = len(reference)
    r_kd, r_lid = np.zeros(m), np.zeros(m)
    for o in range(m):
        a, _ = _sorted_admissible(dr[o], {o} | set(r_excl[o]))
        r_kd[o] = a[k - 1]
        r_lid[o] = -1.0 / np.mean(np.log(a[:k] / a[k - 1]))
    out = {"kdist": [], "lid": [], "slof": [], "dao": []}
    for i in range(len(query)):
        a, nb = _sorted_admissible(dq[i], set(q_excl[i]))
        kd = a[k - 1]
        out["kdist"].append(kd)
        out["lid"].append(-1.0 / np.mean(np.log(a[:k] / kd)))
        out["slof"].append(np.mean([kd / r_kd[o] for o in nb[:k]]))
        out["dao"].append(np.mean([r_lid[o] * np.log(kd / r_kd[o]) for o in nb[:k]]))
    return {name: np.array(v) for name, v in out.items()}


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_batch_scores_equal_brute_force(metric):
    rng = np.random.default_rng(0)
    b, d, k = 24, 6, 5
    img = rng.normal(size=(b, d)).astype(np.float32)
    txt = (img + rng.normal(scale=0.5, size=(b, d))).astype(np.float32)
    got = batch_scores(img, txt, ["kdist", "lid", "slof", "dao", "clip"], k=k, metric=metric)
    reference = np.concatenate([img, txt])
    partner = lambda j: j + b if j < b else j - b  # noqa: E731
    expected = brute_scores(img, reference, [[i, i + b] for i in range(b)],
                            [[partner(j)] for j in range(2 * b)], k, metric)
    for name in ("kdist", "lid", "slof", "dao"):
        np.testing.assert_allclose(got[name], expected[name], rtol=2e-4, atol=1e-5, err_msg=name)
    cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    np.testing.assert_allclose(got["clip"], 1 - cos, rtol=1e-5, atol=1e-6)


def test_global_scores_whole_dataset_and_sample_equal_brute_force():
    rng = np.random.default_rng(1)
    n, d, k = 30, 5, 4
    img = rng.normal(size=(n, d)).astype(np.float32)
    txt = rng.normal(size=(n, d)).astype(np.float32)
    # whole dataset, images only: query i excludes only itself
    got = global_scores(img, txt, ["kdist", "slof", "lid", "dao"], k=k, with_text=False)
    expected = brute_scores(img, img, [[i] for i in range(n)], [[] for _ in range(n)], k, "l2")
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=2e-4, atol=1e-5, err_msg=name)
    # a reference sample of 12 pairs (images + captions), drawn as global_scores draws it
    size = 12
    got = global_scores(img, txt, ["kdist", "slof", "lid", "dao"], k=k, reference_size=size, seed=3)
    chosen = np.sort(np.random.default_rng([3, 0]).choice(n, size, replace=False))
    pos = {int(c): p for p, c in enumerate(chosen)}
    reference = np.concatenate([img[chosen], txt[chosen]])
    q_excl = [[pos[i], pos[i] + size] if i in pos else [] for i in range(n)]
    r_excl = [[j + size] if j < size else [j - size] for j in range(2 * size)]
    expected = brute_scores(img, reference, q_excl, r_excl, k, "l2")
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=2e-4, atol=1e-5, err_msg=name)


def test_default_k_per_detector_and_clamping():
    rng = np.random.default_rng(2)
    img, txt = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    # 20 reference points, 2 excluded: lid's default k=64 is clamped to 18, kdist's 16 stays
    got = batch_scores(img, txt, ["kdist", "lid"])
    dq = _dist(img, np.concatenate([img, txt]), "l2")
    for i in range(10):
        a, _ = _sorted_admissible(dq[i], {i, i + 10})
        assert got["kdist"][i] == pytest.approx(a[15], rel=1e-4)
        assert got["lid"][i] == pytest.approx(-1.0 / np.mean(np.log(a[:18] / a[17])), rel=1e-3)


def test_isolation_forest_is_negated_sklearn_and_finds_an_outlier():
    from sklearn.ensemble import IsolationForest

    rng = np.random.default_rng(3)
    img = rng.normal(size=(64, 4)).astype(np.float32)
    img[7] += 12.0
    txt = rng.normal(size=(64, 4)).astype(np.float32)
    got = batch_scores(img, txt, ["iforest"], seed=5)["iforest"]
    forest = IsolationForest(n_estimators=100, random_state=5).fit(np.concatenate([img, txt]))
    np.testing.assert_allclose(got, -forest.score_samples(img), rtol=1e-6)
    assert int(np.argmax(got)) == 7


def test_scores_point_at_a_sparse_outlier():
    """A planted isolated point has the highest kdist/slof/dao among clustered points."""
    rng = np.random.default_rng(4)
    img = rng.normal(scale=0.1, size=(40, 8)).astype(np.float32)
    img[3] += 3.0
    txt = img + rng.normal(scale=0.05, size=img.shape).astype(np.float32)
    txt[3] = rng.normal(scale=0.1, size=8)
    got = batch_scores(img, txt, ["kdist", "slof", "dao"], k=8)
    for name, values in got.items():
        assert int(np.argmax(values)) == 3, name


def test_partitioned_scores_match_batch_scores_per_chunk():
    rng = np.random.default_rng(5)
    img, txt = rng.normal(size=(50, 6)), rng.normal(size=(50, 6))
    got = partitioned_scores(img, txt, ["kdist"], batch_size=16, k=3, seed=9)["kdist"]
    chunks = np.array_split(np.random.default_rng([9, 0]).permutation(50), 4)
    for chunk in chunks:
        np.testing.assert_allclose(got[chunk], batch_scores(img[chunk], txt[chunk], ["kdist"], k=3)["kdist"],
                                   rtol=1e-6)


def test_unknown_detector_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown detector"):
        parse_detectors("kdist,nope")
    with pytest.raises(ConfigError, match="choose from auto, clip, dao, iforest, kdist, lid, slof"):
        parse_detectors(["nope"])
    assert parse_detectors("kdist, SLOF,kdist") == ["kdist", "slof"]
    assert list_detectors() == ["auto", "clip", "dao", "iforest", "kdist", "lid", "slof"]


def test_a_registered_third_party_detector_is_scored_by_name():
    """A detector registered from outside the package works in every scoring function, with no edit to them."""
    seen: list[ScoreInputs] = []

    class MeanNeighbourRatio(Detector):
        name = "test_mean_ratio"
        default_k = 3
        needs_reference_knn = True

        def score(self, x: ScoreInputs) -> np.ndarray:
            seen.append(x)
            own = x.query_dist[:, : x.k].mean(axis=1)
            return own / x.reference_dist[:, x.k - 1][x.query_idx[:, 0]]

    rng = np.random.default_rng(10)
    b = 12
    img = rng.normal(size=(b, 4)).astype(np.float32)
    txt = rng.normal(size=(b, 4)).astype(np.float32)
    DETECTORS.register(MeanNeighbourRatio)
    try:
        assert parse_detectors("Test_Mean_Ratio,kdist") == ["test_mean_ratio", "kdist"]
        # lid's larger k (64, clamped to 22) sets the width of the shared neighbour arrays
        got = batch_scores(img, txt, ["lid", "test_mean_ratio"])
        assert list(got) == ["lid", "test_mean_ratio"]
        assert seen[-1].k == 3 and seen[-1].query_dist.shape == (b, 22)
        reference = np.concatenate([img, txt])
        partner = lambda j: j + b if j < b else j - b  # noqa: E731
        dq, dr = _dist(img, reference, "l2"), _dist(reference, reference, "l2")
        for i in range(b):
            a, order = _sorted_admissible(dq[i], {i, i + b})
            o = order[0]
            r_a, _ = _sorted_admissible(dr[o], {o, partner(o)})
            assert got["test_mean_ratio"][i] == pytest.approx(a[:3].mean() / r_a[2], rel=1e-4)
        np.testing.assert_array_equal(got["lid"], batch_scores(img, txt, ["lid"])["lid"])  # others unchanged
        assert batch_scores(img, txt, ["test_mean_ratio"], k=5)["test_mean_ratio"].shape == (b,)
        assert seen[-1].k == 5 and seen[-1].query_dist.shape == (b, 5)
        assert global_scores(img, txt, ["test_mean_ratio"], reference_size=8)["test_mean_ratio"].shape == (b,)
    finally:
        DETECTORS._entries.pop("test_mean_ratio", None)
    assert "test_mean_ratio" not in DETECTORS
    with pytest.raises(ConfigError, match="unknown detector"):
        parse_detectors("test_mean_ratio")


# ------------------------------------------------------------------------------------------ kNN


def _brute_knn(q, r, k, metric, excl):
    d = _dist(q, r, metric)
    dists, idx = [], []
    for i in range(len(q)):
        a, order = _sorted_admissible(d[i], set(excl[i]) if excl is not None else set())
        dists.append(a[:k])
        idx.append(order[:k])
    return np.array(dists), np.array(idx)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_torch_knn_tiles_equal_brute_force(metric):
    rng = np.random.default_rng(6)
    q, r = rng.normal(size=(37, 5)).astype(np.float32), rng.normal(size=(53, 5)).astype(np.float32)
    excl = np.stack([np.arange(37), rng.integers(0, 53, 37)], 1)
    exp_d, exp_i = _brute_knn(q, r, 7, metric, excl.tolist())
    for tile in (1, 7, 64, 1 << 20):  # tiny tiles exercise the running top-k across tiles
        d, i = knn(q, r, 7, metric=metric, exclude=excl, max_tile_elements=tile)
        np.testing.assert_array_equal(i.numpy(), exp_i)
        np.testing.assert_allclose(d.numpy(), exp_d, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("self_join", [True, False])
def test_torch_knn_large_blocks_use_exact_two_stage_selection(self_join):
    """Blocks wide enough for the grouped selection, and the shared-block self-join, against brute force."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(700, 6)).astype(np.float32)
    partner = np.where(np.arange(700) < 350, np.arange(700) + 350, np.arange(700) - 350)[:, None]
    q = x if self_join else rng.normal(size=(500, 6)).astype(np.float32)
    excl = [[i, partner[i, 0]] for i in range(700)] if self_join else None
    exp_d, exp_i = _brute_knn(q, x, 3, "l2", excl)
    kwargs = {"exclude_self": True, "exclude": partner} if self_join else {}
    for tile in (90_000, 1 << 23):
        d, i = knn(q, x, 3, max_tile_elements=tile, **kwargs)
        np.testing.assert_array_equal(i.numpy(), exp_i)
        np.testing.assert_allclose(d.numpy(), exp_d, rtol=1e-4, atol=1e-5)


def test_knn_pads_when_too_few_admissible_points():
    r = np.eye(3, dtype=np.float32)
    d, i = knn(r, r, 4, exclude_self=True)
    assert (i[:, 2:] == -1).all() and torch.isinf(d[:, 2:]).all()
    assert (i[:, :2] >= 0).all()


@pytest.mark.skipif(faiss_missing, reason="faiss not installed")
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_faiss_flat_agrees_with_torch(metric):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    q = rng.normal(size=(50, 16)).astype(np.float32)
    for query, kwargs in ((x, {"exclude_self": True}), (q, {})):
        td, ti = knn(query, x, 10, metric=metric, backend="torch", **kwargs)
        fd, fi = knn(query, x, 10, metric=metric, backend="faiss", index="flat", **kwargs)
        np.testing.assert_array_equal(ti.numpy(), fi.numpy())
        np.testing.assert_allclose(td.numpy(), fd.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(faiss_missing, reason="faiss not installed")
def test_faiss_ivf_is_approximately_right():
    rng = np.random.default_rng(8)
    centers = rng.normal(scale=4, size=(20, 16))
    x = (centers[rng.integers(0, 20, 4000)] + rng.normal(size=(4000, 16))).astype(np.float32)
    td, ti = knn(x, x, 10, exclude_self=True)
    fd, fi = knn(x, x, 10, exclude_self=True, backend="faiss", index="ivf", nlist=32, nprobe=8)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ti.numpy(), fi.numpy(), strict=True)])
    assert recall > 0.9
    assert (fi.numpy() != np.arange(4000)[:, None]).all()
    # the k-distance it implies is close: approximate neighbours can only be farther
    assert (fd[:, -1] >= td[:, -1] - 1e-4).all()
    assert float(torch.median(fd[:, -1] / td[:, -1])) < 1.01
    # and scores built on it agree in ranking
    exact = local_scores(x, x, ["kdist"], k=10)["kdist"]
    approx = local_scores(x, x, ["kdist"], k=10, backend="faiss", index="ivf", nlist=32, nprobe=8)["kdist"]
    assert np.corrcoef(exact, approx)[0, 1] > 0.98


def test_batch_scores_read_the_queries_neighbours_from_the_one_self_join(monkeypatch):
    """In a batch reference the queries are rows of the reference with its own exclusions: one self-join gives
    both their neighbours and the reference's (issue 16: the second search was a third of the in-loop cost).
    The scores equal the two-search computation exactly, and the kNN runs once."""
    import safe_train.detection.scores as scores_module

    rng = np.random.default_rng(3)
    image = rng.normal(size=(48, 8)).astype(np.float32)
    text = rng.normal(size=(48, 8)).astype(np.float32)
    image[:6] = image[0] + 0.01 * rng.normal(size=(6, 8))  # a tight cluster, as learned poisons form
    detectors = ["auto", "slof", "kdist"]
    calls = []
    original = scores_module.knn

    def counted(*args, **kwargs):
        calls.append(kwargs.get("exclude_self", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(scores_module, "knn", counted)
    for queries in (None, slice(0, 24), slice(24, 48)):  # the whole batch, and each of two ranks' shares
        calls.clear()
        fast = scores_module.batch_scores(image, text, detectors, k=8, queries=queries, backend="torch")
        assert calls == [True]  # one self-join
        chosen = slice(None) if queries is None else queries
        reference = np.concatenate([image, text])
        partner = scores_module._pair_exclusions(48, True)
        query_exclude = np.concatenate([np.arange(48)[:, None], partner[:48]], axis=1)
        slow = scores_module.local_scores(image[chosen], reference, detectors, query_exclude=query_exclude[chosen],
                                          reference_exclude=partner, query_text=text[chosen], k=8,
                                          pair_mismatch=scores_module._pair_mismatch(image, text, detectors),
                                          backend="torch")
        for name in detectors:
            np.testing.assert_array_equal(fast[name], slow[name], err_msg=f"{name}, queries {queries}")
