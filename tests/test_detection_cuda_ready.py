"""Detection under GPU training settings, checked on the CPU: IEEE fp32 GEMMs whatever the TF32 switches say,
device-side exclusion masks and tile sizes, cached faiss GPU resources, and the global reference gathered to
rank 0 only (2 gloo ranks)."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO, base_env

from safe_train.detection.knn import knn
from safe_train.detection.scores import global_scores

K = importlib.import_module("safe_train.detection.knn")
B = importlib.import_module("safe_train.detection.knn_bf16")


def _flags() -> tuple[bool, bool, str]:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


@pytest.fixture
def openclip_tf32():
    """The global state OpenCLIP leaves on a CUDA machine (TF32 on, matmul precision "high"); the test's own
    changes are undone afterwards (by the context manager under test, whose restore the tests check too)."""
    with K.exact_fp32_matmul():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        yield


# ---- 1. TF32 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["self_join", "general", "bf16"])
def test_knn_gemms_run_in_ieee_fp32_and_flags_are_restored(path, openclip_tf32, monkeypatch):
    before = _flags()
    assert before == (True, True, "high")
    seen: list[tuple] = []
    real_addmm, real_bf16 = torch.addmm, B._bf16_gemm
    monkeypatch.setattr(torch, "addmm", lambda *a, **kw: seen.append(_flags()) or real_addmm(*a, **kw))
    monkeypatch.setattr(B, "_bf16_gemm", lambda *a, **kw: seen.append(_flags()) or real_bf16(*a, **kw))
    x, y = np.random.default_rng(0).normal(size=(2, 40, 6)).astype(np.float32)
    if path == "self_join":
        d, i = knn(x, x, 3, exclude_self=True, precision="fp32", max_tile_elements=64)
    elif path == "general":
        d, i = knn(x, y, 3, precision="fp32", max_tile_elements=64)
    else:
        d, i = knn(x, x, 3, exclude_self=True, precision="bf16")
    assert len(seen) >= 2 and set(seen) == {(False, False, "highest")}  # every GEMM, every tile
    assert _flags() == before
    ref = x if path != "general" else y
    full = np.sqrt(((x[:, None, :].astype(np.float64) - ref[None].astype(np.float64)) ** 2).sum(-1))
    if path != "general":
        np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(d.numpy(), np.sort(full, 1)[:, :3], rtol=1e-5, atol=1e-5)


def test_flags_are_restored_after_an_exception(openclip_tf32, monkeypatch):
    before = _flags()

    def broken(*args, **kwargs):
        assert _flags() == (False, False, "highest")
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(torch, "addmm", broken)
    x = np.ones((8, 3), np.float32)
    with pytest.raises(RuntimeError, match="simulated"):
        knn(x, x, 2, exclude_self=True, precision="fp32")
    assert _flags() == before


def test_per_backend_precision_settings_are_restored():
    """torch >= 2.9's per-backend settings (what OpenCLIP's legacy switch maps to) come back as they were."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch without per-backend fp32_precision")
    with K.exact_fp32_matmul():
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        before = [getattr(K._backend(p), "fp32_precision", None) for p in K._PRECISION_PATHS]
        with K.exact_fp32_matmul():
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
            assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        assert [getattr(K._backend(p), "fp32_precision", None) for p in K._PRECISION_PATHS] == before


# ---- 5. kNN on CUDA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_exclusion_mask_equals_boolean_indexing(dtype):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        block = torch.randn(9, 33, generator=gen).to(dtype)
        ex = torch.randint(-1, 100, (30, 4), generator=gen)
        rows, cols = 11, 40
        expected = block.clone()
        local = ex[rows:rows + 9] - cols
        valid = (local >= 0) & (local < 33)
        r = torch.arange(9)[:, None].expand_as(local)
        expected[r[valid], local[valid]] = math.inf
        B.mask_exclusions(block, ex, rows, cols)
        assert torch.equal(block, expected)


def test_exclusions_are_moved_once_and_masked_on_the_block_device(monkeypatch):
    calls: list[tuple[int, bool]] = []
    real = K.mask_exclusions

    def spy(block, ex, row_start, col_start):
        calls.append((id(ex), ex.device == block.device))
        return real(block, ex, row_start, col_start)

    monkeypatch.setattr(K, "mask_exclusions", spy)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    partner = np.where(np.arange(30) < 15, np.arange(30) + 15, np.arange(30) - 15)
    d_tiled, i_tiled = knn(x, x, 4, exclude=partner, exclude_self=True, precision="fp32", max_tile_elements=49)
    assert len(calls) > 4 and len({c[0] for c in calls}) == 1 and all(c[1] for c in calls)
    d_one, i_one = knn(x, x, 4, exclude=partner, exclude_self=True, precision="fp32")  # one tile
    np.testing.assert_array_equal(i_tiled.numpy(), i_one.numpy())
    np.testing.assert_allclose(d_tiled.numpy(), d_one.numpy(), rtol=1e-5)  # tiles round the GEMM differently
    assert not (i_one.numpy() == partner[:, None]).any() and not (i_one.numpy() == np.arange(30)[:, None]).any()


def test_tile_size_from_the_device(monkeypatch):
    assert K.tile_elements("cpu") == K.DEFAULT_TILE_ELEMENTS == K.tile_elements(None)
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 141 << 30))
    for free_bytes, expected in [(100 << 30, K.CUDA_MAX_TILE_ELEMENTS),  # an idle H200: capped at 1 GB
                                 (8 << 30, (8 << 30) // (K.CUDA_TILE_FRACTION * 4)),
                                 (1 << 20, K.DEFAULT_TILE_ELEMENTS)]:  # nearly full: never below the CPU size
        free["bytes"] = free_bytes
        assert K.tile_elements("cuda:0") == expected
    # the CPU default stays what it was: max_tile_elements=None gives the same tiles (and results)
    x = np.random.default_rng(2).normal(size=(64, 5)).astype(np.float32)
    a = knn(x, x, 5, exclude_self=True, precision="fp32")
    b = knn(x, x, 5, exclude_self=True, precision="fp32", max_tile_elements=K.DEFAULT_TILE_ELEMENTS)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_auto_never_picks_bf16_on_cuda(monkeypatch):
    ran: list[str] = []
    monkeypatch.setattr(K, "bf16_is_fast", lambda device=None: True)  # even if a GPU claimed fast bf16
    monkeypatch.setattr(K, "AUTO_BF16_MIN_PAIRS", 1)
    monkeypatch.setattr(K, "tile_elements", lambda device: K.DEFAULT_TILE_ELEMENTS)
    monkeypatch.setattr(K, "torch_knn_bf16", lambda *a, **kw: ran.append("bf16") or (_ for _ in ()).throw(AssertionError))
    real = K._torch_knn
    monkeypatch.setattr(K, "_torch_knn", lambda q, r, k, ex, device, tile: ran.append(str(device)) or real(q, r, k, ex,
                                                                                                       "cpu", tile))
    x = np.random.default_rng(3).normal(size=(20, 4)).astype(np.float32)
    knn(x, x[:10], 3, device="cuda")
    assert ran == ["cuda"]


def test_faiss_gpu_resources_are_built_once_per_device(monkeypatch):
    faiss = pytest.importorskip("faiss")
    built: list[int] = []
    moved: list[tuple[object, int]] = []

    class Resources:
        def __init__(self) -> None:
            built.append(1)

    monkeypatch.setattr(faiss, "StandardGpuResources", Resources, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, idx: moved.append((res, dev)) or idx, raising=False)
    monkeypatch.setattr(K, "_FAISS_GPU_RESOURCES", {})
    x = np.random.default_rng(4).normal(size=(50, 8)).astype(np.float32)
    expected = knn(x, x, 4, exclude_self=True, backend="faiss")
    for _ in range(3):
        got = knn(x, x, 4, exclude_self=True, backend="faiss", device="cuda:1")
        assert torch.equal(got[1], expected[1])
    knn(x, x, 4, exclude_self=True, backend="faiss", device="cuda:0")
    assert len(built) == 2  # one per GPU, not one per call
    assert [dev for _, dev in moved] == [1, 1, 1, 0] and moved[0][0] is moved[2][0]


# ---- 2-4. distributed: gathers to rank 0, device gathers, the global reference ------------------------------

WORKER = textwrap.dedent("""
    import sys, argparse
    import numpy as np, torch, torch.distributed as tdist
    from safe_train import dist
    import safe_train.detection.callback as cbmod
    from safe_train.detection.callback import DetectionCallback
    from safe_train.interface import StepOutput, TrainContext, TrainPass
    from safe_train.state import SampleTable

    tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    out = {}
    # uneven rows, several rounds (chunks of 2 rows of 3 float64)
    local = np.arange(3 * (5 if rank == 0 else 3), dtype=np.float64).reshape(-1, 3) + 100 * rank
    got = dist.gather_to_rank0(local, chunk_bytes=48)
    old = np.concatenate(dist.gather_arrays(local.reshape(-1))).reshape(-1, 3)
    out["gather_none"] = got is None
    if got is not None:
        out["gather_equal"] = bool(np.array_equal(got, old)) and got.dtype == np.float64
    out["empty"] = dist.gather_to_rank0(np.zeros((0, 2), np.float32) if rank else np.ones((2, 2), np.float32)) is None
    b = dist.broadcast_array(np.arange(7, dtype=np.int32) * 3 if rank == 0 else None, chunk_bytes=8)
    out["broadcast"] = b.tolist()
    rows = dist.all_gather_rows(torch.full((2 + rank, 2), float(rank)))
    out["rows"] = rows.tolist()

    data = np.load(sys.argv[1])
    per = len(data["ids"]) // world
    args = argparse.Namespace(detect="kdist,slof,lid", detect_reference="global", detect_k=3, detect_metric="l2",
                              detect_backend="torch", detect_action="log", detect_drop_fraction=None,
                              detect_drop_epoch=1, detect_every=1, detect_reference_size=12, detect_manifest=None,
                              seed=0)
    cb = DetectionCallback.from_args(args)
    ctx = TrainContext(args=args, table=SampleTable(), rank=rank, world_size=world)
    cb.setup(ctx)
    cb.on_epoch_start(ctx)
    half = per // 2
    for s in (slice(rank * per, rank * per + half), slice(rank * per + half, (rank + 1) * per)):
        ids = torch.from_numpy(data["ids"][s])
        ctx.table.register(ids.numpy())
        features = {"image_features": torch.from_numpy(data["image"][s]),
                    "text_features": torch.from_numpy(data["text"][s])}
        cb.on_step_end(ctx, StepOutput(TrainPass(), ids, features, {}, 0))
    ctx.table.sync(dist.gather_arrays)
    scored_shapes, all_gathers = [], []
    real_scores, real_gather = cbmod.global_scores, dist.gather_arrays
    cbmod.global_scores = lambda image, *a, **kw: scored_shapes.append(image.shape) or real_scores(image, *a, **kw)
    dist.gather_arrays = lambda array: all_gathers.append(len(array)) or real_gather(array)
    cb.on_epoch_end(ctx)
    out["scored_shapes"] = [list(s) for s in scored_shapes]
    out["all_gathers"] = all_gathers
    np.savez(sys.argv[2] + f"_{rank}.npz", ids=ctx.table.ids,
             **{n: np.asarray(ctx.table["score_" + n]) for n in cb.detectors})
    import json
    open(sys.argv[2] + f"_{rank}.json", "w").write(json.dumps(out))
    tdist.destroy_process_group()
""")


def test_two_rank_global_reference_is_gathered_to_rank0_only(tmp_path):
    import json

    rng = np.random.default_rng(0)
    n, d = 32, 6
    image = rng.normal(size=(n, d)).astype(np.float32)
    text = (image + rng.normal(scale=0.3, size=(n, d))).astype(np.float32)
    ids = rng.permutation(10_000)[:n].astype(np.int64)
    np.savez(tmp_path / "data.npz", ids=ids, image=image, text=text)
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "worker.py"),
           str(tmp_path / "data.npz"), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"out_{r}.json").read_text()) for r in range(2))
    # the helpers: rank 0 gets what the old all-gather gave, rank 1 nothing
    assert r0["gather_equal"] and not r0["gather_none"] and r1["gather_none"] and "gather_equal" not in r1
    assert not r0["empty"] and r1["empty"]
    assert r0["broadcast"] == r1["broadcast"] == [0, 3, 6, 9, 12, 15, 18]
    assert r0["rows"] == r1["rows"] == [[0.0, 0.0]] * 2 + [[1.0, 1.0]] * 3
    # only rank 0 held (and scored) the whole epoch; no rank all-gathered the embeddings
    assert r0["scored_shapes"] == [[n, d]] and r1["scored_shapes"] == []
    assert r0["all_gathers"] == r1["all_gathers"] == []
    # scores equal one process's global scores of the same epoch (rows in rank order), on both ranks
    expected = global_scores(image, text, ["kdist", "slof", "lid"], reference_size=12, k=3, seed=0)
    order = np.argsort(ids)
    results = [np.load(tmp_path / f"out_{r}.npz") for r in range(2)]
    for name, values in expected.items():
        for result in results:
            np.testing.assert_array_equal(result["ids"], ids[order])
            np.testing.assert_allclose(result[name], values[order].astype(np.float32), rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(results[0][name], results[1][name])


def test_batch_scores_of_a_query_slice_equal_the_full_rows():
    """What each rank computes for its own share of a gathered batch equals those rows of the whole batch."""
    from safe_train.detection.scores import batch_scores

    rng = np.random.default_rng(5)
    image = torch.from_numpy(rng.normal(size=(20, 5)).astype(np.float32))
    text = image + 0.2 * torch.from_numpy(rng.normal(size=(20, 5)).astype(np.float32))
    names = ["kdist", "slof", "lid", "dao", "clip", "auto"]
    full = batch_scores(image.numpy(), text.numpy(), names, k=4)
    for part in (slice(0, 7), slice(7, 20)):
        got = batch_scores(image, text, names, k=4, queries=part)
        for name in names:
            np.testing.assert_allclose(got[name], full[name][part], rtol=1e-5, atol=1e-6, err_msg=name)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
