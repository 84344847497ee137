"""In-loop backdoor-sample detection (``--detect kdist,...``): scores from the embeddings training already computed.

Batch reference (default, the paper's setting): after every optimizer step the step's image and
caption embeddings are all-gathered, every rank scores the same global batch, and each rank records
the scores of its own samples in the sample table (synced at the epoch end). No extra forward pass:
the cost is one ``2B x 2B`` distance matrix per step.

Global reference: the epoch's embeddings are kept (CPU, float32, ``N x 2d`` per process after the
gather: mind the memory at scale), and at the epoch end rank 0 scores every sample against a random
reference sample of ``--detect-reference-size`` pairs (or the whole epoch) and broadcasts the scores.

Embeddings: OpenCLIP's forward returns L2-normalised features and the norm cannot be recovered
without an extra pass or hooks into model internals, so in-loop scores use the normalised
embeddings (``l2`` on unit vectors is monotone in cosine distance). The standalone
``python -m safe_train.detect`` embeds without normalisation (``--no-normalize``), the paper's setting.

Columns (float32, NaN until scored): ``score_<detector>`` = the latest detection epoch's score,
``score_epoch`` = that epoch; with ``--detect-action drop`` also ``dropped`` (the engine excludes
those ids from later epochs) and ``drop_score``. Per detection epoch (rank 0):
``<run>/detection/epoch_<E>_scores.npz`` (``sample_id``, ``score`` = first detector, ``score_<name>``),
``epoch_<E>_hist.png``, ``dropped_epoch_<E>.csv``; with ``--detect-manifest`` the metrics
``detect_<name>_auroc``, ``_pr_auc``, ``_fpr95`` are logged. Samples whose embeddings are NaN/inf (a
diverging step: the whole batch with the batch reference) stay unscored and are counted in
``detect_skipped_non_finite``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safe_train import dist
from safe_train.detection.scores import batch_scores, global_scores, parse_detectors
from safe_train.interface import Callback, StepOutput, TrainContext

log = logging.getLogger(__name__)


def gather_rows(x: torch.Tensor) -> tuple[np.ndarray, list[int]]:
    """All-gather a 2-D float tensor (any number of rows per rank); returns the rows in rank order and the
    per-rank row counts."""
    array = x.detach().float().cpu().numpy()
    width = array.shape[1]
    parts = dist.gather_arrays(array.reshape(-1))
    return np.concatenate(parts).reshape(-1, width), [len(p) // width for p in parts]


class DetectionCallback(Callback):
    """Scores every training sample with local outlier detectors; logs them or drops the most suspicious."""

    name = "detect"

    def __init__(self, args: argparse.Namespace) -> None:
        self.detectors = parse_detectors(args.detect)
        self.reference = args.detect_reference
        self.k = args.detect_k
        self.metric = args.detect_metric
        self.backend = args.detect_backend
        self.action = args.detect_action
        self.drop_fraction = args.detect_drop_fraction
        self.drop_epoch = args.detect_drop_epoch
        self.every = max(1, args.detect_every)
        self.reference_size = args.detect_reference_size
        self.seed = int(getattr(args, "seed", 0) or 0)
        self.manifest = None
        if args.detect_manifest:
            from safe_train.manifest import Manifest

            self.manifest = Manifest.load(args.detect_manifest)
        self.drop_done = False
        self._epoch_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.skipped_non_finite = 0  # samples of this epoch left unscored: their embeddings were NaN/inf

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self, ctx: TrainContext) -> None:
        for name in self.detectors:
            ctx.table.add_column(f"score_{name}", np.float32, np.nan)
        ctx.table.add_column("score_epoch", np.int32, -1)
        if self.action == "drop":
            ctx.table.add_column("dropped", bool, False)
            ctx.table.add_column("drop_score", np.float32, np.nan)

    def active(self, epoch: int) -> bool:
        """Detection runs in epochs ``every-1, 2*every-1, ...`` (0-based)."""
        return (epoch + 1) % self.every == 0

    def _knn_kwargs(self, ctx: TrainContext) -> dict[str, Any]:
        return {"backend": self.backend, "device": ctx.device}

    # ---- per step ---------------------------------------------------------------------------------
    def on_epoch_start(self, ctx: TrainContext) -> None:
        self._epoch_rows = []
        self.skipped_non_finite = 0

    def _skip_non_finite(self, n: int, where: str) -> None:
        """Count ``n`` unscored samples (a diverging step must not stop the run from inside detection)."""
        if n and not self.skipped_non_finite:
            log.warning("detection: %s non-finite embeddings (training diverging?); those samples stay unscored "
                        "this epoch, counted in detect_skipped_non_finite", where)
        self.skipped_non_finite += n

    def on_step_end(self, ctx: TrainContext, step: StepOutput) -> None:
        if not step.pass_.train or not self.active(ctx.epoch):
            return
        image, text = step.features.get("image_features"), step.features.get("text_features")
        if image is None or text is None:
            return
        ids = step.sample_ids.cpu().numpy().astype(np.int64)
        if self.reference == "global":
            self._epoch_rows.append((ids, image.detach().float().cpu().numpy(), text.detach().float().cpu().numpy()))
            return
        all_image, counts = gather_rows(image)
        all_text, _ = gather_rows(text)
        if not (np.isfinite(all_image).all() and np.isfinite(all_text).all()):  # the same on every rank
            self._skip_non_finite(len(ids), "a batch with")
            return
        with torch.no_grad():
            scores = batch_scores(all_image, all_text, self.detectors, k=self.k, metric=self.metric, seed=self.seed,
                                  **self._knn_kwargs(ctx))
        start = sum(counts[: ctx.rank])
        own = slice(start, start + len(ids))
        for name, values in scores.items():
            ctx.table.record(f"score_{name}", ids, values[own].astype(np.float32))
        ctx.table.record("score_epoch", ids, np.full(len(ids), ctx.epoch, np.int32))

    # ---- per epoch -------------------------------------------------------------------------------
    def _global_epoch_scores(self, ctx: TrainContext) -> None:
        """Score the whole epoch against a reference sample on rank 0; every rank writes the same values."""
        if self._epoch_rows:
            ids = np.concatenate([r[0] for r in self._epoch_rows])
            image = np.concatenate([r[1] for r in self._epoch_rows])
            text = np.concatenate([r[2] for r in self._epoch_rows])
        else:
            width = 0
            ids, image, text = np.zeros(0, np.int64), np.zeros((0, width), np.float32), np.zeros((0, width), np.float32)
        self._epoch_rows = []
        all_ids = np.concatenate(dist.gather_arrays(ids))
        width = max(dist.all_reduce_int(image.shape[1] if len(ids) else 0, op="max"), 1)
        all_image = np.concatenate(dist.gather_arrays(image.reshape(-1))).reshape(-1, width)
        all_text = np.concatenate(dist.gather_arrays(text.reshape(-1))).reshape(-1, width)
        result = None
        if ctx.is_master and len(all_ids):  # rank 0 decides; the counts below are rank 0's
            # one row per id (repeats from resampling/padding: the last one wins, as in the table)
            _, last = np.unique(all_ids[::-1], return_index=True)
            keep = np.sort(len(all_ids) - 1 - last)
            finite = np.isfinite(all_image[keep]).all(1) & np.isfinite(all_text[keep]).all(1)
            self._skip_non_finite(int((~finite).sum()), "samples with")
            keep = keep[finite]
            scores = global_scores(all_image[keep], all_text[keep], self.detectors,
                                   reference_size=self.reference_size, k=self.k, metric=self.metric, seed=self.seed,
                                   **self._knn_kwargs(ctx))
            result = (all_ids[keep], {n: v.astype(np.float32) for n, v in scores.items()})
        result = dist.broadcast_object(result)
        if result is None:
            return
        ids, scores = result
        ctx.table.register(ids)
        for name, values in scores.items():
            ctx.table.set(f"score_{name}", ids, values)
        ctx.table.set("score_epoch", ids, ctx.epoch)

    def on_epoch_end(self, ctx: TrainContext) -> None:
        if not self.active(ctx.epoch):
            return
        if self.reference == "global":
            self._global_epoch_scores(ctx)
        skipped = dist.all_reduce_int(self.skipped_non_finite)  # each rank counted its own (global: rank 0 all)
        if skipped:
            ctx.log_metric("detect_skipped_non_finite", skipped)
        table = ctx.table
        if not table.has_column("score_epoch") or len(table) == 0:
            return
        scored = np.asarray(table["score_epoch"]) == ctx.epoch
        ids = table.ids[scored]
        scores = {name: np.asarray(table[f"score_{name}"])[scored] for name in self.detectors}
        out_dir = Path(ctx.run_dir) / "detection" if ctx.run_dir else None
        if ctx.is_master and out_dir is not None and len(ids):
            out_dir.mkdir(parents=True, exist_ok=True)
            primary = scores[self.detectors[0]]
            np.savez(out_dir / f"epoch_{ctx.epoch}_scores.npz", sample_id=ids, score=primary,
                     **{f"score_{n}": v for n, v in scores.items()})
            labels = self.manifest.poisoned_mask(ids) if self.manifest is not None else None
            write_histogram(out_dir / f"epoch_{ctx.epoch}_hist.png", scores, labels, title=f"epoch {ctx.epoch}")
        if self.manifest is not None and len(ids):
            for name, metrics in score_metrics(scores, self.manifest.poisoned_mask(ids)).items():
                for key, value in metrics.items():
                    ctx.log_metric(f"detect_{name}_{key}", value)
        if self.action == "drop" and not self.drop_done and ctx.epoch >= self.drop_epoch and len(ids):
            self._drop(ctx, ids, scores[self.detectors[0]], out_dir)

    def _drop(self, ctx: TrainContext, ids: np.ndarray, score: np.ndarray, out_dir: Path | None) -> None:
        """Mark the top fraction of this epoch's scored samples as dropped (same on every rank: synced table)."""
        table = ctx.table
        n_drop = int(round(self.drop_fraction * len(ids)))
        finite = np.isfinite(score)
        order = np.lexsort((ids[finite], -score[finite]))  # highest score first; ties by id
        chosen, chosen_score = ids[finite][order][:n_drop], score[finite][order][:n_drop]
        table.set("dropped", chosen, True)
        table.set("drop_score", chosen, chosen_score)
        self.drop_done = True
        ctx.log_metric("detect_dropped", len(chosen))
        if self.manifest is not None:
            hit = int(self.manifest.poisoned_mask(chosen).sum())
            ctx.log_metric("detect_dropped_poisoned", hit)
            ctx.log_metric("detect_drop_recall", hit / max(1, self.manifest.num_poisoned))
        if ctx.is_master and out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_id_scores(out_dir / f"dropped_epoch_{ctx.epoch}.csv", chosen, chosen_score, self.detectors[0])
            logging.info(f"detection: dropped {len(chosen)} of {len(ids)} samples (top {self.drop_fraction:g} by "
                         f"{self.detectors[0]}) from later epochs")

    def state_dict(self) -> dict[str, Any]:
        return {"drop_done": self.drop_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drop_done = bool(state.get("drop_done", False))


# ---- outputs shared with the standalone command ---------------------------------------------------
def score_metrics(scores: dict[str, np.ndarray], is_poisoned: np.ndarray) -> dict[str, dict[str, float]]:
    """AUROC / PR-AUC / FPR@95 per detector (empty when only one class is present)."""
    from safe_train.evaluate import detection_metrics

    is_poisoned = np.asarray(is_poisoned, dtype=bool)
    if is_poisoned.all() or not is_poisoned.any():
        return {}
    out = {}
    for name, values in scores.items():
        values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=-np.inf)
        values = np.clip(values, -np.finfo(np.float64).max, np.finfo(np.float64).max)
        m = detection_metrics(values, is_poisoned)
        out[name] = {"auroc": m["auroc"], "pr_auc": m["pr_auc"], "fpr95": m["fpr_at_95_tpr"]}
    return out


def write_id_scores(path: Path, ids: np.ndarray, scores: np.ndarray, detector: str) -> None:
    """``sample_id,score,detector`` CSV (readable by ``--blocklist`` through its ``sample_id`` column)."""
    with open(path, "w") as f:
        f.write("sample_id,score,detector\n")
        for i, s in zip(ids.tolist(), np.asarray(scores, dtype=np.float64).tolist(), strict=True):
            f.write(f"{i},{s:.8g},{detector}\n")


def write_histogram(path: Path, scores: dict[str, np.ndarray], is_poisoned: np.ndarray | None, title: str = "") -> None:
    """One panel per detector; poisoned samples in a separate colour when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3), squeeze=False)
    for ax, (name, values) in zip(axes[0], scores.items(), strict=True):
        values = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(values)
        bins = np.histogram_bin_edges(values[finite], bins=50) if finite.any() else 10
        if is_poisoned is None:
            ax.hist(values[finite], bins=bins, color="tab:blue")
        else:
            ax.hist(values[finite & ~is_poisoned], bins=bins, color="tab:blue", alpha=0.7, label="clean")
            ax.hist(values[finite & is_poisoned], bins=bins, color="tab:red", alpha=0.9, label="poisoned")
            ax.legend()
        ax.set_yscale("log")
        ax.set_title(f"{name} {title}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
