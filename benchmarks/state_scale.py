"""How per-sample state (:class:`safe_train.state.SampleTable`) scales to 10^7-10^8 sample ids.

Each measurement runs in a fresh subprocess, so peak RSS belongs to that measurement alone (the
peak is reset through ``/proc/self/clear_refs`` right before the timed part). "B/sample beyond
columns" = (peak RSS - the interpreter's RSS after imports - the columns' bytes) / N: the sorted
ids, pending buffers and sync temporaries a rank holds per sample.

    python benchmarks/state_scale.py                 # 10^6, 10^7, 10^8 (as far as --max-n)
    python benchmarks/state_scale.py --max-n 1e7     # larger N: linear extrapolation is printed
    python benchmarks/state_scale.py --quick         # 10^6 only

Writes its output to ``benchmarks/results/state_scale.txt`` as well.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL_SECONDS = 60.0
GOAL_BYTES = 24.0
BATCH = 4096  # ids per observe/record call, as a training step hands them over


# ---- memory probes ------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Make VmHWM restart from the current RSS (Linux ``clear_refs`` 5), to measure one phase."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def _random_ids(n: int, seed: int = 0) -> np.ndarray:
    """n distinct random 63-bit ids (drawn with a margin, de-duplicated, shuffled)."""
    from safe_train.state import unique_ids

    rng = np.random.default_rng(seed)
    ids = unique_ids(rng.integers(0, 2**63 - 1, n + n // 1000 + 16, dtype=np.int64))[:n]
    rng.shuffle(ids)
    return ids


# ---- one measurement per subprocess -------------------------------------------------------------
def measure_register(n: int) -> dict:
    """First registration: every id observed once (in batches), then one sync."""
    from safe_train.state import SampleTable

    base = _status_kib("VmRSS") * 1024
    ids = _random_ids(n)
    table = SampleTable()
    table.add_column("similarity", np.float32, np.nan)
    start = time.perf_counter()
    for i in range(0, n, BATCH):
        table.observe(ids[i:i + BATCH])
    observe_s = time.perf_counter() - start
    del ids
    _reset_peak()
    start = time.perf_counter()
    table.sync()
    seconds = time.perf_counter() - start
    assert len(table) == n
    return {"seconds": seconds, "peak": _peak_bytes(), "base": base, "column_bytes": 4 * n,
            "note": f"observe calls {observe_s:.1f} s"}


def _registered_table(n: int):
    from safe_train.state import SampleTable

    ids = _random_ids(n)
    table = SampleTable()
    table.add_column("similarity", np.float32, np.nan)
    table.register(ids)
    return table, ids


def measure_record(n: int) -> dict:
    """One epoch's values: a float32 recorded for every id (shuffled order, in batches), then sync."""
    base = _status_kib("VmRSS") * 1024
    table, ids = _registered_table(n)
    values = np.random.default_rng(1).random(n, dtype=np.float32)
    start = time.perf_counter()
    for i in range(0, n, BATCH):
        table.record("similarity", ids[i:i + BATCH], values[i:i + BATCH])
    record_s = time.perf_counter() - start
    check = ids[:1000].copy(), values[:1000].copy()
    del ids, values
    _reset_peak()
    start = time.perf_counter()
    table.sync()
    seconds = time.perf_counter() - start
    np.testing.assert_array_equal(table.get("similarity", check[0]), check[1])
    return {"seconds": seconds, "peak": _peak_bytes(), "base": base, "column_bytes": 4 * n,
            "note": f"record calls {record_s:.1f} s"}


def measure_split(n: int) -> dict:
    """SafeCLIP's split, the real function: GMM fit (subsample) + posteriors + safe set, twice
    (the first split thresholds the posterior, later ones take the top ratio)."""
    from safe_train.defenses.safeclip import SafeClip
    from safe_train.interface import TrainContext

    base = _status_kib("VmRSS") * 1024
    table, ids = _registered_table(n)
    del ids
    for name, dtype, fill in (("safe_posterior", np.float32, np.nan), ("safe", bool, False)):
        table.add_column(name, dtype, fill)
    rng = np.random.default_rng(2)
    poisoned = rng.random(n) < 0.01
    similarity = table["similarity"]
    similarity[:] = rng.normal(0.3, 0.05, n).astype(np.float32)
    similarity[poisoned] = rng.normal(0.05, 0.03, int(poisoned.sum())).astype(np.float32)
    del poisoned
    args = argparse.Namespace(epochs=100, seed=0, rank=0, world_size=1)
    ctx = TrainContext(args=args, table=table)
    defense = SafeClip()
    _reset_peak()
    start = time.perf_counter()
    defense.split(ctx, 2)
    first = time.perf_counter() - start
    start = time.perf_counter()
    defense.split(ctx, 3)
    second = time.perf_counter() - start
    return {"seconds": first + second, "peak": _peak_bytes(), "base": base, "column_bytes": 9 * n,
            "note": f"threshold split {first:.1f} s + top-r split {second:.1f} s"}


def measure_saveload(n: int) -> dict:
    """Sidecar: save the table (ids + one float column) and load it into a fresh table."""
    from safe_train.state import SampleTable

    base = _status_kib("VmRSS") * 1024
    table, ids = _registered_table(n)
    del ids
    with tempfile.TemporaryDirectory(dir=os.environ.get("STATE_SCALE_TMP")) as tmp:
        start = time.perf_counter()
        table.save(Path(tmp) / "table")
        save_s = time.perf_counter() - start
        del table
        _reset_peak()
        start = time.perf_counter()
        loaded = SampleTable()
        loaded.load(Path(tmp) / "table")
        load_s = time.perf_counter() - start
        assert len(loaded) == n
    return {"seconds": save_s + load_s, "peak": _peak_bytes(), "base": base, "column_bytes": 4 * n,
            "note": f"save {save_s:.1f} s + load {load_s:.1f} s (peak: load)"}


def _rank_worker(rank: int, world: int, port: int, n: int, kind: str, out: str) -> None:
    """One gloo rank: the same table on both ranks; each observes/records its half of the ids."""
    import torch.distributed as tdist

    from safe_train import dist
    from safe_train.state import SampleTable

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    base = _status_kib("VmRSS") * 1024
    ids = _random_ids(n)
    mine = ids[rank::world]
    if kind == "register":
        table = SampleTable()
        table.add_column("similarity", np.float32, np.nan)
        del ids
        for i in range(0, len(mine), BATCH):
            table.observe(mine[i:i + BATCH])
    else:
        table = SampleTable()
        table.add_column("similarity", np.float32, np.nan)
        table.register(ids)
        del ids
        values = np.full(len(mine), rank + 1, dtype=np.float32)
        for i in range(0, len(mine), BATCH):
            table.record("similarity", mine[i:i + BATCH], values[i:i + BATCH])
        del values
    del mine
    tdist.barrier()
    _reset_peak()
    start = time.perf_counter()
    table.sync(dist.gather_arrays)
    seconds = time.perf_counter() - start
    peak = _peak_bytes()
    assert len(table) == n
    if kind == "record":
        assert float(np.nansum(table["similarity"])) > 0
    Path(f"{out}.{rank}").write_text(json.dumps({"seconds": seconds, "peak": peak, "base": base}))
    tdist.destroy_process_group()


def measure_ranks(n: int, kind: str) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank")
        mp.spawn(_rank_worker, args=(2, port, n, kind, out), nprocs=2, join=True)
        results = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    worst = max(results, key=lambda r: r["peak"] - r["base"])
    return {"seconds": max(r["seconds"] for r in results), "peak": worst["peak"], "base": worst["base"],
            "column_bytes": 4 * n, "note": "slowest rank's time, largest rank's peak"}


def measure_unique(n: int) -> dict:
    """np.unique (numpy 2.x: hash-based for int64) against the sort-based helper, same input."""
    from safe_train.state import unique_ids

    ids = np.random.default_rng(3).integers(0, 2**63 - 1, n, dtype=np.int64)
    start = time.perf_counter()
    expected = np.unique(ids)
    numpy_s = time.perf_counter() - start
    start = time.perf_counter()
    got = unique_ids(ids)
    ours_s = time.perf_counter() - start
    assert np.array_equal(expected, got)
    return {"numpy": numpy_s, "ours": ours_s}


def measure_topr(n: int) -> dict:
    """SafeCLIP's top-r step: a stable descending argsort (before) against the partition-based
    ``top_count_mask`` (now), same posteriors (float32, with ties), same mask."""
    from safe_train.defenses.safeclip import top_count_mask

    posterior = np.round(np.random.default_rng(4).random(n, dtype=np.float32), 4)  # GMM posteriors tie often
    count = int(0.85 * n)
    start = time.perf_counter()
    expected = np.zeros(n, dtype=bool)
    expected[np.argsort(-posterior, kind="stable")[:count]] = True
    sort_s = time.perf_counter() - start
    start = time.perf_counter()
    got = top_count_mask(posterior, count)
    ours_s = time.perf_counter() - start
    assert np.array_equal(expected, got)
    return {"argsort": sort_s, "ours": ours_s}


MEASURES = {"register": measure_register, "topr": measure_topr, "record": measure_record, "split": measure_split,
            "saveload": measure_saveload, "unique": measure_unique,
            "register2": lambda n: measure_ranks(n, "register"), "record2": lambda n: measure_ranks(n, "record")}

STEPS = [  # (key, label, ranks, goal in seconds or None)
    ("register", "(1) registration: observe + sync", 1, GOAL_SECONDS),
    ("register2", "(1) registration: observe + sync", 2, GOAL_SECONDS),
    ("record", "(2) record 1 float column + sync", 1, GOAL_SECONDS),
    ("record2", "(2) record 1 float column + sync", 2, GOAL_SECONDS),
    ("split", "(3) SafeCLIP split (GMM + posteriors + safe set)", 1, None),
    ("saveload", "(4) sidecar save + load", 1, None),
]


# ---- driver ---------------------------------------------------------------------------------------
def _run_child(key: str, n: int, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--child", key, "--n", str(n)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-n", type=float, default=1e8, help="largest number of ids measured (default 1e8)")
    parser.add_argument("--max-n-ranks", type=float, default=1e7, help="largest N for the 2-rank gloo runs")
    parser.add_argument("--quick", action="store_true", help="10^6 ids only (and a small unique comparison)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "state_scale.txt"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(MEASURES[args.child](args.n)))
        return 0

    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    sizes = [10**6] if args.quick else [n for n in (10**6, 10**7, 10**8) if n <= args.max_n]
    emit(f"safe-train SampleTable scale benchmark — {time.strftime('%Y-%m-%d %H:%M')}")
    emit(f"CPU: {cpu_model()}, {os.cpu_count()} cores; numpy {np.__version__}; python {sys.version.split()[0]}; "
         f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    emit(f"command: python benchmarks/state_scale.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    emit()
    def side_by_side(title: str, key: str, before: tuple[str, str], ns: list[int]) -> None:
        """One child per N: the old way (``before``: result key, label) against ours, and their ratio."""
        emit(title)
        for n in ns:
            r = _run_child(key, n, args.timeout)
            if "error" in r:
                emit(f"  {n:>12,d}: failed: {r['error']}")
            else:
                emit(f"  {n:>12,d}: {before[1]} {r[before[0]]:8.2f} s   ours {r['ours']:6.2f} s   "
                     f"({r[before[0]] / max(r['ours'], 1e-9):.0f}x)")
        emit()

    side_by_side("np.unique vs sort-based unique_ids (random int64):", "unique", ("numpy", "np.unique"),
                 [2 * 10**6] if args.quick else [2 * 10**6, 2 * 10**7])
    side_by_side("SafeCLIP top-r (85% of N): stable argsort vs partition-based top_count_mask (same mask):", "topr",
                 ("argsort", "argsort"),
                 [10**6] if args.quick else [n for n in (10**6, 10**7, 10**8) if n <= args.max_n])
    header = (f"{'step':<50} {'ranks':>5} {'N':>12} {'seconds':>8} {'peak RSS':>9} {'B/sample':>9} "
              f"{'time/goal':>9} {'mem/goal':>8}  note")
    emit(header)
    emit("-" * len(header))
    largest: dict[str, tuple[int, dict]] = {}
    for key, label, ranks, goal in STEPS:
        for n in sizes:
            if ranks > 1 and n > args.max_n_ranks:
                continue
            r = _run_child(key, n, args.timeout)
            if "error" in r:
                emit(f"{label:<50} {ranks:>5} {n:>12,d}  failed: {r['error']}")
                continue
            per_sample = (r["peak"] - r["base"] - r["column_bytes"]) / n
            time_ratio = f"{r['seconds'] / goal:.2f}" if goal else "-"
            emit(f"{label:<50} {ranks:>5} {n:>12,d} {r['seconds']:>8.2f} {r['peak'] / 2**30:>7.2f}Gi "
                 f"{per_sample:>9.1f} {time_ratio:>9} {per_sample / GOAL_BYTES:>8.2f}  {r.get('note', '')}")
            largest[key] = (n, r)
    target = 10**8
    extrapolated = [(key, label, ranks, goal) for key, label, ranks, goal in STEPS
                    if key in largest and largest[key][0] < target]
    if extrapolated:
        emit()
        emit("linear extrapolation to 10^8 ids from the largest N measured:")
        for key, label, ranks, goal in extrapolated:
            n, r = largest[key]
            seconds = r["seconds"] * target / n
            ratio = f" ({seconds / goal:.2f} of the goal)" if goal else ""
            emit(f"  {label:<50} ranks {ranks}: ~{seconds:.0f} s{ratio}, from N={n:,d}")
    emit()
    emit(f"goals: sync of 10^8 ids <= {GOAL_SECONDS:.0f} s; registration of 10^8 ids <= {GOAL_SECONDS:.0f} s; "
         f"<= {GOAL_BYTES:.0f} B/sample per rank beyond the columns' own bytes")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    print(f"(written to {output})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
