"""In-loop backdoor-sample detection (``--detect kdist,...``): scores from the embeddings training already computed.

Batch reference (default, the paper's setting): after every optimizer step the step's image and
caption embeddings are all-gathered on the training device (NCCL: they never leave the GPU; the row
counts go through the gloo control group), and each rank scores *its own* images against the whole
gathered batch (images and captions) and records them in the sample table (synced at the epoch end).
Each sample's score is decided by exactly one rank, so the synced table, and with it
``--detect-action drop``, is the same on every rank. No extra forward pass: the cost is the reference's
``2B x 2B`` self-join plus ``B/world x 2B`` for the own queries per step. The kNN runs on the device
(IEEE fp32, whatever OpenCLIP's TF32 switch says: ``knn.exact_fp32_matmul``); the neighbour lists and the
scores come to the host once per step (the detectors are NumPy code).

Global and auto references: each rank keeps its own share of the epoch's embeddings (CPU, float32), and at the
epoch end they are gathered to rank 0 only (``dist.gather_to_rank0``: raw bytes in bounded chunks
through the gloo control group, so no GPU memory and no full copy on the other ranks). Rank 0 scores
every sample against a random reference sample of ``--detect-reference-size`` pairs (or the whole
epoch; ``auto``: ``safe-train detect``'s default, a seeded sample of ``min(N, 32768)`` images, so the in-loop
and standalone scores of one model come from one rule) and broadcasts the scores (``dist.broadcast_array``,
again through gloo). Holding the epoch costs ``N x 2d x 4`` bytes of host memory on rank 0 (10^6 x 128: 1 GiB;
10^8: 100 GiB), which is why ``batch``, with no epoch state, is the default. Meanwhile the other
ranks wait in that gloo broadcast, not in an NCCL collective, so NCCL's watchdog sees nothing pending;
the wait is bounded by the control group's timeout (the run's ``--dist-timeout-minutes`` when the
engine passes it to ``dist.init_control_group``; torch's gloo default, 30 minutes, otherwise): size
``--detect-reference-size`` so that rank 0's scoring stays well inside it.

Embeddings: OpenCLIP's forward returns L2-normalised features. The batch and global references score
those (``l2`` on unit vectors is monotone in cosine distance). The ``auto`` reference scores the image
tower's un-normalised output, read by a forward hook on ``model.visual`` (no extra pass), as the standalone
``python -m safe_train.detect`` does: on the medium benchmark the poisons' embedding length carries most of
the signal (AUROC 0.998 standalone, 0.51 once normalised). A step whose tower output has other rows than the
step's samples falls back to the normalised features and is counted (``detect_normalised_steps``).

Columns (float32, NaN until scored): ``score_<detector>`` = the latest detection epoch's score,
``score_epoch`` = that epoch; ``score_agg`` = the sample's percentile rank of the first detector's score
aggregated over every detection epoch that scored it (rank among that epoch's scored samples, ``(average rank) /
n`` in ``(0, 1]``, ties averaged; each epoch enters with weight ``max(--detect-aggregate-recency, 1/count)``:
the plain mean at 0, an exponential moving average above, the latest epoch alone at 1, the default) and
``score_agg_count`` (int32) = how many epochs it covers. The default was chosen on validation runs
(``benchmarks/detect_aggregate.py``; BadNets, Blended and SIG at 1%, medium, seed 100: final AUROC 1.000 ±
0.000 at 1, 0.998 at 0.75, 0.932 ± 0.067 for the mean): before a backdoor is learned no epoch separates the
poisons, and averaging those epochs in only dilutes the later ones. The aggregate is updated at each detection epoch's end from the synced table, by the same arithmetic on
every rank, so it is identical everywhere and is checkpointed and resumed with the table. Below 1, one noisy
epoch moves a sample by at most that weight, not to the top. With ``--detect-action drop`` also ``dropped`` (the engine excludes those ids from later epochs) and
``drop_score`` (the ``score_agg`` that ranked them: drop takes the highest ``score_agg``, ties by id).
With ``--detect-blocklist-budget B`` rank 0 rewrites ``<run>/detection/blocklist.csv`` (``sample_id,score,
detector``: the B highest ``score_agg``, for ``--blocklist`` of a later run) after every detection epoch. Per detection epoch (rank 0):
``<run>/detection/epoch_<E>_scores.npz`` (``sample_id``, ``score`` = first detector, ``score_<name>``),
``epoch_<E>_hist.png``, ``dropped_epoch_<E>.csv``; with ``--detect-manifest`` the metrics
``detect_<name>_auroc``, ``_pr_auc``, ``_fpr95`` are logged. Samples whose embeddings are NaN/inf (a
diverging step: the whole batch with the batch reference) stay unscored and are counted in
``detect_skipped_non_finite``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from safe_train import dist
from safe_train.detection.knn import BACKENDS, faiss_available
from safe_train.detection.scores import auto_reference_scores, batch_scores, global_scores, parse_detectors
from safe_train.errors import ConfigError
from safe_train.flags import FlagConfig, check, option
from safe_train.interface import Callback, StepOutput, TrainContext
from safe_train.manifest import Manifest
from safe_train.metrics import detection_metrics
from safe_train.registry import CALLBACKS

log = logging.getLogger(__name__)


def gather_rows(x: torch.Tensor) -> tuple[np.ndarray, list[int]]:
    """All-gather a 2-D float tensor (any number of rows per rank) to the host; returns the rows in rank order
    and the per-rank row counts. (The step hook gathers on the device instead: ``dist.all_gather_rows``.)"""
    array = x.detach().float().cpu().numpy()
    width = array.shape[1]
    parts = dist.gather_arrays(array.reshape(-1))
    return np.concatenate(parts).reshape(-1, width), [len(p) // width for p in parts]


@dataclass
class DetectionConfig(FlagConfig):
    """The in-loop detector's settings (docs/detection.md); every bad combination is one ConfigError."""

    prefix: ClassVar[str] = "detect"
    group: ClassVar[str] = "safe-train in-loop detection"

    names: str | None = option(None, "Score every training sample with these detectors, comma-separated (see "
                               "`safe-train detect --help` for the registered names); from the training step's "
                               "embeddings, no extra forward pass. auto: the rate-robust score, sparse + dense + "
                               "caption-mismatch evidence.", flag="--detect", type=str, metavar="NAMES")
    reference: str = option("batch", "batch: against the gathered global batch's images and captions (the paper's "
                            "setting; no epoch state); global: at the epoch end, against the epoch's embeddings or a "
                            "random reference sample (--detect-reference-size); auto: at the epoch end, against "
                            "safe-train detect's default reference (a seeded sample of min(N, 32768) images), on the "
                            "image tower's un-normalised output as safe-train detect scores it.",
                            choices=("batch", "global", "auto"))
    k: int | None = option(None, "Neighbourhood size for every detector (default: each detector's own, kdist/slof/dao "
                           "16, lid 64).", type=int, metavar="K")
    metric: str = option("l2", "Distance between (L2-normalised, as OpenCLIP's forward returns them) embeddings.",
                         choices=("l2", "cosine"))
    backend: str = option("auto", "kNN backend. auto: the fastest exact one for this device and search size "
                          "(knn.auto_backend: torch on CUDA; faiss flat or torch on a CPU); torch; faiss.",
                          choices=BACKENDS)
    action: str = option("log", "log: record scores only; drop: exclude the top --detect-drop-fraction from later "
                         "epochs.", choices=("log", "drop"))
    drop_fraction: float | None = option(None, "With --detect-action drop: the fraction of the scored samples to drop "
                                         "(0 < F < 1).", type=float, metavar="F")
    drop_epoch: int = option(1, "Drop once, after the first detection epoch >= E (0-based; 1: the model of epoch 0 has "
                             "barely learnt anything).", metavar="E")
    every: int = option(1, "Detect in every N-th epoch (epochs N-1, 2N-1, ...).", metavar="N")
    manifest: str | None = option(None, "Poison manifest: log AUROC / PR-AUC / FPR@95 of every detector per epoch.",
                                  type=str, metavar="manifest.json")
    reference_size: int | None = option(None, "Global reference: a random sample of M pairs (default: the whole "
                                        "epoch). Keep M x poison rate below k, or poisons become each other's "
                                        "neighbours.", type=int, metavar="M")
    blocklist_budget: int | None = option(None, "After every detection epoch, write <run>/detection/blocklist.csv "
                                          "with the B samples of highest score_agg (percentile rank aggregated "
                                          "over the detection epochs so far), for --blocklist of a later run.",
                                          type=int, metavar="B")
    aggregate_recency: float = option(1.0, "Weight of the newest detection epoch in score_agg, the per-sample "
                                      "aggregate that drop and the blocklist rank by: each epoch's percentile rank "
                                      "enters with weight max(R, 1/count). 1 (default, chosen on validation runs): "
                                      "the latest detection epoch alone; 0: the plain mean over every detection "
                                      "epoch; between: an exponential moving average.", type=float, metavar="R")

    @property
    def enabled(self) -> bool:
        return self.names is not None

    @property
    def detectors(self) -> list[str]:
        return parse_detectors(self.names) if self.names else []

    def validate(self) -> None:
        if self.names is None:
            changed = [flag for flag in self.non_default() if flag not in ("--detect-metric", "--detect-backend",
                                                                           "--detect-drop-epoch", "--detect-every")]
            check(not changed, f"{', '.join(changed)} need --detect NAMES (e.g. --detect kdist)")
            return
        try:
            parse_detectors(self.names)
        except ValueError as e:
            raise ConfigError(f"--detect: {e}") from None
        check(self.k is None or self.k >= 1, f"--detect-k must be >= 1, got {self.k}")
        check(self.every >= 1, f"--detect-every must be >= 1, got {self.every}")
        if self.action == "drop":
            fraction = self.drop_fraction
            check(fraction is not None and 0 < fraction < 1,
                  f"--detect-action drop needs --detect-drop-fraction F with 0 < F < 1, got {fraction}")
        else:
            check(self.drop_fraction is None, "--detect-drop-fraction needs --detect-action drop")
        check(0.0 <= self.aggregate_recency <= 1.0,
              f"--detect-aggregate-recency must be in [0, 1], got {self.aggregate_recency}")
        check(self.blocklist_budget is None or self.blocklist_budget >= 0,
              f"--detect-blocklist-budget must be >= 0, got {self.blocklist_budget}")
        if self.reference_size is not None:
            check(self.reference == "global", "--detect-reference-size needs --detect-reference global")
            check(self.reference_size >= 2, f"--detect-reference-size must be >= 2, got {self.reference_size}")
        check(self.backend != "faiss" or faiss_available(), "--detect-backend faiss needs faiss (pip install faiss-cpu)")
        check(not self.manifest or os.path.exists(self.manifest), f"--detect-manifest: {self.manifest} not found")


@CALLBACKS.register
class DetectionCallback(Callback):
    """Scores every training sample with local outlier detectors; logs them or drops the most suspicious."""

    name = "detect"
    Config = DetectionConfig

    def __init__(self, config: DetectionConfig) -> None:
        self.config = config
        self.detectors = config.detectors
        self.reference = config.reference
        self.k = config.k
        self.metric = config.metric
        self.backend = config.backend
        self.action = config.action
        self.drop_fraction = config.drop_fraction
        self.drop_epoch = config.drop_epoch
        self.every = config.every
        self.reference_size = config.reference_size
        self.blocklist_budget = config.blocklist_budget
        self.aggregate_recency = config.aggregate_recency
        self.seed = 0
        self.manifest = Manifest.load(config.manifest) if config.manifest else None
        self.drop_done = False
        self._epoch_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.skipped_non_finite = 0  # samples of this epoch left unscored: their embeddings were NaN/inf
        self._tower_output: torch.Tensor | None = None  # the image tower's last (un-normalised) output
        self._tower_hook: Any = None
        self.unmatched_tower_steps = 0  # steps scored on the normalised features: the tower's rows did not match

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self, ctx: TrainContext) -> None:
        self.seed = int(getattr(ctx.args, "seed", 0) or 0)
        for name in self.detectors:
            ctx.table.add_column(f"score_{name}", np.float32, np.nan)
        ctx.table.add_column("score_epoch", np.int32, -1)
        ctx.table.add_column("score_agg", np.float32, np.nan)
        ctx.table.add_column("score_agg_count", np.int32, 0)
        if self.action == "drop":
            ctx.table.add_column("dropped", bool, False)
            ctx.table.add_column("drop_score", np.float32, np.nan)

    def active(self, epoch: int) -> bool:
        """Detection runs in epochs ``every-1, 2*every-1, ...`` (0-based)."""
        return (epoch + 1) % self.every == 0

    def _knn_kwargs(self, ctx: TrainContext) -> dict[str, Any]:
        return {"backend": self.backend, "device": ctx.device}

    def on_train_start(self, ctx: TrainContext) -> None:
        """``--detect-reference auto`` scores the un-normalised image embeddings, as ``safe-train detect`` does.

        OpenCLIP's forward returns L2-normalised features, and on poisoned models the embedding's length is
        much of the evidence (benchmarks/RESULTS.md: the auto score falls from 0.998 to 0.514 AUROC when the
        embeddings are normalised first). A forward hook on the image tower keeps its output, which is
        ``encode_image(normalize=False)``; no extra forward, and the training forward is unchanged."""
        if self.reference != "auto" or ctx.model is None:
            return
        model = getattr(ctx.model, "module", ctx.model)  # DDP wraps the model; the hook sits on the tower
        tower = getattr(model, "visual", None)
        if not isinstance(tower, torch.nn.Module):
            log.warning("detection: the model has no image tower `visual`; --detect-reference auto scores the "
                        "forward's normalised image features")
            return

        def keep_output(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            self._tower_output = (output[0] if isinstance(output, tuple) else output).detach()

        self._tower_hook = tower.register_forward_hook(keep_output)

    def _unnormalised_images(self, image: torch.Tensor) -> torch.Tensor:
        """The image tower's output of this step when it has the step's rows, else ``image`` (counted)."""
        raw, self._tower_output = self._tower_output, None
        if self._tower_hook is None:
            return image
        if raw is None or raw.shape != image.shape:
            if not self.unmatched_tower_steps:
                log.warning("detection: a step's image-tower output did not have one row per sample (gradient "
                            "accumulation, or a defense's extra views): such steps are scored on the forward's "
                            "normalised image features, counted in detect_normalised_steps")
            self.unmatched_tower_steps += 1
            return image
        return raw

    # ---- per step ---------------------------------------------------------------------------------
    def on_epoch_start(self, ctx: TrainContext) -> None:
        self._epoch_rows = []
        self.skipped_non_finite = 0
        self.unmatched_tower_steps = 0

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
        if self.reference != "batch":  # scored at the epoch end
            image = self._unnormalised_images(image)
            self._epoch_rows.append((ids, image.detach().float().cpu().numpy(), text.detach().float().cpu().numpy()))
            return
        with torch.no_grad():
            counts = dist.all_gather_counts(len(ids))  # gloo control group: no CUDA synchronisation
            all_image = dist.all_gather_rows(image.detach().float(), counts)  # stays on the device
            all_text = dist.all_gather_rows(text.detach().float(), counts)
            finite = bool(torch.isfinite(all_image).all() & torch.isfinite(all_text).all())  # one sync
            if not finite:  # the same on every rank: the gathered batch is
                self._skip_non_finite(len(ids), "a batch with")
                return
            start = sum(counts[: ctx.rank])
            scores = batch_scores(all_image, all_text, self.detectors, k=self.k, metric=self.metric, seed=self.seed,
                                  queries=slice(start, start + len(ids)), **self._knn_kwargs(ctx))
        for name, values in scores.items():
            ctx.table.record(f"score_{name}", ids, values.astype(np.float32))
        ctx.table.record("score_epoch", ids, np.full(len(ids), ctx.epoch, np.int32))

    # ---- per epoch -------------------------------------------------------------------------------
    def _global_epoch_scores(self, ctx: TrainContext) -> None:
        """Score the whole epoch against a reference sample on rank 0; every rank writes the same values.

        Only rank 0 ever holds the whole epoch (``dist.gather_to_rank0``); the other ranks wait for its scores
        in a gloo broadcast (see the module docstring: ``--dist-timeout-minutes`` bounds that wait)."""
        dist.init_control_group()  # a no-op once the engine made it; collective: every rank is here
        if self._epoch_rows:
            ids = np.concatenate([r[0] for r in self._epoch_rows])
            image = np.concatenate([r[1] for r in self._epoch_rows])
            text = np.concatenate([r[2] for r in self._epoch_rows])
        else:
            width = 0
            ids, image, text = np.zeros(0, np.int64), np.zeros((0, width), np.float32), np.zeros((0, width), np.float32)
        self._epoch_rows = []
        width = max(dist.all_reduce_int(image.shape[1] if len(ids) else 0, op="max"), 1)
        all_ids = dist.gather_to_rank0(ids)  # None on the other ranks: only rank 0 holds the epoch
        all_image = dist.gather_to_rank0(np.ascontiguousarray(image, np.float32).reshape(-1, width))
        all_text = dist.gather_to_rank0(np.ascontiguousarray(text, np.float32).reshape(-1, width))
        result = None
        if ctx.is_master and len(all_ids):  # rank 0 decides; the counts below are rank 0's
            # one row per id (repeats from resampling/padding: the last one wins, as in the table)
            _, last = np.unique(all_ids[::-1], return_index=True)
            keep = np.sort(len(all_ids) - 1 - last)
            finite = np.isfinite(all_image[keep]).all(1) & np.isfinite(all_text[keep]).all(1)
            self._skip_non_finite(int((~finite).sum()), "samples with")
            keep = keep[finite]
            common = dict(k=self.k, metric=self.metric, seed=self.seed, **self._knn_kwargs(ctx))
            if self.reference == "auto":  # the standalone command's default, on the same rule
                scores = auto_reference_scores(all_image[keep], all_text[keep], self.detectors, **common)
            else:
                scores = global_scores(all_image[keep], all_text[keep], self.detectors,
                                       reference_size=self.reference_size, **common)
            result = (all_ids[keep], np.stack([scores[n].astype(np.float32) for n in self.detectors], axis=1))
        del all_ids, all_image, all_text
        if ctx.is_master and result is None:
            result = (np.zeros(0, np.int64), np.zeros((0, len(self.detectors)), np.float32))
        ids = dist.broadcast_array(result[0] if ctx.is_master else None)  # the others wait here, in gloo
        matrix = dist.broadcast_array(result[1] if ctx.is_master else None)
        if not len(ids):
            return
        scores = {name: matrix[:, j] for j, name in enumerate(self.detectors)}
        ctx.table.register(ids)
        for name, values in scores.items():
            ctx.table.set(f"score_{name}", ids, values)
        ctx.table.set("score_epoch", ids, ctx.epoch)

    def on_epoch_end(self, ctx: TrainContext) -> None:
        if not self.active(ctx.epoch):
            return
        if self.reference != "batch":
            self._global_epoch_scores(ctx)
        skipped = dist.all_reduce_int(self.skipped_non_finite)  # each rank counted its own (global: rank 0 all)
        if skipped:
            ctx.log_metric("detect_skipped_non_finite", skipped)
        if self._tower_hook is not None:
            ctx.log_metric("detect_normalised_steps", dist.all_reduce_int(self.unmatched_tower_steps))
        table = ctx.table
        if not table.has_column("score_epoch") or len(table) == 0:
            return
        scored = np.asarray(table["score_epoch"]) == ctx.epoch
        ids = table.ids[scored]
        scores = {name: np.asarray(table[f"score_{name}"])[scored] for name in self.detectors}
        if len(ids):
            update_aggregate(table, ids, scores[self.detectors[0]], self.aggregate_recency)
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
            self._drop(ctx, ids, out_dir)
        if self.blocklist_budget is not None and ctx.is_master and out_dir is not None and len(ids):
            chosen, chosen_score = top_by_aggregate(table, table.ids, self.blocklist_budget)
            out_dir.mkdir(parents=True, exist_ok=True)
            write_id_scores(out_dir / "blocklist.csv", chosen, chosen_score, f"score_agg:{self.detectors[0]}")

    def _drop(self, ctx: TrainContext, ids: np.ndarray, out_dir: Path | None) -> None:
        """Mark the top fraction of this epoch's scored samples by ``score_agg`` as dropped (the same on every rank:
        the table is synced and the aggregate computed identically everywhere)."""
        table = ctx.table
        n_drop = int(round(self.drop_fraction * len(ids)))
        chosen, chosen_score = top_by_aggregate(table, ids, n_drop)
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
                         f"score_agg of {self.detectors[0]}) from later epochs")

    def state_dict(self) -> dict[str, Any]:
        """Also the epoch's embeddings so far (``--detect-reference global``): a mid-epoch checkpoint must
        let a resumed run score the whole epoch."""
        state: dict[str, Any] = {"drop_done": self.drop_done, "skipped_non_finite": self.skipped_non_finite}
        if self._epoch_rows:
            state["rows_ids"] = torch.from_numpy(np.concatenate([r[0] for r in self._epoch_rows]))
            state["rows_image"] = torch.from_numpy(np.concatenate([r[1] for r in self._epoch_rows]))
            state["rows_text"] = torch.from_numpy(np.concatenate([r[2] for r in self._epoch_rows]))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drop_done = bool(state.get("drop_done", False))
        self.skipped_non_finite = int(state.get("skipped_non_finite", 0))
        self._epoch_rows = []
        if "rows_ids" in state:
            self._epoch_rows = [(state["rows_ids"].numpy(), state["rows_image"].numpy(), state["rows_text"].numpy())]


# ---- the per-sample aggregate over detection epochs -------------------------------------------------
def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """``(average rank) / n`` in ``(0, 1]`` (1 = highest; ties share their mean rank): comparable across epochs
    whose score scales differ (a model that trains on changes every distance)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return np.zeros(0)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    ends = np.concatenate([starts[1:], [n]])
    mean_rank = (starts + ends + 1) / 2.0  # ranks 1..n; a run of ties [s, e) shares (s + 1 + e) / 2
    ranks = np.empty(n)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks / n


def fold_rank(previous: np.ndarray, count: np.ndarray, rank: np.ndarray, recency: float = 0.0) -> np.ndarray:
    """The aggregate after one more epoch: ``previous`` (over ``count`` epochs) moved towards this epoch's ``rank``
    with weight ``max(recency, 1 / (count + 1))``. ``recency`` 0 keeps the plain running mean; above it the newest
    epochs dominate, so the epochs before a backdoor is learned (where no detector separates the poisons) stop
    diluting the ones after it. Pure, elementwise; the first epoch always enters with weight 1."""
    previous = np.nan_to_num(np.asarray(previous, dtype=np.float64), nan=0.0)
    weight = np.maximum(recency, 1.0 / (np.asarray(count, dtype=np.float64) + 1.0))
    return (1.0 - weight) * previous + weight * np.asarray(rank, dtype=np.float64)


def update_aggregate(table, ids: np.ndarray, score: np.ndarray, recency: float = 0.0) -> None:
    """Fold this epoch's percentile ranks of ``score`` (finite ones only) into ``score_agg`` / ``score_agg_count``
    (:func:`fold_rank`). Pure arithmetic on the synced table: the same on every rank, and resumable from the
    two checkpointed columns alone."""
    finite = np.isfinite(score)
    ids = ids[finite]
    if not len(ids):
        return
    rank = percentile_ranks(score[finite])
    count = table.get("score_agg_count", ids).astype(np.int64)
    table.set("score_agg", ids, fold_rank(table.get("score_agg", ids), count, rank, recency).astype(np.float32))
    table.set("score_agg_count", ids, (count + 1).astype(np.int32))


def top_by_aggregate(table, ids: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` ids (of ``ids``) with the highest ``score_agg``, ties by id, and their aggregates; unscored
    (NaN) ids never count."""
    agg = table.get("score_agg", ids).astype(np.float64)
    finite = np.isfinite(agg)
    order = np.lexsort((ids[finite], -agg[finite]))[:count]
    return ids[finite][order], agg[finite][order]


# ---- outputs shared with the standalone command ---------------------------------------------------
def score_metrics(scores: dict[str, np.ndarray], is_poisoned: np.ndarray) -> dict[str, dict[str, float]]:
    """AUROC / PR-AUC / FPR@95 per detector (empty when only one class is present)."""
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
