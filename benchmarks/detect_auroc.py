"""Detection AUROC on poisoned `none` checkpoints of the offline benchmark, every detector x reference setting.

    python benchmarks/detect_auroc.py --bench-out bench_out/main [--epochs 20] [--repeats 5]

For every finished `none` run under ``<bench-out>/runs`` (or every run under ``--runs DIR`` whose
``params.txt`` names a poisoned training CSV, e.g. `none` runs made with in-loop detection) it embeds the run's training set
once with the final checkpoint (``safe_train.detect.embed``: eval mode, un-normalised projected
embeddings, the paper's setting) and scores it with every detector under these references:

- ``batch-B``: random batches of B pairs (images + captions), the paper's setting, averaged over
  ``--repeats`` random partitions (B = 256 and 1024);
- ``global``: the whole training set;
- ``global-M``: a random reference sample of M pairs (M = 400: M x 1% = 4 poisons < k), averaged over
  ``--repeats`` samples.

It prints one AUROC table per run and the best (detector, reference) per run, and writes
``detect_auroc.json``. The poison manifest is found from the run's training CSV (it sits beside it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DETECTORS = ["kdist", "slof", "dao", "lid", "iforest", "clip"]
REFERENCES = {"batch-256": ("batch", 256), "batch-1024": ("batch", 1024), "global": ("global", None),
              "global-400": ("global", 400)}


def _train_csv(run_dir: Path) -> Path | None:
    params = run_dir / "params.txt"
    if not params.exists():
        return None
    match = re.search(r"^train_data: (.+)$", params.read_text(), flags=re.M)
    return Path(match.group(1).strip()) if match else None


def evaluate_run(run_dir: Path, checkpoint: Path, train_csv: Path, repeats: int, threads: int) -> dict:
    from safe_train.detect import build_parser, embed
    from safe_train.detection.callback import score_metrics
    from safe_train.detection.scores import global_scores, partitioned_scores
    from safe_train.manifest import Manifest

    manifest = Manifest.load(train_csv.parent / "manifest.json")
    args = build_parser().parse_args([
        "--model", "st-tiny-vit", "--checkpoint", str(checkpoint), "--train-data", str(train_csv),
        "--dataset-type", "csv", "--csv-img-key", "filepath", "--csv-caption-key", "title", "--out", str(run_dir),
        "--workers", "0"])
    ids, image, text = embed(args)
    labels = manifest.poisoned_mask(ids)
    table: dict[str, dict[str, float]] = {}
    for name, (kind, size) in REFERENCES.items():
        if kind == "batch":
            scores = partitioned_scores(image, text, DETECTORS, batch_size=size, repeats=repeats, seed=0)
        else:
            scores = global_scores(image, text, DETECTORS, reference_size=size, repeats=repeats, seed=0)
        table[name] = {det: m["auroc"] for det, m in score_metrics(scores, labels).items()}
    return {"run": run_dir.name, "checkpoint": str(checkpoint), "num_samples": int(len(ids)),
            "num_poisoned": int(labels.sum()), "auroc": table}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench-out", default="bench_out/main")
    p.add_argument("--runs", default=None, help="directory of run folders (default: <bench-out>/runs)")
    p.add_argument("--epochs", type=int, default=20, help="the checkpoint epoch to score")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--match", default="", help="only runs whose name contains this")
    opts = p.parse_args(argv)
    import torch

    torch.set_num_threads(opts.threads)
    runs_dir = Path(opts.runs or Path(opts.bench_out) / "runs")
    results = []
    for run_dir in sorted(d for d in runs_dir.iterdir() if d.is_dir() and opts.match in d.name):
        checkpoint = run_dir / "checkpoints" / f"epoch_{opts.epochs}.pt"
        train_csv = _train_csv(run_dir)
        if not checkpoint.exists() or train_csv is None or not (train_csv.parent / "manifest.json").exists():
            continue
        if opts.runs is None and "-none-e" not in run_dir.name:  # the benchmark's `none` rows only
            continue
        result = evaluate_run(run_dir, checkpoint, train_csv, opts.repeats, opts.threads)
        results.append(result)
        print(f"\n{result['run']} ({result['num_poisoned']} of {result['num_samples']} poisoned), AUROC:")
        print(f"  {'reference':<11}" + "".join(f"{d:>9}" for d in DETECTORS))
        for ref, row in result["auroc"].items():
            print(f"  {ref:<11}" + "".join(f"{row.get(d, float('nan')):>9.3f}" for d in DETECTORS))
        best = max(((v, d, r) for r, row in result["auroc"].items() for d, v in row.items()))
        print(f"  best: {best[1]} / {best[2]} = {best[0]:.3f} (goal >= 0.98: {'met' if best[0] >= 0.98 else 'NOT met'})",
              flush=True)
    if not results:
        raise SystemExit(f"no finished none runs with a manifest under {runs_dir}")
    out = Path(opts.bench_out) / "detect_auroc.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
