"""Global k-distance: safe-train's kNN backends vs scikit-learn's brute-force NearestNeighbors, side by side.

    python benchmarks/knn_vs_sklearn.py [--n 50000] [--dim 128] [--k 16] [--threads 2] [--repeats 2]

Every method computes the same quantity, the k nearest neighbours of every point among all the others
(self excluded, by index), on the same clustered random float32 data on the CPU. The script prints the
wall time and the CPU time of each and its speed-up over scikit-learn (goal: >= 5x), and checks every
method against the exact answer: a float64 brute force for ``--check`` random query rows (max absolute
error of the k distances, recall of the neighbour sets). On a shared machine the CPU-time ratio is the
steadier number (other processes stretch wall time); run with ``--threads 1`` to make CPU time a clean
measure of work. The ``auto`` row is ``knn``'s default backend; its label names what
``knn.auto_backend`` resolved to for this search on this CPU (a fixed rule, no timing).
"""

from __future__ import annotations

import argparse
import os
import platform
import time


def cpu_name() -> str:
    """The CPU's model name (as ``lscpu`` prints it), so that every figure names its machine."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per method, round-robin (the fastest is "
                   "reported; the first call of a method also pays its one-time set-up)")
    p.add_argument("--check", type=int, default=2000, help="query rows checked against float64 brute force")
    p.add_argument("--skip-sklearn", action="store_true")
    args = p.parse_args()
    # before any OpenMP runtime starts: idle worker threads sleep instead of spinning. On a shared,
    # oversubscribed machine spinning threads burn CPU time waiting for descheduled peers (measured:
    # 10x longer runs with 2 threads); set OMP_WAIT_POLICY yourself to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    # deferred: torch and numpy start their OpenMP runtimes on import, so they load after the line above
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    from safe_train.detection.knn import amx_is_available, auto_backend, bf16_is_fast, faiss_available, knn

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3.0, size=(100, args.dim))
    x = (centers[rng.integers(0, 100, args.n)] + rng.normal(size=(args.n, args.dim))).astype(np.float32)
    k = args.k

    def torch_knn(precision: str, backend: str = "torch"):
        d, i = knn(x, x, k, exclude_self=True, backend=backend, precision=precision)
        return d.numpy(), i.numpy()

    def faiss_knn(index: str):
        import faiss  # deferred: optional; only imported when faiss_available() listed it

        faiss.omp_set_num_threads(args.threads)
        d, i = knn(x, x, k, exclude_self=True, backend="faiss", index=index, nprobe=16)
        return d.numpy(), i.numpy()

    def sklearn_knn():
        from sklearn.neighbors import NearestNeighbors  # deferred: skipped with --skip-sklearn

        nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", n_jobs=args.threads).fit(x)
        dist, idx = nn.kneighbors(x)
        # drop each point itself (normally column 0; by index, so duplicates are handled)
        own = idx == np.arange(len(x))[:, None]
        own[~own.any(1), -1] = True
        return dist[~own].reshape(len(x), k), idx[~own].reshape(len(x), k)

    resolved = dict(zip(("backend", "precision"), auto_backend(args.n, args.n, args.dim, "cpu", self_join=True),
                        strict=True))
    auto_name = "auto: " + ("faiss flat" if resolved["backend"] == "faiss" else f"torch {resolved['precision']}")
    methods = {auto_name: lambda: torch_knn("auto", backend="auto"),
               "torch fp32 (exact)": lambda: torch_knn("fp32"),
               "torch bf16+rerank (exact)": lambda: torch_knn("bf16")}
    if faiss_available():
        methods["faiss flat (exact)"] = lambda: faiss_knn("flat")
        methods["faiss ivf (approx.)"] = lambda: faiss_knn("ivf")
    if not args.skip_sklearn:
        methods["sklearn brute"] = sklearn_knn

    print(f"global kNN (k-distance), N={args.n} d={args.dim} k={k}, {args.threads} thread(s), float32, CPU "
          f"{cpu_name()!r} (native bf16: {bf16_is_fast('cpu')}, AMX: {amx_is_available('cpu')}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']})\n"
          f"auto (knn's default backend) resolves to backend={resolved['backend']!r}, "
          f"precision={resolved['precision']!r} for {args.n} x {args.n} pairs here")
    times = {name: float("inf") for name in methods}
    cpu_times = dict(times)
    results = {}
    with threadpool_limits(limits=args.threads):
        for _ in range(args.repeats):  # round-robin, so load changes on a shared machine hit every method
            for name, fn in methods.items():
                t, c = time.perf_counter(), time.process_time()
                results[name] = fn()
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                times[name], cpu_times[name] = min(times[name], wall), min(cpu_times[name], cpu)
                print(f"  {name:26s} wall {wall:8.2f} s   cpu {cpu:8.2f} s", flush=True)

    # the exact answer for a random sample of query rows: float64, difference form, self excluded by index
    rows = np.sort(rng.choice(args.n, min(args.check, args.n), replace=False))
    xd = torch.from_numpy(x).double()
    d2 = torch.cdist(xd[rows], xd, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    d2[torch.arange(len(rows)), torch.from_numpy(rows)] = float("inf")
    exact_d2, exact_i = torch.topk(d2, k, dim=1, largest=False)
    exact_d, exact_i = exact_d2.sqrt().numpy(), exact_i.numpy()

    base = "sklearn brute" if "sklearn brute" in times else "torch fp32 (exact)"
    print(f"\nbest of {args.repeats}; speed-up over {base} (goal >= 5x); check on {len(rows)} rows vs float64 "
          "brute force")
    print(f"  {'method':26s} {'wall s':>8s} {'cpu s':>8s} {'x wall':>7s} {'x cpu':>7s} {'max |dd|':>9s} "
          f"{'max |dd|/d':>10s} {'recall':>8s}")
    for name in methods:
        d, i = results[name]
        err = np.abs(d[rows].astype(np.float64) - exact_d)
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(i[rows], exact_i, strict=True)])
        print(f"  {name:26s} {times[name]:8.2f} {cpu_times[name]:8.2f} {times[base] / times[name]:6.2f}x "
              f"{cpu_times[base] / cpu_times[name]:6.2f}x {err.max():9.2e} {(err / exact_d).max():10.2e} "
              f"{recall:8.5f}")
    others = [name for name in methods if name.endswith("(exact)")]  # auto runs one of these
    fastest = min(others, key=cpu_times.__getitem__)
    print(f"\nfastest explicit exact method by CPU time: {fastest} ({cpu_times[fastest]:.2f} s); {auto_name} took "
          f"{cpu_times[auto_name] / cpu_times[fastest]:.2f}x its CPU time and {times[auto_name] / times[fastest]:.2f}x "
          f"its wall time (CPU: {cpu_name()})")


if __name__ == "__main__":
    main()
