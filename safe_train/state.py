"""Per-sample state: one table of arrays keyed by stable sample id.

Everything a defense or callback knows about individual samples (similarities, scores, safe/risky,
dropped, how often seen) lives here as columns aligned with a sorted int64 id array, never as
per-sample Python objects, so the table scales to 10^8 samples (about 8 bytes per id plus the
columns). Large tables are backed by memory-mapped ``.npy`` files.

Values observed during an epoch are *recorded* locally on each rank and merged at the epoch
boundary by :meth:`SampleTable.sync`, which gathers every rank's records and applies them in rank
order. After a sync every rank holds identical arrays, so every decision computed from them is the
same on every rank.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from safe_train.errors import UnknownSampleError

GatherFn = Callable[[np.ndarray], list[np.ndarray]]
"""All-gathers one 1-D array from every rank; returns the arrays in rank order."""

MEMMAP_THRESHOLD = 10_000_000  # ids; above this, columns live in memory-mapped files


def _single_process_gather(array: np.ndarray) -> list[np.ndarray]:
    return [array]


class SampleTable:
    """Sorted sample ids plus named columns (numpy arrays of the same length).

    Args:
        storage_dir: where large columns are memory-mapped (one directory per process); None keeps
            everything in RAM.
        memmap_threshold: number of ids above which columns are memory-mapped.
    """

    def __init__(self, storage_dir: str | os.PathLike | None = None, memmap_threshold: int = MEMMAP_THRESHOLD):
        self.ids = np.zeros(0, dtype=np.int64)
        self._columns: dict[str, np.ndarray] = {}
        self._fill: dict[str, float | int | bool] = {}
        self._records: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._seen: list[np.ndarray] = []
        self.storage_dir = Path(storage_dir) if storage_dir is not None else None
        self.memmap_threshold = memmap_threshold

    # ---- structure -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def add_column(self, name: str, dtype: np.dtype | type | str, fill: float | int | bool = 0) -> None:
        """Declare a column (idempotent); new and existing rows get ``fill``."""
        if name in self._columns:
            return
        self._fill[name] = fill
        self._columns[name] = self._allocate(name, len(self.ids), np.dtype(dtype), fill)

    def has_column(self, name: str) -> bool:
        return name in self._columns

    def register(self, ids: Iterable[int] | np.ndarray) -> int:
        """Add ids not yet in the table (sorted merge); returns how many were new."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if len(self.ids):
            new = ids[~self._contains(ids)]
        else:
            new = ids
        if len(new) == 0:
            return 0
        merged = np.concatenate([self.ids, new])
        order = np.argsort(merged, kind="stable")
        self.ids = merged[order]
        for name, column in list(self._columns.items()):
            extended = np.concatenate([np.asarray(column), np.full(len(new), self._fill[name], dtype=column.dtype)])
            self._columns[name] = self._store(name, extended[order])
        return len(new)

    def rows(self, ids: np.ndarray | Iterable[int]) -> np.ndarray:
        """Row positions of ``ids``; raises UnknownSampleError if any id is not in the table."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids)
        pos_clipped = np.minimum(pos, max(len(self.ids) - 1, 0))
        if len(self.ids) == 0 or not np.array_equal(self.ids[pos_clipped], ids):
            unknown = ids if len(self.ids) == 0 else ids[self.ids[pos_clipped] != ids]
            raise UnknownSampleError(f"{len(unknown)} unknown sample ids, e.g. {unknown[:5].tolist()}")
        return pos

    def contains(self, ids: np.ndarray | Iterable[int]) -> np.ndarray:
        """Boolean mask: which of ``ids`` are in the table."""
        return self._contains(np.asarray(ids, dtype=np.int64))

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        if len(self.ids) == 0:
            return np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return self.ids[pos] == ids

    # ---- values ----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> np.ndarray:
        """The whole column, aligned with ``self.ids``."""
        return self._columns[name]

    def get(self, name: str, ids: np.ndarray | Iterable[int]) -> np.ndarray:
        return self._columns[name][self.rows(ids)]

    def set(self, name: str, ids: np.ndarray | Iterable[int], values: np.ndarray | float | int | bool) -> None:
        """Write values now, on this rank only (use :meth:`record` for values seen during an epoch)."""
        self._columns[name][self.rows(ids)] = values

    def record(self, name: str, ids: np.ndarray, values: np.ndarray) -> None:
        """Buffer per-sample values observed on this rank; applied on every rank by :meth:`sync`."""
        if name not in self._columns:
            raise KeyError(f"column {name!r} was not declared with add_column()")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        values = np.asarray(values).reshape(-1)
        if len(ids) != len(values):
            raise ValueError(f"record({name!r}): {len(ids)} ids but {len(values)} values")
        self._records.setdefault(name, []).append((ids.copy(), values.astype(self._columns[name].dtype)))

    def observe(self, ids: np.ndarray) -> None:
        """Note ids that reached training on this rank (registered on every rank by :meth:`sync`)."""
        self._seen.append(np.asarray(ids, dtype=np.int64).reshape(-1).copy())

    def sync(self, gather: GatherFn = _single_process_gather) -> None:
        """Merge every rank's observations and records into every rank's table, deterministically.

        Ids are registered first; then each column's records are applied in rank order, and within
        a rank in arrival order (so with resampling the last value seen wins, identically everywhere).
        """
        local_seen = np.unique(np.concatenate(self._seen)) if self._seen else np.zeros(0, np.int64)
        for record_list in self._records.values():
            if record_list:
                local_seen = np.union1d(local_seen, np.concatenate([ids for ids, _ in record_list]))
        all_seen = gather(local_seen)
        self.register(np.concatenate(all_seen) if all_seen else local_seen)
        for name in self.columns:
            record_list = self._records.get(name, [])
            ids = np.concatenate([r[0] for r in record_list]) if record_list else np.zeros(0, np.int64)
            dtype = self._columns[name].dtype
            values = np.concatenate([r[1] for r in record_list]) if record_list else np.zeros(0, dtype)
            gathered_ids = gather(ids)
            gathered_values = gather(values)
            for rank_ids, rank_values in zip(gathered_ids, gathered_values, strict=True):
                if len(rank_ids):
                    self._columns[name][self.rows(rank_ids)] = rank_values.astype(dtype)
        self._records.clear()
        self._seen.clear()

    # ---- persistence -----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write ids and columns as ``.npy`` files into ``directory`` (created; replaced atomically)."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        np.save(tmp / "ids.npy", self.ids)
        for name, column in self._columns.items():
            np.save(tmp / f"col_{name}.npy", np.asarray(column))
        meta = {"columns": {n: {"dtype": str(c.dtype), "fill": _jsonable(self._fill[n])} for n, c in self._columns.items()}}
        (tmp / "table.json").write_text(json.dumps(meta, indent=1))
        replace_dir(tmp, directory)

    def load(self, directory: str | os.PathLike) -> None:
        """Replace this table's contents with a saved table (memory-mapped when large)."""
        directory = Path(directory)
        meta_file = directory / "table.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"no sample table at {directory} (missing table.json)")
        meta = json.loads(meta_file.read_text())
        self.ids = np.load(directory / "ids.npy", allow_pickle=False)
        self._columns, self._fill = {}, {}
        for name, info in meta["columns"].items():
            self._fill[name] = info["fill"]
            self._columns[name] = self._store(name, np.load(directory / f"col_{name}.npy", allow_pickle=False))
        self._records.clear()
        self._seen.clear()

    # ---- storage ---------------------------------------------------------------------------
    def _allocate(self, name: str, n: int, dtype: np.dtype, fill) -> np.ndarray:
        return self._store(name, np.full(n, fill, dtype=dtype))

    def _store(self, name: str, values: np.ndarray) -> np.ndarray:
        if self.storage_dir is None or len(values) < self.memmap_threshold:
            return np.ascontiguousarray(values)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        path = self.storage_dir / f"col_{name}.npy"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=values.dtype, shape=values.shape)
        mm[:] = values
        return mm


def _jsonable(value):
    return value.item() if hasattr(value, "item") else value


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` so that a reader never sees a half-written ``dst``."""
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)
