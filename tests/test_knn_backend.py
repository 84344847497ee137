"""``backend="auto"`` (the default kNN backend): its fixed resolution rule, its results against float64
brute force, faiss flat against torch fp32, and the CLI / flag defaults that select it.

"Exact" as in tests/test_knn_precision.py: the neighbour sets and distances of a float64 brute force on the
float32 inputs (fp32 paths: up to the rounding of the ``|q|^2 + |r|^2 - 2 q.r`` expansion). The data are
clustered and ties-free, which :func:`brute` checks: every row's k-th and (k+1)-th admissible distances
differ by far more than that rounding, so the neighbour *sets* are unambiguous.
"""

from __future__ import annotations

import argparse
import importlib
import itertools

import numpy as np
import pytest
import torch

from safe_train.detect import build_parser as detect_parser
from safe_train.detection.callback import DetectionConfig
from safe_train.detection.knn import BACKENDS, auto_backend, knn

K = importlib.import_module("safe_train.detection.knn")  # the module (the package re-exports the function)
TIE_MARGIN = 1e-5  # relative; the fp32 expansion moves these distances by ~1.5e-6 relative
faiss_missing = not K.faiss_available()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def clustered(rng: np.random.Generator, n: int, d: int, n_clusters: int = 10) -> np.ndarray:
    centers = rng.normal(scale=3.0, size=(n_clusters, d))
    return (centers[rng.integers(0, n_clusters, n)] + rng.normal(size=(n, d))).astype(np.float32)


def brute(q: np.ndarray, r: np.ndarray, k: int, metric: str, excl: list[set[int]] | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 difference-form distances and indices of the k nearest admissible rows, and which rows are
    ties-free at the k-th: their (k+1)-th distance exceeds the k-th by more than fp32 rounding can move it."""
    q64, r64 = q.astype(np.float64), r.astype(np.float64)
    if metric == "cosine":
        q64 = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
        r64 = r64 / np.linalg.norm(r64, axis=1, keepdims=True)
    full = ((q64[:, None, :] - r64[None, :, :]) ** 2).sum(-1)
    full = full / 2 if metric == "cosine" else np.sqrt(full)
    for i, e in enumerate(excl or []):
        full[i, [j for j in e if j >= 0]] = np.inf
    order = np.argsort(full, axis=1)[:, :k + 1]
    dist = np.take_along_axis(full, order, axis=1)
    clear = dist[:, k] - dist[:, k - 1] > TIE_MARGIN * dist[:, k]
    assert clear.mean() > 0.97, "test data must be (nearly) ties-free"
    return dist[:, :k], order[:, :k], clear


def assert_brute(d: torch.Tensor, i: torch.Tensor, exp: tuple[np.ndarray, np.ndarray, np.ndarray], metric: str,
                 q: np.ndarray, r: np.ndarray) -> None:
    """Distances equal brute force's within the fp32 expansion's error (squared distances: 1e-5 relative plus
    ``2^-20 (|q|^2 + |r|^2)``, which dominates for a query's own copy at distance 0); the same neighbour set on
    every ties-free row (on the others a neighbour at nearly the k-th distance may swap with the (k+1)-th)."""
    exp_d, exp_i, clear = exp
    got = d.numpy().astype(np.float64)
    if metric == "l2":  # compare squared distances; cosine distances are already d^2 / 2 of unit vectors
        got, exp_d, norms = got**2, exp_d**2, float((q.astype(np.float64)**2).sum(1).max() + (r.astype(np.float64)**2).sum(1).max())
    else:
        norms = 1.0
    np.testing.assert_allclose(got, exp_d, rtol=1e-5, atol=2.0**-20 * norms)
    np.testing.assert_array_equal(np.sort(i.numpy()[clear], axis=1), np.sort(exp_i[clear], axis=1))


def set_cpu(monkeypatch, *, amx: bool, bf16: bool, faiss: bool) -> None:
    """Pretend the CPU has (or lacks) AMX / native bf16, and faiss is (not) importable."""
    monkeypatch.setattr(K, "amx_is_available", lambda device=None: amx)
    monkeypatch.setattr(K, "bf16_is_fast", lambda device=None: bf16 or amx)
    monkeypatch.setattr(K, "faiss_available", lambda: faiss)


def test_auto_rule_is_fixed_and_documented(monkeypatch):
    """Every branch of the documented rule, from the device, the CPU's capabilities and the search's size."""
    doc = auto_backend.__doc__ or ""
    for name in ("AUTO_FAISS_MIN_PAIRS", "AUTO_BF16_MIN_PAIRS", "AUTO_LARGE_PAIRS", "AUTO_SELF_JOIN_FP32_MIN_DIM",
                 "AUTO_BF16_MAX_DIM", "CUDA", "AMX"):
        assert name in doc, name
    tiny, mid, big = 32, 4096, 50_000  # 1,024 pairs; between the faiss and the bf16 thresholds; above all
    assert tiny**2 < K.AUTO_FAISS_MIN_PAIRS <= mid**2 < min(K.AUTO_BF16_MIN_PAIRS, K.AUTO_LARGE_PAIRS)
    assert max(K.AUTO_BF16_MIN_PAIRS, K.AUTO_LARGE_PAIRS) <= big**2
    torch32, bf16, faiss = ("torch", "fp32"), ("torch", "bf16"), ("faiss", "fp32")
    for amx, native, has_faiss in itertools.product((True, False), repeat=3):
        set_cpu(monkeypatch, amx=amx, bf16=native, faiss=has_faiss)
        fast = faiss if has_faiss else torch32
        for n, d, self_join in itertools.product((tiny, mid, big), (128, 512), (True, False)):
            # explicit torch precisions pin the torch backend; CUDA is always torch fp32 (TF32 off)
            assert auto_backend(n, n, d, "cpu", self_join=self_join, precision="fp32") == torch32
            assert auto_backend(n, n, d, "cpu", self_join=self_join, precision="bf16") == bf16
            assert auto_backend(n, n, d, "cuda", self_join=self_join) == torch32
            assert auto_backend(n, n, d, torch.device("cuda", 1), self_join=self_join) == torch32
            got = auto_backend(n, n, d, "cpu", self_join=self_join)
            assert auto_backend(n, n, d, None, self_join=self_join) == got  # device None: the CPU
            if n == tiny:
                assert got == torch32
            elif n == mid:
                assert got == fast
            elif amx:
                assert got == bf16
            elif self_join and d == 512:
                assert got == torch32
            elif self_join and native:  # d = 128
                assert got == bf16
            else:
                assert got == fast
    # the boundaries, inclusive: pairs (not rows) and d
    set_cpu(monkeypatch, amx=False, bf16=True, faiss=True)
    large = K.AUTO_LARGE_PAIRS
    assert auto_backend(1024, 2048, 64, "cpu") == faiss and auto_backend(1023, 2048, 64, "cpu") == torch32
    assert auto_backend(large, 1, K.AUTO_BF16_MAX_DIM, "cpu", self_join=True) == bf16
    assert auto_backend(large - 1, 1, K.AUTO_BF16_MAX_DIM, "cpu", self_join=True) == faiss
    assert auto_backend(large, 1, K.AUTO_BF16_MAX_DIM, "cpu") == faiss  # not a self-join
    assert K.AUTO_SELF_JOIN_FP32_MIN_DIM <= K.AUTO_BF16_MAX_DIM + 1  # no gap between the two torch choices
    assert auto_backend(large, 1, K.AUTO_BF16_MAX_DIM + 1, "cpu", self_join=True) == torch32
    set_cpu(monkeypatch, amx=False, bf16=False, faiss=True)
    assert auto_backend(large, 1, K.AUTO_SELF_JOIN_FP32_MIN_DIM, "cpu", self_join=True) == torch32
    assert auto_backend(large, 1, K.AUTO_SELF_JOIN_FP32_MIN_DIM - 1, "cpu", self_join=True) == faiss
    assert auto_backend(large - 1, 1, K.AUTO_SELF_JOIN_FP32_MIN_DIM, "cpu", self_join=True) == faiss
    set_cpu(monkeypatch, amx=True, bf16=True, faiss=True)
    assert auto_backend(K.AUTO_BF16_MIN_PAIRS, 1, 512, "cpu") == bf16
    assert auto_backend(K.AUTO_BF16_MIN_PAIRS - 1, 1, 512, "cpu") == faiss
    assert len({auto_backend(big, big, 128, "cpu", self_join=True) for _ in range(5)}) == 1  # no timing
    with pytest.raises(ValueError, match="precision"):
        auto_backend(10, 10, 4, "cpu", precision="fp16")


def test_amx_needs_native_bf16(monkeypatch):
    """The bf16 branch needs AMX tiles, and never a non-CPU device (bf16_is_fast says False there)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(K, "bf16_is_fast", lambda device=None: False)
    assert not K.amx_is_available("cpu")
    monkeypatch.setattr(K, "bf16_is_fast", lambda device=None: True)
    assert K.amx_is_available("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not K.amx_is_available("cpu")
    monkeypatch.undo()
    assert not K.amx_is_available("cuda")


def spy_paths(monkeypatch) -> list[str]:
    """Record which search function each knn call runs."""
    ran: list[str] = []
    for name in ("torch_knn_bf16", "_torch_knn_self", "_torch_knn", "_faiss_knn"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, real=real, name=name, **kw: ran.append(name) or real(*a, **kw))
    return ran


@pytest.mark.skipif(faiss_missing, reason="faiss not installed")
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_auto_equals_brute_force_on_every_path(metric, monkeypatch):
    """Whichever backend the rule picks (forced here by the thresholds and capabilities), auto's result is
    float64 brute force's: self-join with self-exclusion, and a general search with explicit exclusions."""
    rng = np.random.default_rng(0)
    x = clustered(rng, 600, 24)
    q = clustered(rng, 150, 24)
    ex = rng.integers(-1, 600, size=(150, 3))  # asymmetric, -1 = none
    exp_self = brute(x, x, 10, metric, [{j} for j in range(600)])
    exp_gen = brute(q, x, 10, metric, [set(row.tolist()) for row in ex])
    ran = spy_paths(monkeypatch)
    # (amx, native bf16, faiss, AUTO_BF16_MIN_PAIRS, AUTO_LARGE_PAIRS, AUTO_SELF_JOIN_FP32_MIN_DIM) -> the paths
    # of the self-join and of the general search
    cases = {(True, True, True, 0, 0, 0): ("torch_knn_bf16", "torch_knn_bf16"),
             (False, True, True, 10**9, 0, 10**9): ("torch_knn_bf16", "_faiss_knn"),
             (False, False, True, 10**9, 0, 0): ("_torch_knn_self", "_faiss_knn"),
             (False, True, True, 10**9, 10**9, 0): ("_faiss_knn", "_faiss_knn"),
             (False, False, False, 10**9, 10**9, 0): ("_torch_knn_self", "_torch_knn")}
    for (amx, native, faiss, bf16_min, large, fp32_dim), paths in cases.items():
        set_cpu(monkeypatch, amx=amx, bf16=native, faiss=faiss)
        monkeypatch.setattr(K, "AUTO_BF16_MIN_PAIRS", bf16_min)
        monkeypatch.setattr(K, "AUTO_LARGE_PAIRS", large)
        monkeypatch.setattr(K, "AUTO_SELF_JOIN_FP32_MIN_DIM", fp32_dim)
        monkeypatch.setattr(K, "AUTO_FAISS_MIN_PAIRS", 0)
        ran.clear()
        d, i = knn(x, x, 10, metric=metric, exclude_self=True)  # backend="auto" is the default
        assert_brute(d, i, exp_self, metric, x, x)
        d, i = knn(q, x, 10, metric=metric, exclude=ex, backend="auto")
        assert_brute(d, i, exp_gen, metric, q, x)
        assert tuple(ran) == paths, (amx, native, faiss)


@pytest.mark.skipif(faiss_missing, reason="faiss not installed")
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_faiss_flat_matches_torch_fp32_and_brute_force(metric):
    """faiss flat is as exact as torch fp32 on clustered data: the same neighbour sets (float64 brute force's)
    with self-exclusion, explicit exclusion sets (including a row's would-be nearest neighbour), both at
    once, and k larger than a cluster."""
    rng = np.random.default_rng(1)
    x = clustered(rng, 900, 32, n_clusters=30)
    own = np.arange(900)
    nearest = np.argsort(np.where(np.eye(900, dtype=bool), np.inf, ((x[:, None] - x[None]) ** 2).sum(-1)), 1)[:, 0]
    ex = np.stack([nearest, rng.integers(-1, 900, 900)], 1)  # drop each row's nearest and a random row
    for k in (5, 40):
        for kwargs, excl in (({"exclude_self": True}, [{j} for j in own]),
                             ({"exclude": ex}, [set(row.tolist()) for row in ex]),
                             ({"exclude": ex, "exclude_self": True}, [{j, *row.tolist()} for j, row in zip(own, ex, strict=True)])):
            exp = brute(x, x, k, metric, excl)
            td, ti = knn(x, x, k, metric=metric, backend="torch", precision="fp32", **kwargs)
            fd, fi = knn(x, x, k, metric=metric, backend="faiss", index="flat", **kwargs)
            assert_brute(td, ti, exp, metric, x, x)
            assert_brute(fd, fi, exp, metric, x, x)
            assert all(not set(row.tolist()) & e for row, e in zip(fi.numpy(), excl, strict=True))


@pytest.mark.skipif(faiss_missing, reason="faiss not installed")
def test_faiss_uses_torchs_thread_count_and_restores_its_own(monkeypatch):
    """faiss-cpu wheels bundle their own OpenMP runtime (shared with torch's or not, by import order): a search
    runs with torch's thread count (faked here, so both cases are covered) and leaves faiss' setting as it was."""
    import faiss  # deferred: optional dependency (skipped above when missing)

    seen = []
    search = faiss.IndexFlatL2.search
    monkeypatch.setattr(faiss.IndexFlatL2, "search",
                        lambda self, *a, **kw: seen.append(faiss.omp_get_max_threads()) or search(self, *a, **kw))
    x = clustered(np.random.default_rng(2), 64, 8)
    before = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(3)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
        knn(x, x, 4, exclude_self=True, backend="faiss")
        assert seen == [1] and faiss.omp_get_max_threads() == 3
    finally:
        faiss.omp_set_num_threads(before)


def test_invalid_backend_names_are_one_clear_error():
    x = np.random.default_rng(3).normal(size=(20, 4)).astype(np.float32)
    assert BACKENDS == ("auto", "torch", "faiss")
    for bad in ("Auto", "fastest", "sklearn", ""):
        with pytest.raises(ValueError, match=r"unknown kNN backend .*choose from \('auto', 'torch', 'faiss'\)"):
            knn(x, x, 3, backend=bad)
    with pytest.raises(ValueError, match="index='ivf' needs backend='faiss'"):
        knn(x, x, 3, index="ivf")  # auto never picks an approximate search


def test_cli_and_flag_default_to_auto():
    args = detect_parser().parse_args(["--model", "m", "--checkpoint", "c", "--train-data", "t", "--out", "o"])
    assert args.backend == "auto"
    help_text = " ".join(detect_parser().format_help().split())
    assert "--backend {auto,torch,faiss}" in help_text and "Default: auto" in help_text
    with pytest.raises(SystemExit):
        detect_parser().parse_args(["--model", "m", "--checkpoint", "c", "--train-data", "t", "--backend", "x"])
    assert DetectionConfig().backend == "auto"
    assert DetectionConfig.from_args(argparse.Namespace(detect="kdist")).backend == "auto"
    parser = argparse.ArgumentParser()
    DetectionConfig.add_arguments(parser)
    assert "(default: auto)" in " ".join(parser.format_help().split())
    assert parser.parse_args([]).detect_backend == "auto"
