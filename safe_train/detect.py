"""Standalone poison detection: embed a training set with a trained checkpoint, score, write a blocklist.

    python -m safe_train.detect --model st-tiny-vit --checkpoint run/checkpoints/epoch_20.pt \
        --train-data train.csv --dataset-type csv --out det/ [--blocklist-budget 500] [--manifest manifest.json]

Default (``--detectors auto --reference auto``): the rate-robust ``auto`` score (sparse, abnormally dense and
caption-mismatch evidence; ``safe_train.detection.detectors.AutoDetector``) of every image against a random
sample of ``min(N, AUTO_REFERENCE_PAIRS)`` images (no captions: templated captions are near-duplicates of each
other and blur the density estimate), seeded. Without ``--top-fraction`` / ``--threshold`` /
``--blocklist-budget`` the blocklist holds the samples whose ``auto`` score exceeds ``sqrt(2 ln m)`` (``m``
reference points: about the largest value a clean set of that size reaches; high precision, low recall).

Writes into ``--out``: ``scores.npz`` (``sample_id``, ``score`` = first detector, ``score_<name>``),
``scores.csv``, ``blocklist.txt`` (one sample id per line: ``python -m safe_train.main --blocklist``),
``report.json`` (settings, timings, and AUROC / PR-AUC / FPR@95 per detector with ``--manifest``) and
``hist.png``. Sample ids are the ones training uses (CSV data row; webdataset shard/key hash).

Embeddings are the projected image/text embeddings WITHOUT L2 normalisation by default (the paper's
setting; ``--normalize`` for unit vectors), from the model in eval mode with the validation transform.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate
from tqdm import tqdm

from safe_train import openclip as oc
from safe_train.data import (
    ApplyTransform,
    CountingHandler,
    IdCsvDataset,
    OpenClipTransform,
    SkipCounter,
    attach_id,
)
from safe_train.detection.callback import score_metrics, write_histogram
from safe_train.detection.detectors import auto_tau
from safe_train.detection.knn import BACKENDS, faiss_available
from safe_train.detection.scores import (  # noqa: F401 (AUTO_REFERENCE_PAIRS, auto_reference_size: re-exported)
    AUTO_REFERENCE_PAIRS,
    auto_reference_scores,
    auto_reference_size,
    global_scores,
    parse_detectors,
    partitioned_scores,
)
from safe_train.errors import DetectError, SafeTrainError, report
from safe_train.evaluate import input_dtype, load_model, precision_context
from safe_train.manifest import Manifest
from safe_train.registry import DETECTORS

PROG = "safe-train detect"

log = logging.getLogger("safe_train.detect")

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m safe_train.detect", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", required=True, help="OpenCLIP model config (safe-train's st-* configs included).")
    p.add_argument("--checkpoint", required=True, help="Training checkpoint (loaded with weights_only=True).")
    p.add_argument("--train-data", required=True, help="CSV file or webdataset shards ('dir/{00000..00009}.tar').")
    p.add_argument("--dataset-type", default="auto", choices=("auto", "csv", "webdataset"),
                   help="auto: webdataset if the path ends in .tar or contains '{', else csv.")
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--csv-separator", default="\t")
    p.add_argument("--out", required=True, help="Output directory (created).")
    p.add_argument("--detectors", default="auto", help=f"Comma-separated: {', '.join(DETECTORS)}. The first one "
                   "decides the blocklist. Default auto: the rate-robust score (docs/detection.md).")
    p.add_argument("--reference", default="auto", choices=("auto", "batch", "global"),
                   help="auto: global, images only, a random sample of min(N, 32768) pairs; "
                        "batch: each sample against a random batch's images+captions (the paper's setting); "
                        "global: against the whole dataset or a random sample of --reference-size pairs.")
    p.add_argument("--k", type=int, default=None, help="Neighbourhood size for all detectors (default: kdist/slof/dao "
                   "16, lid 64).")
    p.add_argument("--metric", default="l2", choices=("l2", "cosine"))
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings first (training's view).")
    p.add_argument("--image-only", action="store_true",
                   help="Reference set of image embeddings only (default: images and captions).")
    p.add_argument("--reference-batch-size", type=int, default=1024,
                   help="Batch mode: the size of the random batches (the paper: its global batch, 2048).")
    p.add_argument("--reference-size", type=int, default=None,
                   help="Global mode: a random reference sample of this many pairs (default: all). Keep it "
                        "below k / poison rate.")
    p.add_argument("--repeats", type=int, default=1,
                   help="Average the scores over this many random batch partitions / reference samples.")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="kNN backend. auto: the fastest exact one for this device and search size "
                        "(knn.auto_backend: torch on CUDA; faiss flat or torch on a CPU); torch; faiss "
                        "(--index/--nlist/--nprobe apply to it only). Default: %(default)s.")
    p.add_argument("--index", default="flat", choices=("flat", "ivf"), help="faiss index type.")
    p.add_argument("--nlist", type=int, default=None, help="faiss IVF lists (default sqrt(N)).")
    p.add_argument("--nprobe", type=int, default=8, help="faiss IVF lists visited per query.")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--top-fraction", type=float, default=None, help="Blocklist the top F of the samples.")
    sel.add_argument("--threshold", type=float, default=None, help="Blocklist samples with score > T.")
    sel.add_argument("--blocklist-budget", type=int, default=None, metavar="B",
                     help="Blocklist the B samples with the highest scores (ties by id). Default, with none of "
                          "these three: auto's score > sqrt(2 ln m) (m reference points); else nothing.")
    p.add_argument("--manifest", default=None, help="Poison manifest: report detection metrics.")
    p.add_argument("--batch-size", type=int, default=256, help="Embedding batch size.")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--image-mean", type=float, nargs=3, default=None)
    p.add_argument("--image-std", type=float, nargs=3, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


def _check(args: argparse.Namespace) -> list[str]:
    try:
        detectors = parse_detectors(args.detectors)
    except ValueError as e:
        raise DetectError(f"--detectors: {e}") from None
    if args.k is not None and args.k < 1:
        raise DetectError(f"--k must be >= 1, got {args.k}")
    if args.top_fraction is not None and not 0 < args.top_fraction < 1:
        raise DetectError(f"--top-fraction must be in (0, 1), got {args.top_fraction}")
    if args.blocklist_budget is not None and args.blocklist_budget < 0:
        raise DetectError(f"--blocklist-budget must be >= 0, got {args.blocklist_budget}")
    for name in ("reference_batch_size", "repeats", "batch_size"):
        if getattr(args, name) < 1:
            raise DetectError(f"--{name.replace('_', '-')} must be >= 1")
    if args.reference_size is not None and args.reference != "global":
        raise DetectError("--reference-size needs --reference global")
    if args.reference_size is not None and args.reference_size < 2:
        raise DetectError("--reference-size must be >= 2")
    if not Path(args.checkpoint).is_file():
        raise DetectError(f"checkpoint not found: {args.checkpoint}")
    if args.manifest and not Path(args.manifest).exists():
        raise DetectError(f"manifest not found: {args.manifest}")
    if args.dataset_type == "auto":
        args.dataset_type = "webdataset" if (".tar" in args.train_data or "{" in args.train_data) else "csv"
    if args.dataset_type == "csv" and not Path(args.train_data).is_file():
        raise DetectError(f"training data not found: {args.train_data}")
    if args.backend == "faiss" and not faiss_available():
        raise DetectError("--backend faiss needs faiss (pip install faiss-cpu)")
    return detectors


def _loader(args: argparse.Namespace, transform):
    """Batches of {image, text, sample_id}, every sample once, with training's sample ids."""
    counter = SkipCounter()
    if args.dataset_type == "csv":
        dataset = IdCsvDataset(args.train_data, transform, args.csv_img_key, args.csv_caption_key,
                               args.csv_separator, counter)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                            collate_fn=default_collate)
        return loader, len(dataset), counter
    wds = oc.wds
    handler = CountingHandler(counter)
    urls = oc.expand_urls(args.train_data)[0]
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if missing:
        raise DetectError(f"{len(missing)} shard(s) not found, e.g. {missing[0]}")
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_worker, oc.tarfile_to_samples_nothrow,
        wds.select(oc.filter_no_caption_or_no_image), wds.map(attach_id),
        wds.decode("pilrgb", handler=handler), wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map(ApplyTransform(transform, handler), handler=handler),
        wds.batched(args.batch_size, partial=True, collation_fn=default_collate))
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=args.workers)
    total = oc.get_dataset_size(args.train_data)[0]
    return loader, total, counter


@torch.no_grad()
def embed(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample ids, image embeddings, text embeddings) of every readable sample, in data order, ids unique."""
    model, preprocess, tokenizer = load_model(args.model, args.checkpoint, device=args.device,
                                              precision=args.precision, image_mean=args.image_mean,
                                              image_std=args.image_std)
    loader, total, counter = _loader(args, OpenClipTransform(preprocess, tokenizer))
    dtype = input_dtype(args.precision)
    ids, images, texts = [], [], []
    with tqdm(total=total, desc="embedding", unit="sample", file=sys.stderr, mininterval=2) as bar:
        for batch in loader:
            with precision_context(args.precision, args.device):
                img = model.encode_image(batch["image"].to(args.device, dtype=dtype), normalize=args.normalize)
                txt = model.encode_text(batch["text"].to(args.device), normalize=args.normalize)
            ids.append(batch["sample_id"].numpy().astype(np.int64))
            images.append(img.float().cpu().numpy())
            texts.append(txt.float().cpu().numpy())
            bar.update(len(ids[-1]))
    if not ids:
        raise DetectError(f"no readable samples in {args.train_data}")
    all_ids = np.concatenate(ids)
    _, first = np.unique(all_ids, return_index=True)  # unreadable images are replaced by a neighbour's row
    keep = np.sort(first)
    if counter.value:
        log.warning(f"{counter.value} unreadable sample(s) skipped")
    return all_ids[keep], np.concatenate(images)[keep], np.concatenate(texts)[keep]


def score(args: argparse.Namespace, detectors: list[str], image: np.ndarray, text: np.ndarray) -> dict[str, np.ndarray]:
    knn_kwargs = {"backend": args.backend, "device": args.device}
    if args.backend == "faiss":
        knn_kwargs.update(index=args.index, nlist=args.nlist, nprobe=args.nprobe)
    common = dict(k=args.k, metric=args.metric, with_text=not args.image_only, seed=args.seed, repeats=args.repeats,
                  **knn_kwargs)
    if args.reference == "batch":
        return partitioned_scores(image, text, detectors, batch_size=args.reference_batch_size, **common)
    if args.reference == "auto":
        del common["with_text"]
        return auto_reference_scores(image, text, detectors, **common)
    return global_scores(image, text, detectors, reference_size=args.reference_size, **common)


def default_threshold(args: argparse.Namespace, detectors: list[str], n: int) -> float | None:
    """The blocklist threshold without a selection flag: ``sqrt(2 ln m)`` for ``auto`` (``m`` reference points);
    None (an empty blocklist, as before) for the other detectors, whose scales have no such landmark."""
    if detectors[0] != "auto":
        return None
    if args.reference == "batch":
        m = min(n, args.reference_batch_size) * (1 if args.image_only else 2)
    else:
        size = auto_reference_size(n) if args.reference == "auto" else min(n, args.reference_size or n)
        m = size * (1 if args.image_only or args.reference == "auto" else 2)
    return auto_tau(m)


def select_blocklist(ids: np.ndarray, values: np.ndarray, top_fraction: float | None,
                     threshold: float | None, budget: int | None = None) -> np.ndarray:
    """Ids to block: the top fraction or the top ``budget`` (highest scores; ties by id), or those above a
    threshold."""
    if threshold is not None:
        return np.sort(ids[values > threshold])
    if top_fraction is None and budget is None:
        return np.zeros(0, np.int64)
    count = budget if budget is not None else int(round(top_fraction * len(ids)))
    order = np.lexsort((ids, -np.nan_to_num(values, nan=-np.inf)))
    return np.sort(ids[order[:count]])


def run(args: argparse.Namespace) -> dict:
    detectors = _check(args)
    manifest = None
    if args.manifest:
        manifest = Manifest.load(args.manifest)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    ids, image, text = embed(args)
    embed_s = time.time() - started
    broken = ~(np.isfinite(image).all(axis=1) & np.isfinite(text).all(axis=1))
    if broken.any():
        raise DetectError(f"{int(broken.sum())} of {len(ids)} samples have non-finite embeddings (first sample ids: "
                          f"{ids[broken][:5].tolist()}): the checkpoint's weights are NaN/inf or --precision "
                          f"overflows; nothing was scored")
    started = time.time()
    scores = score(args, detectors, image, text)
    score_s = time.time() - started
    primary = scores[detectors[0]]
    np.savez(out / "scores.npz", sample_id=ids, score=primary, **{f"score_{n}": v for n, v in scores.items()})
    with open(out / "scores.csv", "w") as f:
        f.write(",".join(["sample_id", *detectors]) + "\n")
        for row, sid in enumerate(ids.tolist()):
            f.write(",".join([str(sid), *(f"{scores[n][row]:.8g}" for n in detectors)]) + "\n")
    threshold = args.threshold
    if threshold is None and args.top_fraction is None and args.blocklist_budget is None:
        threshold = default_threshold(args, detectors, len(ids))
    blocked = select_blocklist(ids, primary, args.top_fraction, threshold, args.blocklist_budget)
    with open(out / "blocklist.txt", "w") as f:
        f.write(f"# {len(blocked)} sample ids flagged by {detectors[0]} ({args.reference} reference)\n")
        f.writelines(f"{i}\n" for i in blocked.tolist())
    labels = manifest.poisoned_mask(ids) if manifest is not None else None
    write_histogram(out / "hist.png", scores, labels, title=f"({args.reference})")
    result = {
        "checkpoint": str(args.checkpoint), "model": args.model, "train_data": str(args.train_data),
        "num_samples": int(len(ids)), "detectors": detectors, "reference": args.reference, "k": args.k,
        "metric": args.metric, "normalize": args.normalize, "image_only": args.image_only,
        "reference_batch_size": args.reference_batch_size if args.reference == "batch" else None,
        "reference_size": auto_reference_size(len(ids)) if args.reference == "auto" else args.reference_size,
        "repeats": args.repeats, "backend": args.backend,
        "embed_seconds": round(embed_s, 3), "score_seconds": round(score_s, 3),
        "blocklist": {"file": str(out / "blocklist.txt"), "count": int(len(blocked)),
                      "top_fraction": args.top_fraction, "threshold": threshold, "budget": args.blocklist_budget},
    }
    if manifest is not None:
        result["num_poisoned"] = int(labels.sum())
        result["metrics"] = score_metrics(scores, labels)
        result["blocklist"]["poisoned"] = int(manifest.poisoned_mask(blocked).sum())
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s")
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (SafeTrainError, FileNotFoundError) as e:  # FileNotFoundError: e.g. a missing image or manifest
        return report(e, PROG)
    summary = ", ".join(f"{n} AUROC {m['auroc']:.4f}" for n, m in result.get("metrics", {}).items())
    print(f"scored {result['num_samples']} samples in {result['score_seconds']:.1f}s "
          f"(embedding {result['embed_seconds']:.1f}s); blocklist: {result['blocklist']['count']} ids"
          + (f"; {summary}" if summary else "") + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
