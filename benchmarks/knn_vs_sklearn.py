"""Global k-distance: safe-train's kNN backends vs scikit-learn's brute-force NearestNeighbors, side by side.

    python benchmarks/knn_vs_sklearn.py [--n 50000] [--dim 128] [--k 16] [--threads 2] [--repeats 1]

Every method computes the same quantity, the k-distance of every point against all the others
(self excluded), on the same clustered random float32 data on the CPU; the script checks that the
results agree and prints the wall time and the CPU time of each and its speed-up over scikit-learn
(goal: >= 5x). On a shared machine the CPU-time ratio is the steadier number (other processes stretch
wall time); run with ``--threads 1`` to make CPU time a clean measure of work.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per method, round-robin (the fastest is "
                   "reported; the first call of a method also pays its one-time set-up)")
    p.add_argument("--skip-sklearn", action="store_true")
    args = p.parse_args()

    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    from safe_train.detection.knn import faiss_available, knn

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3.0, size=(100, args.dim))
    x = (centers[rng.integers(0, 100, args.n)] + rng.normal(size=(args.n, args.dim))).astype(np.float32)
    k = args.k

    def torch_kdist() -> np.ndarray:
        d, _ = knn(x, x, k, exclude_self=True, backend="torch")
        return d[:, -1].numpy()

    def faiss_kdist(index: str) -> np.ndarray:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        d, _ = knn(x, x, k, exclude_self=True, backend="faiss", index=index, nprobe=16)
        return d[:, -1].numpy()

    def sklearn_kdist() -> np.ndarray:
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", n_jobs=args.threads).fit(x)
        dist, idx = nn.kneighbors(x)
        # drop each point itself (normally column 0; by index, so duplicates are handled)
        own = idx == np.arange(len(x))[:, None]
        own[~own.any(1), -1] = True
        return dist[~own].reshape(len(x), k)[:, -1]

    methods = {"torch (exact, tiled)": torch_kdist}
    if faiss_available():
        methods["faiss flat (exact)"] = lambda: faiss_kdist("flat")
        methods["faiss ivf (approx.)"] = lambda: faiss_kdist("ivf")
    if not args.skip_sklearn:
        methods["sklearn brute"] = sklearn_kdist

    print(f"global k-distance, N={args.n} d={args.dim} k={k}, {args.threads} thread(s), float32, CPU")
    times = {name: float("inf") for name in methods}
    cpu_times = dict(times)
    results = {}
    with threadpool_limits(limits=args.threads):
        for _ in range(args.repeats):  # round-robin, so load changes on a shared machine hit every method
            for name, fn in methods.items():
                t, c = time.perf_counter(), time.process_time()
                results[name] = fn()
                times[name] = min(times[name], time.perf_counter() - t)
                cpu_times[name] = min(cpu_times[name], time.process_time() - c)
                print(f"  {name:24s} wall {time.perf_counter() - t:8.2f} s   cpu {time.process_time() - c:8.2f} s",
                      flush=True)
    print("\nbest of", args.repeats)
    for name in methods:
        print(f"  {name:24s} wall {times[name]:8.2f} s   cpu {cpu_times[name]:8.2f} s")
    ref_name = "sklearn brute" if "sklearn brute" in results else "torch (exact, tiled)"
    ref = results[ref_name]
    print(f"\nagreement with {ref_name} (max relative difference of the k-distance; IVF: mean, approximate):")
    for name, values in results.items():
        rel = np.abs(values - ref) / np.maximum(ref, 1e-12)
        print(f"  {name:24s} max {rel.max():.2e}  mean {rel.mean():.2e}")
    if "sklearn brute" in times:
        print("\nspeed-up over sklearn brute (goal >= 5x):")
        for name, t in times.items():
            if name != "sklearn brute":
                print(f"  {name:24s} wall {times['sklearn brute'] / t:6.2f}x   "
                      f"cpu {cpu_times['sklearn brute'] / cpu_times[name]:6.2f}x")


if __name__ == "__main__":
    main()
