"""Backdoor-sample scores from CLIP embeddings: higher = more likely a backdoor sample, for every detector.

Notation: a query ``q`` (an image embedding) is compared with a *reference set* ``R`` of embeddings.
Some reference points are *inadmissible* for ``q`` (itself and its own caption when they are in
``R``). ``r_1(q) <= r_2(q) <= ...`` are the distances from ``q`` to its admissible reference points
(1-indexed; ties broken by index), ``N_k(q)`` the corresponding k nearest points. Distances are
Euclidean (``metric="l2"``) or ``1 - cos`` (``metric="cosine"``). For a reference point ``o`` the same
quantities are computed *inside* ``R``, with ``o`` itself and its partner (the caption of an image,
the image of a caption) inadmissible.

- k-distance:  ``kdist_k(q) = r_k(q)`` (the standard definition: the k-th nearest *other* point; the
  reference code takes the (k+1)-th).
- LID (maximum-likelihood estimator, Levina-Bickel / Amsaleg et al.):
  ``LID_k(q) = -( (1/k) * sum_{i=1..k} ln(r_i(q) / r_k(q)) )^{-1}``.
- SLOF (simplified LOF, Schubert et al.): ``SLOF_k(q) = (1/k) * sum_{o in N_k(q)} kdist_k(q) / kdist_k(o)``.
- DAO (dimensionality-aware outlier, Anderberg et al.; log-space form):
  ``DAO_k(q) = (1/k) * sum_{o in N_k(q)} LID_k(o) * ln(kdist_k(q) / kdist_k(o))``.
- Isolation forest (scikit-learn, 100 trees, fixed seed) fitted on the reference set; the score is
  ``-score_samples(q)`` (scikit-learn's score is higher for normal points).
- CLIP score: ``1 - cos(image, own caption)``; needs no reference set (a weak baseline).

Unlike the reference implementation, the statistics of reference points never include their own
zero self-distance and neighbour indices always refer to the matrix they were taken from.

Reference sets:

- ``batch_scores``: the paper's setting. Queries are the images of one (global) batch; the
  reference is that batch's images and captions. A random batch holds few poisons, so a poison's
  neighbours are clean and its neighbourhood looks sparse.
- ``partitioned_scores``: the dataset split into random batches of a chosen size (standalone batch mode).
- ``global_scores``: every sample against the whole dataset or a random reference sample of size
  ``M``. With more poisons in the reference than ``k`` the poisons are each other's neighbours and
  look dense, so choose ``M`` such that ``M * poison_rate < k``.

Distances: distances below ``EPS`` are treated as ``EPS`` in ratios and logarithms, so exact
duplicates give large finite scores instead of NaN/inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from safe_train.detection.knn import knn

DETECTORS = ("kdist", "slof", "lid", "dao", "iforest", "clip")
DISTANCE_DETECTORS = ("kdist", "slof", "lid", "dao")
DEFAULT_K = {"kdist": 16, "slof": 16, "dao": 16, "lid": 64}
EPS = 1e-12
IFOREST_TREES = 100

Array = np.ndarray | torch.Tensor


def parse_detectors(spec: str | Sequence[str]) -> list[str]:
    """``"kdist,slof"`` → ``["kdist", "slof"]``; a clear ValueError for unknown names."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in DETECTORS]
    if unknown or not names:
        raise ValueError(f"unknown detector(s) {unknown or spec!r}; choose from {', '.join(DETECTORS)}")
    return list(dict.fromkeys(names))


def detector_k(name: str, k: int | None) -> int:
    """The neighbourhood size of a detector: ``k`` if given, else the paper's default."""
    return int(k) if k is not None else DEFAULT_K.get(name, 16)


def _np(x: Array) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def _lid(dist: np.ndarray) -> np.ndarray:
    """LID MLE from each row's k ascending distances."""
    d = np.maximum(dist.astype(np.float64), EPS)
    k = d.shape[1]
    total = np.log(d / d[:, -1:]).sum(axis=1)
    return -k / np.minimum(total, -EPS)


def local_scores(query: Array, reference: Array, detectors: Sequence[str], *, query_exclude: Array | None = None,
                 reference_exclude: Array | None = None, query_text: Array | None = None, k: int | None = None,
                 metric: str = "l2", seed: int = 0, **knn_kwargs: Any) -> dict[str, np.ndarray]:
    """Scores of every query row against ``reference`` (see the module docstring for the formulas).

    ``query_exclude`` / ``reference_exclude``: ``[n, e]`` / ``[m, e]`` reference indices inadmissible for
    each query / reference point (``-1`` = none; a reference point's own index is always excluded).
    ``query_text``: the queries' own captions (for ``clip``). ``k`` overrides every detector's default
    and is clamped to the number of admissible reference points.
    """
    detectors = parse_detectors(detectors)
    q, r = _np(query), _np(reference)
    n, m = q.shape[0], r.shape[0]
    out: dict[str, np.ndarray] = {}
    distance_dets = [d for d in detectors if d in DISTANCE_DETECTORS]
    if distance_dets:
        n_ex_q = 0 if query_exclude is None else int(np.asarray(query_exclude).reshape(n, -1).shape[1])
        n_ex_r = 1 + (0 if reference_exclude is None else int(np.asarray(reference_exclude).reshape(m, -1).shape[1]))
        admissible = m - max(n_ex_q, n_ex_r)
        if admissible < 1:
            raise ValueError(f"a reference set of {m} points leaves no admissible neighbour")
        ks = {d: min(detector_k(d, k), admissible) for d in distance_dets}
        k_max = max(ks.values())
        q_dist, q_idx = knn(q, r, k_max, metric=metric, exclude=query_exclude, seed=seed, **knn_kwargs)
        q_dist, q_idx = q_dist.numpy().astype(np.float64), q_idx.numpy()
        r_dist = None
        if any(d in ("slof", "dao") for d in distance_dets):
            k_ref = max(ks[d] for d in distance_dets if d in ("slof", "dao"))
            r_dist, _ = knn(r, r, k_ref, metric=metric, exclude=reference_exclude, exclude_self=True, seed=seed,
                            **knn_kwargs)
            r_dist = r_dist.numpy().astype(np.float64)
        for name in distance_dets:
            kk = ks[name]
            if name == "kdist":
                out[name] = q_dist[:, kk - 1]
            elif name == "lid":
                out[name] = _lid(q_dist[:, :kk])
            else:
                neighbours = q_idx[:, :kk]
                own_kdist = np.maximum(q_dist[:, kk - 1], EPS)[:, None]
                ref_kdist = np.maximum(r_dist[:, kk - 1], EPS)[neighbours]
                if name == "slof":
                    out[name] = (own_kdist / ref_kdist).mean(axis=1)
                else:
                    ref_lid = _lid(r_dist[:, :kk])[neighbours]
                    out[name] = (ref_lid * np.log(own_kdist / ref_kdist)).mean(axis=1)
    if "iforest" in detectors:
        from sklearn.ensemble import IsolationForest

        forest = IsolationForest(n_estimators=IFOREST_TREES, random_state=seed).fit(r)
        out["iforest"] = -forest.score_samples(q).astype(np.float64)
    if "clip" in detectors:
        if query_text is None:
            raise ValueError("the clip score needs the queries' captions (query_text)")
        out["clip"] = clip_score(q, _np(query_text))
    return {name: out[name] for name in detectors}


def clip_score(image: Array, text: Array) -> np.ndarray:
    """``1 - cos(image_i, text_i)`` per pair."""
    a, b = _np(image).astype(np.float64), _np(text).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), EPS)
    return 1.0 - cos


def _pair_exclusions(m: int, with_text: bool) -> np.ndarray | None:
    """For a reference ``[images (m); captions (m)]``: each point's partner (the self index is added by knn)."""
    if not with_text:
        return None
    idx = np.arange(2 * m)
    return np.where(idx < m, idx + m, idx - m)[:, None]


def batch_scores(image: Array, text: Array, detectors: Sequence[str], *, k: int | None = None,
                 metric: str = "l2", with_text: bool = True, seed: int = 0, **knn_kwargs: Any) -> dict[str, np.ndarray]:
    """The paper's batch-reference scores of the ``B`` images of one (global) batch.

    Reference = the batch's images and captions (``with_text=False``: images only). Query ``i``
    excludes itself and its own caption.
    """
    img, txt = _np(image), _np(text)
    b = img.shape[0]
    reference = np.concatenate([img, txt]) if with_text else img
    partner = _pair_exclusions(b, with_text)
    self_idx = np.arange(b)[:, None]
    query_exclude = np.concatenate([self_idx, partner[:b]], axis=1) if partner is not None else self_idx
    return local_scores(img, reference, detectors, query_exclude=query_exclude, reference_exclude=partner,
                        query_text=txt, k=k, metric=metric, seed=seed, **knn_kwargs)


def _average(runs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.mean([run[name] for run in runs], axis=0) for name in runs[0]}


def partitioned_scores(image: Array, text: Array, detectors: Sequence[str], *, batch_size: int, repeats: int = 1,
                       seed: int = 0, **kwargs: Any) -> dict[str, np.ndarray]:
    """Batch-reference scores for a whole dataset: random partitions into ``ceil(N / batch_size)`` near-equal
    batches; with ``repeats > 1`` the scores of independent partitions are averaged."""
    img, txt = _np(image), _np(text)
    n = img.shape[0]
    n_batches = max(1, math.ceil(n / batch_size))
    runs = []
    for rep in range(repeats):
        rng = np.random.default_rng([seed, rep])
        result: dict[str, np.ndarray] = {}
        for chunk in np.array_split(rng.permutation(n), n_batches):
            scores = batch_scores(img[chunk], txt[chunk], detectors, seed=seed, **kwargs)
            for name, values in scores.items():
                result.setdefault(name, np.zeros(n))[chunk] = values
        runs.append(result)
    return _average(runs)


def global_scores(image: Array, text: Array, detectors: Sequence[str], *, reference_size: int | None = None,
                  repeats: int = 1, with_text: bool = True, k: int | None = None, metric: str = "l2",
                  seed: int = 0, **knn_kwargs: Any) -> dict[str, np.ndarray]:
    """Every image against the whole dataset (``reference_size=None``) or a random reference sample of
    ``reference_size`` pairs (their images and captions; images only with ``with_text=False``).

    A query that is in the reference excludes itself and its own caption. With a sample, ``repeats``
    independent samples are drawn and the scores averaged (samples are seeded: reproducible).
    """
    img, txt = _np(image), _np(text)
    n = img.shape[0]
    size = n if reference_size is None or reference_size >= n else int(reference_size)
    runs = []
    for rep in range(repeats if size < n else 1):
        chosen = np.arange(n) if size == n else np.sort(np.random.default_rng([seed, rep]).choice(n, size, replace=False))
        reference = np.concatenate([img[chosen], txt[chosen]]) if with_text else img[chosen]
        position = np.full(n, -1, dtype=np.int64)
        position[chosen] = np.arange(size)
        query_exclude = position[:, None]
        if with_text:
            query_exclude = np.concatenate([query_exclude, np.where(position >= 0, position + size, -1)[:, None]], 1)
        runs.append(local_scores(img, reference, detectors, query_exclude=query_exclude,
                                 reference_exclude=_pair_exclusions(size, with_text), query_text=txt, k=k,
                                 metric=metric, seed=seed, **knn_kwargs))
    return _average(runs)
