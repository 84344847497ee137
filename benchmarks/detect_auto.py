"""Detection AUROC of the rate-robust ``auto`` default against the paper's setting and global kdist/slof/dao.

    python benchmarks/detect_auto.py --runs /work/bench_medium/runs --cache /work/exp16/emb \\
        [--emulate 10,30] [--backend faiss] [--out detect_auto.json]
    python benchmarks/detect_auto.py --summarize res_*.json      # mean ± SE over seeds, a Markdown table

For every ``none`` run under ``--runs`` whose ``params.txt`` names a poisoned training CSV (its manifest beside
it), it embeds the training set once with the run's last checkpoint (``safe_train.detect.embed``: eval mode,
un-normalised, the standalone command's view; cached as ``<cache>/<run>.npz``) and scores it with

- ``auto``: the default of ``safe-train detect`` (``--reference auto``: images only, ``min(N, 32768)`` pairs);
- ``paper-slof`` / ``paper-dao``: random batches of 1,024 pairs (images + captions), k = 16;
- ``global-kdist`` / ``global-slof`` / ``global-dao``: the whole set (images + captions), k = 16.

``--emulate 10,30``: also, for runs with more poisons than that, keep only a seeded random 10 (30) of the
poisons' embeddings and drop the rest. This EMULATES a low poison count under a model that learned the
trigger from all of them; it is not a run trained at that rate.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from safe_train.bench_stats import mean_se  # noqa: E402
from safe_train.detect import auto_reference_size  # noqa: E402
from safe_train.detection.callback import score_metrics  # noqa: E402
from safe_train.detection.scores import global_scores, partitioned_scores  # noqa: E402


def _params(run: Path) -> dict[str, str]:
    pairs = (line.split(": ", 1) for line in (run / "params.txt").read_text().splitlines() if ": " in line)
    return {key: value.strip() for key, value in pairs}


def embeddings(run: Path, cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, images, captions) of the run's training set, embedded once and cached."""
    cached = cache / f"{run.name}.npz"
    if not cached.exists():
        from safe_train.detect import build_parser, embed

        params = _params(run)
        checkpoint = sorted((run / "checkpoints").glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))[-1]
        args = build_parser().parse_args(["--model", params["model"], "--checkpoint", str(checkpoint),
                                          "--train-data", params["train_data"], "--dataset-type", "csv",
                                          "--out", str(cache), "--device", "cpu"])
        ids, image, text = embed(args)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(cached, ids=ids, image=image, text=text)
    data = np.load(cached)
    return data["ids"], data["image"].astype(np.float32), data["text"].astype(np.float32)


def score_all(image: np.ndarray, text: np.ndarray, backend: str) -> dict[str, np.ndarray]:
    """Every compared setting's scores (higher = more suspicious)."""
    knn = {"backend": backend, "seed": 0}
    out = {"auto": global_scores(image, text, ["auto"], reference_size=auto_reference_size(len(image)),
                                 with_text=False, **knn)["auto"]}
    paper = partitioned_scores(image, text, ["slof", "dao"], batch_size=1024, k=16, **knn)
    out.update({f"paper-{name}": values for name, values in paper.items()})
    whole = global_scores(image, text, ["kdist", "slof", "dao"], k=16, **knn)
    out.update({f"global-{name}": values for name, values in whole.items()})
    return out


_RUN = re.compile(r"(?P<scale>[a-z]+)-(?P<split>test|val)-(?P<attack>.+)-rate(?P<rate>[0-9.e-]+)-none-seed(?P<seed>\d+)")


def summarize(results: list[dict], cells: Path | None = None,
              settings: tuple[str, ...] = ("auto", "paper-slof", "paper-dao", "global-kdist")) -> str:
    """One Markdown row per (attack, rate): each setting's AUROC as mean ± SE over the seeds (SE = sample
    standard deviation / sqrt(n); "—" with one seed), and how many seeds reach 0.98; with ``cells`` (the bench's
    cell folder) also the `none` run's mean ASR, which says whether the goal applies (learned: ASR >= 80%).
    Emulated cases are left out."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for result in results:
        match = _RUN.fullmatch(result["run"])
        if match is None or result.get("emulated_poisons") is not None:
            continue
        groups[(match["attack"], float(match["rate"]))].append(result)
    lines = ["| attack | rate | seeds | `none` ASR | " + " | ".join(f"{s} AUROC" for s in settings)
             + " | auto ≥ 0.98 |", "|---|---:|---:|---:|" + "---:|" * len(settings) + "---:|"]
    for (attack, rate), members in sorted(groups.items()):
        cells_text = []
        for setting in settings:
            mean, se = mean_se(m["metrics"][setting]["auroc"] for m in members)
            cells_text.append(f"{mean:.3f} ± {'—' if np.isnan(se) else f'{se:.3f}'}")
        passed = sum(m["metrics"]["auto"]["auroc"] >= 0.98 for m in members)
        asr = [json.loads(path.read_text())["asr"] for m in members
               if cells is not None and (path := cells / f"{m['run']}.json").exists()]
        shown = f"{100 * np.mean(asr):.1f}%" if len(asr) == len(members) else "—"
        lines.append(f"| {attack} | {100 * rate:g}% | {len(members)} | {shown} | " + " | ".join(cells_text)
                     + f" | {passed} of {len(members)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--summarize", nargs="+", type=Path, metavar="RESULTS_JSON",
                   help="Only print the mean ± SE table of earlier --out files (one per run or several).")
    p.add_argument("--cells", type=Path, help="With --summarize: the bench's cells/ folder, for `none`'s ASR.")
    p.add_argument("--runs", type=Path)
    p.add_argument("--cache", type=Path)
    p.add_argument("--only", default=None, help="Comma-separated run names (default: every `none` run).")
    p.add_argument("--emulate", default="", help="Comma-separated poison counts to emulate by subsampling.")
    p.add_argument("--backend", default="torch", choices=("torch", "faiss"))
    p.add_argument("--out", default=None, type=Path)
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize([r for path in args.summarize for r in json.loads(path.read_text())], args.cells))
        return 0
    if args.runs is None or args.cache is None:
        p.error("--runs and --cache are required (or --summarize)")
    runs = sorted(r for r in args.runs.iterdir() if r.is_dir() and "-none-" in r.name and (r / "params.txt").exists())
    if args.only:
        runs = [r for r in runs if r.name in args.only.split(",")]
    results = []
    for run in runs:
        manifest = json.loads(Path(_params(run)["train_data"]).with_name("manifest.json").read_text())
        ids, image, text = embeddings(run, args.cache)
        poisoned = np.isin(ids, manifest["poisoned_ids"])
        cases = [(None, np.ones(len(ids), bool))]
        for count in (int(c) for c in args.emulate.split(",") if c):
            if count < poisoned.sum():
                drop = np.random.default_rng(0).choice(np.flatnonzero(poisoned), poisoned.sum() - count, replace=False)
                keep = np.ones(len(ids), bool)
                keep[drop] = False
                cases.append((count, keep))
        for count, keep in cases:
            metrics = score_metrics(score_all(image[keep], text[keep], args.backend), poisoned[keep])
            label = run.name + ("" if count is None else f" [EMULATED: {count} of {int(poisoned.sum())} poisons kept]")
            results.append({"run": run.name, "emulated_poisons": count, "num_samples": int(keep.sum()),
                            "num_poisoned": int(poisoned[keep].sum()), "metrics": metrics})
            print(label, flush=True)
            for name, m in metrics.items():
                print(f"  {name:13s} AUROC {m['auroc']:.4f}  PR-AUC {m['pr_auc']:.4f}  FPR@95 {m['fpr95']:.4f}",
                      flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
