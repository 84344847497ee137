"""SampleTable: the one home of per-sample state."""

from __future__ import annotations

import subprocess
import textwrap
import threading

import numpy as np
import pytest
import torch

import safe_train.state as state_module
from safe_train.state import SampleTable, UnknownSampleError, unique_counts, unique_ids


def test_register_keeps_ids_sorted_and_columns_aligned():
    table = SampleTable()
    table.add_column("score", np.float32, np.nan)
    assert table.register([50, 10, 30]) == 3
    table.set("score", [30], 3.0)
    assert table.register([20, 30, 40]) == 2  # 30 is known
    np.testing.assert_array_equal(table.ids, [10, 20, 30, 40, 50])
    assert table.get("score", [30])[0] == 3.0
    assert np.isnan(table.get("score", [10, 20, 40, 50])).all()
    table.add_column("dropped", bool, False)  # a column added later covers existing rows
    assert table["dropped"].shape == (5,) and not table["dropped"].any()


def test_unknown_ids_raise():
    table = SampleTable()
    table.register([1, 2])
    with pytest.raises(UnknownSampleError):
        table.rows([3])
    np.testing.assert_array_equal(table.contains([0, 1, 3]), [False, True, False])


class _ThreadGroup:
    """A fake process group: each thread is a rank; gather is a real all-gather through a barrier."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world

    def gather_for(self, rank: int):
        def gather(array):
            self.slots[rank] = array
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out

        return gather


def test_sync_merges_records_from_every_rank_in_rank_order():
    tables = [SampleTable(), SampleTable()]
    for t in tables:
        t.add_column("sim", np.float32, np.nan)
    tables[0].record("sim", np.array([1, 3]), np.array([0.1, 0.3]))
    tables[1].record("sim", np.array([2, 3]), np.array([0.2, 0.9]))  # id 3 seen on both: rank 1 (later) wins
    tables[1].observe(np.array([4]))  # trained on, no value recorded
    group = _ThreadGroup(2)
    threads = [threading.Thread(target=t.sync, args=(group.gather_for(r),)) for r, t in enumerate(tables)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=10)
    for t in tables:
        np.testing.assert_array_equal(t.ids, [1, 2, 3, 4])
        np.testing.assert_allclose(t["sim"][:3], [0.1, 0.2, 0.9])
        assert np.isnan(t["sim"][3])
    np.testing.assert_array_equal(tables[0]["sim"], tables[1]["sim"])


def test_save_load_roundtrip_and_memmap(tmp_path):
    table = SampleTable(storage_dir=tmp_path / "mm", memmap_threshold=100)
    table.add_column("score", np.float32, 0.0)
    table.add_column("safe", bool, False)
    table.register(np.arange(0, 1000, 2))
    assert isinstance(table["score"], np.memmap)  # large tables live on disk
    table.set("score", [4, 6], [1.5, 2.5])
    table.set("safe", [6], True)
    table.save(tmp_path / "saved")
    loaded = SampleTable()
    loaded.load(tmp_path / "saved")
    np.testing.assert_array_equal(loaded.ids, table.ids)
    np.testing.assert_array_equal(loaded["score"], table["score"])
    np.testing.assert_array_equal(loaded["safe"], table["safe"])
    assert loaded.get("score", [6])[0] == 2.5 and loaded.get("safe", [6])[0]
    table.save(tmp_path / "saved")  # overwriting an existing save works (atomic replace)
    with pytest.raises(FileNotFoundError):
        SampleTable().load(tmp_path / "missing")


def test_record_requires_declared_column_and_matching_lengths():
    table = SampleTable()
    with pytest.raises(KeyError):
        table.record("nope", np.array([1]), np.array([1.0]))
    table.add_column("x", np.float32)
    with pytest.raises(ValueError):
        table.record("x", np.array([1, 2]), np.array([1.0]))


# ---- scale: sort-based helpers, bounded sync rounds, pending buffers -------------------------------

I64 = np.iinfo(np.int64)


@pytest.mark.parametrize("ids", [
    [], [7], [3, 3, 3], [I64.min, I64.max, 0, -1, I64.max, I64.min, 1],
    list(range(10, -10, -1)) * 3, np.random.default_rng(0).integers(-50, 50, 1000),
    np.random.default_rng(1).integers(I64.min, I64.max, 5000, dtype=np.int64, endpoint=True),
    np.arange(12, dtype=np.int32).reshape(3, 4),
])
def test_fast_unique_helpers_equal_np_unique(ids):
    expected, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
    got = unique_ids(ids)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    got_ids, got_counts = unique_counts(ids)
    np.testing.assert_array_equal(got_ids, expected)
    np.testing.assert_array_equal(got_counts, counts)
    assert got_counts.dtype == np.int64


@pytest.fixture
def tiny_rounds(monkeypatch):
    """Shrink every size constant so small tests take the multi-round, segmented, compacting paths."""
    monkeypatch.setattr(state_module, "SYNC_CHUNK", 16)
    monkeypatch.setattr(state_module, "MIN_SYNC_CHUNK", 4)
    monkeypatch.setattr(state_module, "SEEN_COMPACT", 5)
    monkeypatch.setattr(state_module, "SEARCH_SEGMENT", 8)
    monkeypatch.setattr(state_module, "SORTED_LOOKUP_MIN", 4)
    monkeypatch.setattr(state_module, "_BLOCK", 8)


def _random_ops(rng, world: int, known: np.ndarray, pool: np.ndarray) -> list[list[tuple]]:
    """Per rank, a random sequence of observe/record calls (repeats within and across ranks)."""
    ops = []
    for _ in range(world):
        rank_ops: list[tuple] = []
        for _ in range(rng.integers(0, 12)):
            ids = rng.choice(np.concatenate([known, pool]), size=rng.integers(0, 9))
            if rng.random() < 0.3:
                rank_ops.append(("observe", ids))
            else:
                name = "a" if rng.random() < 0.6 else "b"
                rank_ops.append(("record", name, ids, rng.normal(size=len(ids))))
        ops.append(rank_ops)
    return ops


def _reference(known: np.ndarray, ops: list[list[tuple]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """What sync must produce: every id touched is registered; records applied rank by rank, in order."""
    ids = set(known.tolist())
    values: dict[str, dict[int, float]] = {"a": {}, "b": {}}
    for rank_ops in ops:
        for op in rank_ops:
            ids.update(op[-1 if op[0] == "observe" else 2].tolist())
            if op[0] == "record":
                for i, v in zip(op[2].tolist(), op[3].tolist(), strict=True):
                    values[op[1]][i] = np.float32(v)
    table_ids = np.array(sorted(ids), dtype=np.int64)
    columns = {}
    for name, fill in (("a", np.nan), ("b", -1.0)):
        columns[name] = np.array([values[name].get(i, fill) for i in table_ids.tolist()], dtype=np.float32)
    return table_ids, columns


def _new_table(known: np.ndarray) -> SampleTable:
    table = SampleTable()
    table.add_column("a", np.float32, np.nan)
    table.add_column("b", np.float32, -1.0)
    table.register(known)
    return table


def _apply(table: SampleTable, rank_ops: list[tuple]) -> None:
    for op in rank_ops:
        if op[0] == "observe":
            table.observe(op[1])
        else:
            table.record(op[1], op[2], op[3])


def _sync_threads(tables: list[SampleTable], gather_wrap=None) -> None:
    group = _ThreadGroup(len(tables))
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        gather = group.gather_for(rank)
        try:
            tables[rank].sync(gather_wrap(rank, gather) if gather_wrap else gather)
        except BaseException as e:  # surfaced below
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(tables))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert not errors, errors


@pytest.mark.parametrize("seed", range(12))
def test_sync_matches_reference_model_over_many_rounds(tiny_rounds, seed):
    rng = np.random.default_rng(seed)
    world = 1 + seed % 3
    known = np.unique(rng.integers(-30, 30, 20))
    pool = np.array([I64.min, I64.max, -(2**40), 2**40 + 1, *range(100, 130)], dtype=np.int64)
    ops = _random_ops(rng, world, known, pool)
    tables = [_new_table(known) for _ in range(world)]
    for table, rank_ops in zip(tables, ops, strict=True):
        _apply(table, rank_ops)
    _sync_threads(tables)
    expected_ids, expected = _reference(known, ops)
    for table in tables:
        np.testing.assert_array_equal(table.ids, expected_ids)
        for name in ("a", "b"):
            np.testing.assert_array_equal(table[name], expected[name], err_msg=name)
        assert table.pending_state()["seen"].size == 0 and len(table.pending_state()) == 1


def test_pending_state_round_trip_gives_the_same_table(tmp_path, tiny_rounds):
    rng = np.random.default_rng(5)
    t1 = _new_table(np.arange(0, 40, 2))
    t1.set("a", [4], 0.5)
    t1.save(tmp_path / "saved")
    # mid-epoch: observations (known and new ids) and a column recorded twice for the same id
    t1.observe(np.array([2, 3, 3, 1000, 7]))
    t1.record("a", np.array([6, 1000, 6]), np.array([1.0, 2.0, 3.0]))
    t1.record("a", np.array([6, 41]), np.array([4.0, 5.0]))
    t1.record("b", np.arange(10), rng.normal(size=10))
    state = t1.pending_state()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    np.testing.assert_array_equal(state["rec_ids/a"], [6, 1000, 6, 6, 41])  # arrival order
    t2 = SampleTable()
    t2.load(tmp_path / "saved")
    t2.load_pending_state({k: v.copy() for k, v in state.items()})
    for t in (t1, t2):  # identical further calls
        t.record("a", np.array([1000, 8]), np.array([6.0, 7.0]))
        t.observe(np.array([555]))
        t.sync()
    np.testing.assert_array_equal(t1.ids, t2.ids)
    for name in ("a", "b"):
        np.testing.assert_array_equal(t1[name], t2[name])
    assert t2.get("a", [6])[0] == 4.0 and t2.get("a", [1000])[0] == 6.0 and t2.get("a", [41])[0] == 5.0
    assert t2.get("a", [4])[0] == 0.5 and t2.contains([3, 7, 555]).all()
    with pytest.raises(KeyError):
        t2.load_pending_state({"rec_ids/nope": np.array([1]), "rec_values/nope": np.array([1.0])})
    with pytest.raises(ValueError):
        t2.load_pending_state({"bogus": np.array([1])})


def test_sync_does_not_gather_registered_ids_again(tiny_rounds):
    """Later epochs exchange only counts, rows (uint32) and values: never the (int64) ids themselves."""
    ids = np.arange(1, 200) * 7919
    tables = [_new_table(np.zeros(0, np.int64)) for _ in range(2)]
    for rank, t in enumerate(tables):
        t.observe(ids[rank::2])
    _sync_threads(tables)
    np.testing.assert_array_equal(tables[0].ids, ids)
    gathered: list[np.ndarray] = []

    def counting(rank, gather):
        def wrapped(array):
            gathered.append(np.asarray(array))
            return gather(array)
        return wrapped

    for rank, t in enumerate(tables):  # epoch 2: every id seen again, a value recorded for each
        t.observe(ids[rank::2])
        t.record("a", ids[rank::2], np.full(len(ids[rank::2]), rank, np.float32))
    _sync_threads(tables, counting)
    assert not [a for a in gathered if a.dtype == np.int64 and len(a) > 1]
    assert sum(len(a) for a in gathered if a.dtype == np.uint32) == len(ids)
    np.testing.assert_array_equal(tables[1]["a"], np.arange(len(ids)) % 2)


def test_lookups_of_large_unsorted_keys(tiny_rounds):
    rng = np.random.default_rng(3)
    table = SampleTable()
    table.register(rng.integers(I64.min, I64.max, 500, dtype=np.int64))
    keys = rng.permutation(table.ids)[:300]
    np.testing.assert_array_equal(table.rows(keys), np.searchsorted(table.ids, keys))
    np.testing.assert_array_equal(table.contains(np.concatenate([keys, [5, 6]])), [True] * 300 + [False, False])
    with pytest.raises(UnknownSampleError):
        table.rows(np.concatenate([keys, [5]]))


def test_memmap_columns_survive_registration_and_sync(tmp_path):
    table = SampleTable(storage_dir=tmp_path / "mm", memmap_threshold=10)
    table.add_column("x", np.float32, -1.0)
    table.register(np.arange(20))
    table.record("x", np.array([3, 25]), np.array([1.0, 2.0]))
    table.sync()
    assert isinstance(table["x"], np.memmap) and len(table) == 21
    assert table.get("x", [3, 25]).tolist() == [1.0, 2.0] and table.get("x", [4])[0] == -1.0
    assert len(list((tmp_path / "mm").glob("*.npy"))) == 1  # replaced files are removed


TWO_RANK_WORKER = textwrap.dedent("""
    import sys
    import numpy as np, torch.distributed as tdist
    import safe_train.state as st
    from safe_train import dist
    st.SYNC_CHUNK, st.MIN_SYNC_CHUNK, st.SEEN_COMPACT, st.SEARCH_SEGMENT = 64, 16, 50, 16
    tdist.init_process_group("gloo")
    rank = tdist.get_rank()
    table = st.SampleTable()
    table.add_column("v", np.float32, np.nan)
    table.register(np.arange(0, 300, 3))
    rng = np.random.default_rng(rank)
    for i in range(40):
        ids = rng.integers(0, 400, 16)
        table.observe(ids)
        table.record("v", ids, np.full(16, rank * 1000 + i, np.float32))
    table.sync(dist.gather_arrays)
    np.savez(sys.argv[1] + f"_{rank}.npz", ids=table.ids, v=table["v"])
    tdist.destroy_process_group()
""")


def test_two_rank_gloo_sync_gives_identical_tables(tmp_path):
    from conftest import PYTHON, REPO, base_env

    (tmp_path / "worker.py").write_text(TWO_RANK_WORKER)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "worker.py"),
           str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [np.load(tmp_path / f"out_{r}.npz") for r in range(2)]
    # the same calls in one process, rank 0's then rank 1's: the rank-order rule
    expected: dict[int, float] = {}
    for rank in range(2):
        rng = np.random.default_rng(rank)
        for i in range(40):
            for sample in rng.integers(0, 400, 16).tolist():
                expected[sample] = rank * 1000 + i
    ids = np.union1d(np.arange(0, 300, 3), list(expected))
    values = np.array([expected.get(i, np.nan) for i in ids.tolist()], dtype=np.float32)
    for result in results:
        np.testing.assert_array_equal(result["ids"], ids)
        np.testing.assert_array_equal(result["v"], values)


def test_device_rows_drain_in_order_with_one_copy_and_report_full():
    from safe_train.state import DeviceRows

    rows = DeviceRows(limit=5)
    rows.add(np.array([3, 1]), torch.tensor([0.5, 0.25]), tag=0)
    assert not rows.full and len(rows) == 2
    rows.add(np.array([7, 8, 9]), torch.tensor([1.0, 2.0, 3.0]), tag=1)
    assert rows.full
    parts = rows.drain()
    assert [(ids.tolist(), tag, values.tolist()) for ids, tag, values in parts] == [
        ([3, 1], 0, [0.5, 0.25]), ([7, 8, 9], 1, [1.0, 2.0, 3.0])]
    assert all(isinstance(values, np.ndarray) for _, _, values in parts)
    assert rows.drain() == [] and len(rows) == 0 and not rows.full
