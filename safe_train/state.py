"""Per-sample state: one table of arrays keyed by stable sample id.

Everything a defense or callback knows about individual samples (similarities, scores, safe/risky,
dropped, how often seen) lives here as columns aligned with a sorted int64 id array, never as
per-sample Python objects, so the table scales to 10^8 samples (8 bytes per id plus the columns).
Large tables can be backed by memory-mapped ``.npy`` files.

Values observed during an epoch are *recorded* locally on each rank and merged at the epoch
boundary by :meth:`SampleTable.sync`, which exchanges every rank's records and applies them in rank
order. After a sync every rank holds identical arrays, so every decision computed from them is the
same on every rank.

Scale notes (see ``benchmarks/state_scale.py``): ids are de-duplicated by sorting, never with
``np.unique`` (numpy 2.x hashes int64 there, ~75x slower than sorting); pending observations and
records are kept in large blocks that are freed as the sync consumes them; the sync exchanges
records in bounded rounds, as table rows rather than ids, and gathers for registration only the ids
no rank's table holds yet.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from safe_train.errors import UnknownSampleError

GatherFn = Callable[[np.ndarray], list[np.ndarray]]
"""All-gathers one 1-D array from every rank; returns the arrays in rank order."""

MEMMAP_THRESHOLD = 10_000_000  # ids; above this, columns live in memory-mapped files (with a storage_dir)

SYNC_CHUNK = 1 << 22
"""Most records (summed over ranks) exchanged and applied per sync round: bounds sync's temporaries
(about 50 bytes per record in flight) independently of the table size."""

MIN_SYNC_CHUNK = 1 << 16
"""Smallest round; below it, per-round overhead (one all-gather each) dominates."""

SEEN_COMPACT = 1 << 20
"""Observed ids are sorted, de-duplicated and checked against the table every this many ids, so
ids the table already holds (every epoch after the first) never pile up until the sync."""

SORTED_LOOKUP_MIN = 1 << 15
"""From this many keys on, lookups sort the keys first: a binary search of sorted keys stays in
cache, one of random keys into 10^8 ids misses it at every step (15x slower)."""

SEARCH_SEGMENT = 1 << 18
"""Sorted keys are searched segment by segment of this many table ids (2 MiB, cache-resident)
instead of over the whole table: ~2.5x faster at 10^8 ids."""

_BLOCK = 1 << 20  # entries per pending-buffer block (8 MiB of int64): freed one by one while syncing


def _single_process_gather(array: np.ndarray) -> list[np.ndarray]:
    return [array]


# ---- sort-based id helpers --------------------------------------------------------------------
def _as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    """A 1-D int64 view of ``ids`` (no copy when it already is one)."""
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def _run_starts(sorted_ids: np.ndarray) -> np.ndarray:
    """Mask of the first element of each run of equal values in a sorted array."""
    mask = np.empty(len(sorted_ids), dtype=bool)
    if len(sorted_ids):
        mask[0] = True
        np.not_equal(sorted_ids[1:], sorted_ids[:-1], out=mask[1:])
    return mask


def unique_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    """Sorted unique int64 ids, equal to ``np.unique`` but by sorting.

    numpy 2.x's ``np.unique`` takes a hash-based path for int64 that is ~75x slower than a sort
    for millions of random ids.
    """
    a = np.sort(_as_ids(ids))
    if len(a) < 2:
        return a
    return a[_run_starts(a)]


def unique_counts(ids: Iterable[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(ids, return_counts=True)`` for int64 ids, by sorting (see :func:`unique_ids`)."""
    a = np.sort(_as_ids(ids))
    if len(a) == 0:
        return a, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(_run_starts(a))
    return a[starts], np.diff(starts, append=len(a)).astype(np.int64, copy=False)


def _compact_sorted(a: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """De-duplicate a sorted array in place (chunk by chunk, so no full-size mask or copy)."""
    n = len(a)
    if n < 2:
        return a
    write = 1
    for start in range(1, n, chunk):
        stop = min(n, start + chunk)
        # compares with the original values: writes never pass ``stop - 1`` unless nothing was dropped,
        # in which case they rewrite the same values
        kept = a[start:stop][a[start:stop] != a[start - 1:stop - 1]]
        a[write:write + len(kept)] = kept
        write += len(kept)
    return _trim(a, write)


def _trim(a: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` entries of ``a``, shrinking its allocation in place when possible (no copy)."""
    if n == len(a):
        return a
    try:
        a.resize(n, refcheck=False)
        return a
    except ValueError:  # a view, or not resizable: fall back to a copy
        return a[:n].copy()


def _member_sorted(haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """Which of the sorted ``needles`` occur in the sorted ``haystack``."""
    if len(haystack) == 0 or len(needles) == 0:
        return np.zeros(len(needles), dtype=bool)
    pos = np.minimum(np.searchsorted(haystack, needles), len(haystack) - 1)  # sorted needles: cache-friendly
    return haystack[pos] == needles


def _is_sorted(a: np.ndarray) -> bool:
    return len(a) < 2 or bool(np.all(a[1:] >= a[:-1]))


class _Buffer:
    """A growable 1-D array kept in blocks: appends never move what is stored, and :meth:`drain`
    hands blocks out one at a time so a consumer never holds the buffer twice."""

    __slots__ = ("dtype", "_blocks", "_fill", "_size")

    def __init__(self, dtype: np.dtype | type | str) -> None:
        self.dtype = np.dtype(dtype)
        self._blocks: list[np.ndarray] = []
        self._fill = 0  # used entries of the last block
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, values: np.ndarray) -> None:
        """Copy ``values`` (cast to this buffer's dtype) to the end."""
        start, n = 0, len(values)
        while start < n:
            if not self._blocks or self._fill == len(self._blocks[-1]):
                grown = 2 * len(self._blocks[-1]) if self._blocks else 0
                self._blocks.append(np.empty(min(_BLOCK, max(4096, grown, n - start)), dtype=self.dtype))
                self._fill = 0
            block = self._blocks[-1]
            take = min(n - start, len(block) - self._fill)
            block[self._fill:self._fill + take] = values[start:start + take]
            self._fill += take
            start += take
        self._size += n

    def arrays(self) -> list[np.ndarray]:
        """The stored pieces, in order (views)."""
        if not self._blocks:
            return []
        return [*self._blocks[:-1], self._blocks[-1][:self._fill]]

    def drain(self) -> Iterator[np.ndarray]:
        """Yield the pieces in order and forget them (each is freed once the consumer drops it)."""
        pieces = self.arrays()[::-1]
        self.clear()
        while pieces:
            yield pieces.pop()

    def copy_out(self) -> np.ndarray:
        """One contiguous copy of the contents (the buffer is unchanged)."""
        pieces = self.arrays()
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)

    def take_all(self) -> np.ndarray:
        """One contiguous array of the contents; the buffer is emptied block by block while copying."""
        out = np.empty(self._size, dtype=self.dtype)
        filled = 0
        for piece in self.drain():
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
        return out

    def clear(self) -> None:
        self._blocks, self._fill, self._size = [], 0, 0


def _rechunk(pieces: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Re-cut a stream of arrays into arrays of exactly ``size`` entries (the last may be shorter)."""
    held: list[np.ndarray] = []
    count = 0
    for piece in pieces:
        while len(piece):
            take = min(size - count, len(piece))
            held.append(piece[:take])
            count += take
            piece = piece[take:]
            if count == size:
                yield held[0] if len(held) == 1 else np.concatenate(held)
                held, count = [], 0
    if count:
        yield held[0] if len(held) == 1 else np.concatenate(held)


def _round_size(total: int, world: int) -> int:
    """Entries each rank sends per sync round: ~1/16 of the work per round, within the chunk bounds."""
    return max(min(SYNC_CHUNK, max(MIN_SYNC_CHUNK, total // 16)) // world, 1)


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
        self._files: dict[str, Path] = {}  # memory-mapped columns' current files
        self._generation = 0
        self._records: dict[str, tuple[_Buffer, _Buffer]] = {}
        self._seen_tail = _Buffer(np.int64)  # observed ids not yet compacted
        self._seen_done: list[np.ndarray] = []  # sorted unique observed ids the table lacked when compacted
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
        self._set_column(name, self._allocate(name, len(self.ids), np.dtype(dtype), fill))

    def has_column(self, name: str) -> bool:
        return name in self._columns

    def register(self, ids: Iterable[int] | np.ndarray) -> int:
        """Add ids not yet in the table (sorted merge); returns how many were new."""
        new = unique_ids(ids)
        if len(self.ids):
            new = new[~self._has_sorted(new)]
        self._insert(new)
        return len(new)

    def _insert(self, new: np.ndarray) -> None:
        """Merge sorted unique ids that are not in the table; every column is moved once."""
        if len(new) == 0:
            return
        if len(self.ids) == 0:
            self.ids = new
            for name, column in list(self._columns.items()):
                self._set_column(name, self._allocate(name, len(new), column.dtype, self._fill[name]))
            return
        pos = self._search_sorted(new)
        pos += np.arange(len(new))  # final row of each new id
        total = len(self.ids) + len(new)
        old = np.ones(total, dtype=bool)
        old[pos] = False
        ids = np.empty(total, dtype=np.int64)
        ids[pos] = new
        ids[old] = self.ids
        self.ids = ids
        for name in self.columns:  # one column at a time, so only one old and one new copy coexist
            column = self._columns[name]
            merged = self._empty(name, total, column.dtype)
            merged[pos] = self._fill[name]
            merged[old] = column
            del column
            self._set_column(name, merged)

    def _search_sorted(self, keys: np.ndarray) -> np.ndarray:
        """``np.searchsorted(self.ids, keys)`` for sorted ``keys``, one cache-sized segment at a time."""
        n, segment = len(self.ids), SEARCH_SEGMENT
        if n <= 2 * segment or len(keys) < 64:
            return np.searchsorted(self.ids, keys)
        # keys[bounds[j]:bounds[j + 1]] are >= ids[j * segment] and < ids[(j + 1) * segment]
        bounds = np.empty(-(-n // segment) + 1, dtype=np.intp)
        bounds[0], bounds[-1] = 0, len(keys)
        bounds[1:-1] = np.searchsorted(keys, self.ids[segment::segment])
        pos = np.empty(len(keys), dtype=np.intp)
        for j in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():
            lo, hi, base = bounds[j], bounds[j + 1], j * segment
            part = pos[lo:hi]
            part[:] = np.searchsorted(self.ids[base:base + segment], keys[lo:hi])
            part += base
        return pos

    def _has_sorted(self, keys: np.ndarray) -> np.ndarray:
        """Which of the sorted ``keys`` are in the table."""
        if len(self.ids) == 0:
            return np.zeros(len(keys), dtype=bool)
        return self.ids[np.minimum(self._search_sorted(keys), len(self.ids) - 1)] == keys

    def _lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row positions and found-mask of 1-D int64 ``ids`` (any order)."""
        n = len(self.ids)
        if n == 0:
            return np.zeros(len(ids), dtype=np.intp), np.zeros(len(ids), dtype=bool)
        if len(ids) >= SORTED_LOOKUP_MIN and not _is_sorted(ids):
            order = np.argsort(ids)
            pos = np.empty(len(ids), dtype=np.intp)
            pos[order] = self._search_sorted(ids[order])
        elif len(ids) >= SORTED_LOOKUP_MIN:
            pos = self._search_sorted(ids)
        else:
            pos = np.searchsorted(self.ids, ids)
        return pos, self.ids[np.minimum(pos, n - 1)] == ids

    def rows(self, ids: np.ndarray | Iterable[int]) -> np.ndarray:
        """Row positions of ``ids``; raises UnknownSampleError if any id is not in the table."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        pos, found = self._lookup(flat)
        if not found.all():
            unknown = flat[~found]
            raise UnknownSampleError(f"{len(unknown)} unknown sample ids, e.g. {unknown[:5].tolist()}")
        return pos.reshape(ids.shape)

    def contains(self, ids: np.ndarray | Iterable[int]) -> np.ndarray:
        """Boolean mask: which of ``ids`` are in the table."""
        ids = np.asarray(ids, dtype=np.int64)
        return self._lookup(ids.reshape(-1))[1].reshape(ids.shape)

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
        ids = _as_ids(ids)
        values = np.asarray(values).reshape(-1)
        if len(ids) != len(values):
            raise ValueError(f"record({name!r}): {len(ids)} ids but {len(values)} values")
        if name not in self._records:
            self._records[name] = (_Buffer(np.int64), _Buffer(self._columns[name].dtype))
        id_buffer, value_buffer = self._records[name]
        id_buffer.append(ids)
        value_buffer.append(values)

    def observe(self, ids: np.ndarray) -> None:
        """Note ids that reached training on this rank (registered on every rank by :meth:`sync`)."""
        self._seen_tail.append(_as_ids(ids))
        if len(self._seen_tail) >= SEEN_COMPACT:
            self._compact_seen()

    def _compact_seen(self) -> None:
        """Sort and de-duplicate the observed ids, keeping only those the table lacks."""
        if not len(self._seen_tail):
            return
        fresh = _compact_sorted(np.sort(self._seen_tail.take_all()))
        if len(self.ids):
            fresh = fresh[~self._has_sorted(fresh)]
        if len(fresh):
            self._seen_done.append(fresh)

    # ---- pending buffers (mid-epoch checkpoints) ---------------------------------------------
    def pending_state(self) -> dict[str, np.ndarray]:
        """This rank's observations and records not yet synced, as plain arrays (copies).

        Keys: ``"seen"`` (observed ids the table lacked; a set, so its order is irrelevant) and, per
        column with records, ``"rec_ids/<column>"`` and ``"rec_values/<column>"`` in arrival order.
        Pair it with the table saved at the same moment: ids already in that table may be left out.
        """
        seen = [*self._seen_done, *self._seen_tail.arrays()]
        state = {"seen": np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64)}
        for name, (id_buffer, value_buffer) in self._records.items():
            if len(id_buffer):
                state[f"rec_ids/{name}"] = id_buffer.copy_out()
                state[f"rec_values/{name}"] = value_buffer.copy_out()
        return state

    def load_pending_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace this rank's pending observations and records with :meth:`pending_state`'s output."""
        unexpected = [k for k in state if k != "seen" and not k.startswith(("rec_ids/", "rec_values/"))]
        if unexpected:
            raise ValueError(f"unexpected keys in a pending state: {unexpected}")
        for key in state:
            if key.startswith("rec_ids/") and "rec_values/" + key[len("rec_ids/"):] not in state:
                raise ValueError(f"pending state has {key!r} but no values for it")
        self._clear_pending()
        if "seen" in state:
            self.observe(np.asarray(state["seen"]))
        for key, ids in state.items():
            if key.startswith("rec_ids/"):
                name = key[len("rec_ids/"):]
                self.record(name, np.asarray(ids), np.asarray(state["rec_values/" + name]))

    def _clear_pending(self) -> None:
        self._records.clear()
        self._seen_tail.clear()
        self._seen_done.clear()

    # ---- sync --------------------------------------------------------------------------------
    def sync(self, gather: GatherFn = _single_process_gather) -> None:
        """Merge every rank's observations and records into every rank's table, deterministically.

        Each column's records are applied in rank order, and within a rank in arrival order (so
        with resampling the last value seen wins, identically everywhere). Records of ids the table
        already holds are applied first; then the ids no rank's table holds yet (observed or
        recorded) are gathered and registered; then the records of those ids are applied. Every id's
        records fall in one of the two passes, so the order per id is unchanged.
        """
        unknown: dict[str, tuple[_Buffer, _Buffer]] = {}
        for name in self.columns:
            id_buffer, value_buffer = self._records.pop(name, None) or (_Buffer(np.int64), _Buffer(np.int8))
            unknown[name] = self._exchange_records(name, id_buffer, value_buffer, gather)
        self._records.clear()
        added = self._register_everywhere(unknown, gather)
        if added:  # every rank got the same count, so every rank takes this branch
            for name, (id_buffer, value_buffer) in unknown.items():
                rest, _ = self._exchange_records(name, id_buffer, value_buffer, gather)
                if len(rest):
                    raise RuntimeError(f"sync: {len(rest)} records of column {name!r} still have unknown ids")

    def _exchange_records(self, name: str, id_buffer: _Buffer, value_buffer: _Buffer,
                          gather: GatherFn) -> tuple[_Buffer, _Buffer]:
        """Apply every rank's records of known ids to ``name`` in bounded rounds; return this rank's
        records of unknown ids (arrival order kept).

        Each rank sends its records as sorted unique table rows (its last value per id within a
        round) plus values; a per-row ``writer`` rank keeps a lower rank's later round from
        overwriting a higher rank's value.
        """
        column = self._columns[name]
        lost_ids, lost_values = _Buffer(np.int64), _Buffer(column.dtype)
        lengths = [int(n[0]) for n in gather(np.array([len(id_buffer)], dtype=np.int64))]
        world, longest = len(lengths), max(lengths)
        if longest == 0:
            return lost_ids, lost_values
        per_rank = _round_size(sum(lengths), world)
        writer = None
        if world > 1:
            writer = np.zeros(len(self.ids), dtype=np.uint8 if world < 256 else np.uint16 if world < 65536 else np.int32)
        id_chunks = _rechunk(id_buffer.drain(), per_rank)
        value_chunks = _rechunk(value_buffer.drain(), per_rank)
        no_ids, no_values = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=column.dtype)
        for _ in range(-(-longest // per_rank)):
            ids = next(id_chunks, no_ids)
            values = next(value_chunks, no_values)
            if values.dtype != column.dtype:  # only for empty placeholders
                values = values.astype(column.dtype)
            rows, row_values, lost = self._locate(ids, values)
            if lost is not None:
                lost_ids.append(ids[lost])
                lost_values.append(values[lost])
            del ids, values, lost
            all_rows, all_values = gather(rows), gather(row_values)
            del rows, row_values
            for rank, (r, v) in enumerate(zip(all_rows, all_values, strict=True)):
                if not len(r):
                    continue
                if writer is not None:
                    allowed = writer[r] <= rank
                    if not allowed.all():
                        r, v = r[allowed], v[allowed]
                    if rank:
                        writer[r] = rank
                column[r] = v
        return lost_ids, lost_values

    def _locate(self, ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Sorted unique rows of the known ``ids`` with their last value, and a mask (arrival order)
        of the unknown ones (None when all are known)."""
        row_dtype = np.uint32 if len(self.ids) < 2**32 else np.int64
        if len(ids) == 0:
            return np.zeros(0, dtype=row_dtype), values[:0], None
        order = np.argsort(ids)
        sorted_ids = ids[order]
        last = np.empty(len(ids), dtype=bool)
        last[-1] = True
        np.not_equal(sorted_ids[1:], sorted_ids[:-1], out=last[:-1])
        if not last.all():  # repeated ids: the order among equal ids decides, so sort stably
            order = np.argsort(ids, kind="stable")
        pos = self._search_sorted(sorted_ids)
        if len(self.ids):
            found = self.ids[np.minimum(pos, len(self.ids) - 1)] == sorted_ids
        else:
            found = np.zeros(len(ids), dtype=bool)
        del sorted_ids
        lost = None
        keep = last
        if not found.all():
            lost = np.ones(len(ids), dtype=bool)
            lost[order[found]] = False
            keep = last & found
        if keep.all():
            return pos.astype(row_dtype), values[order], lost
        return pos[keep].astype(row_dtype), values[order[keep]], lost

    def _register_everywhere(self, unknown: dict[str, tuple[_Buffer, _Buffer]], gather: GatherFn) -> int:
        """Register on every rank the ids any rank observed or recorded that the table lacks;
        returns how many (the same number on every rank)."""
        local = self._local_new_ids(unknown)
        lengths = [int(n[0]) for n in gather(np.array([len(local)], dtype=np.int64))]
        world, longest, total = len(lengths), max(lengths), sum(lengths)
        if total == 0:
            return 0
        if world == 1:
            new = local
        else:
            per_rank = _round_size(total, world)
            new = np.empty(total, dtype=np.int64)
            filled = 0
            for start in range(0, longest, per_rank):
                for part in gather(local[start:start + per_rank]):
                    new[filled:filled + len(part)] = part
                    filled += len(part)
            del local
            new.sort(kind="stable")  # sorted runs from every rank: timsort merges them
            new = _compact_sorted(new)
        self._insert(new)
        return len(new)

    def _local_new_ids(self, unknown: dict[str, tuple[_Buffer, _Buffer]]) -> np.ndarray:
        """Sorted unique ids this rank observed or recorded that the table lacks; empties the
        observation buffers."""
        self._compact_seen()
        pieces, self._seen_done = self._seen_done, []
        if len(pieces) > 1:
            merged = np.empty(sum(len(p) for p in pieces), dtype=np.int64)
            filled = 0
            while pieces:
                piece = pieces.pop()
                merged[filled:filled + len(piece)] = piece
                filled += len(piece)
                del piece
            merged.sort(kind="stable")  # sorted runs: timsort merges them
            seen = _compact_sorted(merged)
        else:
            seen = pieces[0] if pieces else np.zeros(0, dtype=np.int64)
        # recorded ids the table lacks (found in the first pass), minus those observed as well
        extra: list[np.ndarray] = []
        for id_buffer, _ in unknown.values():
            for chunk in _rechunk(iter(id_buffer.arrays()), SYNC_CHUNK):
                chunk = unique_ids(chunk)
                chunk = chunk[~_member_sorted(seen, chunk)]
                if len(chunk):
                    extra.append(chunk)
        if extra:
            seen = np.concatenate([seen, *extra])
            del extra
            seen.sort(kind="stable")
            seen = _compact_sorted(seen)
        if len(self.ids) and len(seen):  # ids registered since they were observed
            seen = seen[~self._has_sorted(seen)]
        return seen

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
        """Replace this table's contents with a saved table (memory-mapped when large); drops
        pending observations and records."""
        directory = Path(directory)
        meta_file = directory / "table.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"no sample table at {directory} (missing table.json)")
        meta = json.loads(meta_file.read_text())
        self.ids = np.load(directory / "ids.npy", allow_pickle=False)
        for name in list(self._columns):
            self._drop_column(name)
        self._fill = {}
        for name, info in meta["columns"].items():
            self._fill[name] = info["fill"]
            self._set_column(name, self._store(name, np.load(directory / f"col_{name}.npy", allow_pickle=False)))
        self._clear_pending()

    # ---- storage ---------------------------------------------------------------------------
    def _empty(self, name: str, n: int, dtype: np.dtype) -> np.ndarray:
        """Uninitialised storage for column ``name`` (a fresh memory-mapped file when large)."""
        if self.storage_dir is None or n < self.memmap_threshold:
            return np.empty(n, dtype=dtype)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self._generation += 1
        path = self.storage_dir / f"col_{name}.{self._generation}.npy"
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n,))

    def _allocate(self, name: str, n: int, dtype: np.dtype, fill: float | int | bool) -> np.ndarray:
        column = self._empty(name, n, dtype)
        column[...] = fill
        return column

    def _store(self, name: str, values: np.ndarray) -> np.ndarray:
        if self.storage_dir is None or len(values) < self.memmap_threshold:
            return np.ascontiguousarray(values)
        column = self._empty(name, len(values), values.dtype)
        column[:] = values
        return column

    def _set_column(self, name: str, column: np.ndarray) -> None:
        """Install a column, deleting the file of the memory-mapped one it replaces (arrays still
        referring to it stay valid: the mapping outlives the name)."""
        self._drop_column(name)
        self._columns[name] = column
        if isinstance(column, np.memmap) and column.filename is not None:
            self._files[name] = Path(column.filename)

    def _drop_column(self, name: str) -> None:
        self._columns.pop(name, None)
        path = self._files.pop(name, None)
        if path is not None:
            path.unlink(missing_ok=True)


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


class DeviceRows:
    """Per-sample values computed on the training device, kept there until :meth:`drain` moves them to the
    host in one copy: a copy per step would stall the GPU. ``full`` says when about ``limit`` rows are
    buffered, which bounds the device memory they hold."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.limit = limit
        self._parts: list[tuple[np.ndarray, Any, Any]] = []  # (ids on the host, tag, values on the device)
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def add(self, ids: np.ndarray, values: Any, tag: Any = None) -> None:
        self._parts.append((ids, tag, values))
        self._rows += len(values)

    @property
    def full(self) -> bool:
        return self._rows >= self.limit

    def drain(self) -> list[tuple[np.ndarray, Any, np.ndarray]]:
        """Every buffered part in the order it was added, its values on the host (one device-to-host copy)."""
        if not self._parts:
            return []
        import torch

        parts, self._parts, self._rows = self._parts, [], 0
        values = torch.cat([v for _, _, v in parts]).cpu().numpy()
        out, start = [], 0
        for ids, tag, part in parts:
            out.append((ids, tag, values[start:start + len(part)]))
            start += len(part)
        return out
