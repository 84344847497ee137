"""SampleTable: the one home of per-sample state."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from safe_train.state import SampleTable, UnknownSampleError


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
