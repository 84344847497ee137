"""Which ``--detect-aggregate-recency`` to ship: the in-loop aggregate ``score_agg`` replayed offline.

    python benchmarks/detect_aggregate.py RUN [RUN ...] [--recency 0,0.25,0.5,0.75,1] [--json out.json]

Each RUN is a training run with in-loop detection (``--detect ...``; its per-epoch
``detection/epoch_<E>_scores.npz``) whose ``params.txt`` names a poisoned training CSV with its ``manifest.json``
beside it (every ``safe-train bench`` run with a ``--row`` that adds ``--detect``). The script folds the saved
per-epoch scores into ``score_agg`` with the callback's own functions (``percentile_ranks``, ``fold_rank``) for
every recency R, so each R costs no training run, and prints per run:

- the AUROC of each epoch's own score (the first detector's, what ``score_agg`` aggregates);
- for each R, the AUROC of ``score_agg`` after every epoch (what ``drop`` at that epoch and the blocklist
  written then would rank by).

The choice, printed last: the R with the highest mean over the runs of the final ``score_agg``'s AUROC; R within
0.001 of the best count as tied and the smallest of them wins (more epochs averaged: less exposed to one noisy
epoch). Run it on validation runs only (``--split validation``): the choice must not see the test split.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from safe_train.bench_stats import mean_se  # noqa: E402
from safe_train.detection.callback import fold_rank, percentile_ranks, score_metrics  # noqa: E402

TIE = 1e-3


def _poisoned_ids(run: Path) -> np.ndarray:
    params = dict(line.split(": ", 1) for line in (run / "params.txt").read_text().splitlines() if ": " in line)
    manifest = Path(params["train_data"].strip()).with_name("manifest.json")
    return np.asarray(json.loads(manifest.read_text())["poisoned_ids"], dtype=np.int64)


def epoch_scores(run: Path) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(epoch, sample ids, first detector's score) of every detection epoch the run saved, in epoch order."""
    found = []
    for path in (run / "detection").glob("epoch_*_scores.npz"):
        match = re.fullmatch(r"epoch_(\d+)_scores", path.stem)
        if match:
            data = np.load(path)
            found.append((int(match.group(1)), data["sample_id"].astype(np.int64), data["score"].astype(np.float64)))
    if not found:
        raise SystemExit(f"{run}: no detection/epoch_<E>_scores.npz (train it with --detect)")
    return sorted(found, key=lambda item: item[0])


def replay(epochs: list[tuple[int, np.ndarray, np.ndarray]], recency: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """``score_agg`` after each epoch, as the callback computes it: (ids scored so far, their aggregate)."""
    universe = np.unique(np.concatenate([ids for _, ids, _ in epochs]))
    agg = np.full(len(universe), np.nan)
    count = np.zeros(len(universe), dtype=np.int64)
    after = []
    for _, ids, score in epochs:
        finite = np.isfinite(score)
        at = np.searchsorted(universe, ids[finite])
        agg[at] = fold_rank(agg[at], count[at], percentile_ranks(score[finite]), recency)
        count[at] += 1
        seen = count > 0
        after.append((universe[seen], agg[seen].copy()))
    return after


def auroc(ids: np.ndarray, score: np.ndarray, poisoned: np.ndarray) -> float:
    metrics = score_metrics({"s": score}, np.isin(ids, poisoned))
    return metrics["s"]["auroc"] if metrics else float("nan")


def evaluate(run: Path, recencies: list[float]) -> dict:
    poisoned = _poisoned_ids(run)
    epochs = epoch_scores(run)
    result = {"run": run.name, "epochs": [e for e, _, _ in epochs],
              "epoch_auroc": [auroc(ids, score, poisoned) for _, ids, score in epochs], "aggregate": {}}
    for recency in recencies:
        result["aggregate"][f"{recency:g}"] = [auroc(ids, agg, poisoned) for ids, agg in replay(epochs, recency)]
    return result


def choose(results: list[dict], recencies: list[float]) -> tuple[float, dict[str, float]]:
    """The documented rule above: best mean final AUROC, ties (within ``TIE``) to the smallest recency."""
    means = {f"{r:g}": float(np.mean([res["aggregate"][f"{r:g}"][-1] for res in results])) for r in recencies}
    best = max(means.values())
    return min(r for r in recencies if means[f"{r:g}"] >= best - TIE), means


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--recency", default="0,0.25,0.5,0.75,1",
                        help="Comma-separated --detect-aggregate-recency values to replay (default %(default)s).")
    parser.add_argument("--json", type=Path, help="Also write every figure here.")
    opts = parser.parse_args(argv)
    try:
        recencies = sorted({float(r) for r in opts.recency.split(",")})
    except ValueError:
        parser.error(f"--recency must be comma-separated numbers, got {opts.recency!r}")
    if not all(0.0 <= r <= 1.0 for r in recencies):
        parser.error(f"--recency values must lie in [0, 1], got {opts.recency!r}")
    results = [evaluate(run, recencies) for run in opts.runs]
    for res in results:
        print(f"\n{res['run']}\n")
        print("| score | " + " | ".join(f"epoch {e}" for e in res["epochs"]) + " |")
        print("|---|" + "---:|" * len(res["epochs"]))
        print("| that epoch | " + " | ".join(f"{a:.3f}" for a in res["epoch_auroc"]) + " |")
        for key, values in res["aggregate"].items():
            print(f"| score_agg, R = {key} | " + " | ".join(f"{a:.3f}" for a in values) + " |")
    chosen, means = choose(results, recencies)
    print(f"\nfinal score_agg AUROC over {len(results)} run(s), mean ± SE:")
    for r in recencies:
        mean, se = mean_se([res["aggregate"][f"{r:g}"][-1] for res in results])
        print(f"  R = {r:g}: {mean:.3f}" + (f" ± {se:.3f}" if np.isfinite(se) else " (one run)"))
    print(f"chosen --detect-aggregate-recency: {chosen:g} (best mean final AUROC; ties within {TIE:g} to the smallest)")
    if opts.json:
        opts.json.write_text(json.dumps({"runs": results, "means": means, "chosen": chosen}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
