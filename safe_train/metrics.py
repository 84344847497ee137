"""The evaluation metrics as pure functions of predictions, features and scores (no model, no data loading).

Top-k accuracy, attack success rate (the spec's definition: only test images whose true class is not the
target count), targeted-poisoning success, retrieval recall@k, and detection AUROC / PR-AUC / FPR@95.
:mod:`safe_train.evaluate` runs models and re-exports these.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def topk_accuracy(preds_topk: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of samples whose true label is among the first ``k`` predictions."""
    preds_topk, labels = torch.as_tensor(preds_topk), torch.as_tensor(labels)
    if preds_topk.ndim == 1:
        preds_topk = preds_topk[:, None]
    if k > preds_topk.shape[1]:
        raise ValueError(f"top-{k} needs at least {k} predictions per sample, got {preds_topk.shape[1]}")
    if len(labels) == 0:
        raise ValueError("no samples")
    return (preds_topk[:, :k] == labels[:, None]).any(dim=1).sum().item() / len(labels)


def attack_success_rate(top1_preds: torch.Tensor, labels: torch.Tensor, target_index: int) -> float:
    """Fraction predicted ``target_index`` among samples whose TRUE label is not the target.

    Target-class images are excluded from numerator and denominator: predicting "target" for them
    is correct behaviour, not evidence of a backdoor.
    """
    top1_preds, labels = torch.as_tensor(top1_preds), torch.as_tensor(labels)
    if top1_preds.ndim == 2:
        top1_preds = top1_preds[:, 0]
    keep = labels != target_index
    if not keep.any():
        raise ValueError("ASR is undefined: every sample belongs to the target class")
    return (top1_preds[keep] == target_index).sum().item() / int(keep.sum())


def targeted_success(top1_preds: torch.Tensor, target_indices: torch.Tensor | Sequence[int]) -> float:
    """Targeted poisoning: fraction of targeted images whose top-1 is their own target class."""
    top1_preds, target_indices = torch.as_tensor(top1_preds), torch.as_tensor(target_indices)
    if top1_preds.ndim == 2:
        top1_preds = top1_preds[:, 0]
    if len(target_indices) == 0 or len(top1_preds) != len(target_indices):
        raise ValueError("need one target per targeted image (and at least one image)")
    return (top1_preds == target_indices).sum().item() / len(target_indices)


def _recall_at_k(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 1024) -> float:
    """Fraction of queries ``i`` whose own key ``i`` ranks among the first ``k`` keys (ties: lower index first)."""
    n = len(queries)
    index = torch.arange(n)
    hits = 0
    for start in range(0, n, chunk):  # chunks keep the similarity matrix at [chunk, n]
        own = index[start : start + chunk]
        sims = queries[own] @ keys.T
        correct = sims[torch.arange(len(own)), own][:, None]
        ahead = (sims > correct) | ((sims == correct) & (index[None, :] < own[:, None]))
        hits += int((ahead.sum(dim=1) < k).sum())
    return hits / n


def retrieval_recall_at_k(
    image_features: torch.Tensor | np.ndarray, text_features: torch.Tensor | np.ndarray, k: int = 1
) -> dict[str, float | int]:
    """Image→text and text→image recall@k of paired embeddings: pair ``i`` is image ``i`` with caption ``i``.

    Features ``[N, D]`` need not be normalised (they are L2-normalised here, in float64); similarity is
    the cosine. Image ``i`` scores a hit when caption ``i`` is among its ``k`` most similar captions, and
    the other way round. Ties are broken deterministically by index: a candidate with exactly the same
    similarity as the true partner ranks ahead of it when its index is lower, so a collapsed model (all
    embeddings equal) scores ``k / N``, not 1. Returns ``image_to_text_r{k}``, ``text_to_image_r{k}``,
    ``retrieval_r{k}`` (their mean, the benchmark's single retrieval figure) and ``n_pairs``.
    """
    images = torch.as_tensor(np.asarray(image_features) if not torch.is_tensor(image_features) else image_features)
    texts = torch.as_tensor(np.asarray(text_features) if not torch.is_tensor(text_features) else text_features)
    images, texts = images.detach().cpu().double(), texts.detach().cpu().double()
    if images.ndim != 2 or images.shape != texts.shape:
        raise ValueError(
            f"image features {tuple(images.shape)} and text features {tuple(texts.shape)} must both be "
            "[N, D] with the same N (pair i = image i with caption i) and D"
        )
    if len(images) == 0:
        raise ValueError("no pairs")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not (torch.isfinite(images).all() and torch.isfinite(texts).all()):
        raise ValueError("features contain NaN or infinity")
    images = torch.nn.functional.normalize(images, dim=-1)
    texts = torch.nn.functional.normalize(texts, dim=-1)
    i2t, t2i = _recall_at_k(images, texts, k), _recall_at_k(texts, images, k)
    return {
        f"image_to_text_r{k}": i2t,
        f"text_to_image_r{k}": t2i,
        f"retrieval_r{k}": (i2t + t2i) / 2,
        "n_pairs": len(images),
    }


def detection_metrics(scores: Sequence[float] | np.ndarray, is_poisoned: Sequence[bool] | np.ndarray) -> dict:
    """AUROC, PR-AUC (average precision) and FPR at 95% TPR; higher score = more suspicious,
    poisoned = positive class."""
    # deferred: scikit-learn takes about a second to import and only these metrics need it
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_poisoned, dtype=bool)
    if scores.shape != y.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {y.shape} must be 1-D of equal length")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    if y.all() or not y.any():
        raise ValueError("detection metrics need both poisoned and clean samples among the scored ones")
    fpr, tpr, _ = roc_curve(y, scores)
    return {
        "auroc": float(roc_auc_score(y, scores)),
        "pr_auc": float(average_precision_score(y, scores)),
        "fpr_at_95_tpr": float(fpr[np.argmax(tpr >= 0.95)]),
    }


# --------------------------------------------------------------------------------- evaluation
