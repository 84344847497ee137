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
- auto (the default of ``safe-train detect``): ``max(S, D - tau) + max(C - tau, 0)``, from robust z-scores of
  ``ln r_k`` over the ladder ``k = 4, 8, ..., K(m)`` (sparse ``S`` and dense ``D`` sides) and of the CLIP score
  (``C``); see :class:`safe_train.detection.detectors.AutoDetector`.

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

Each detector is a class registered in :data:`safe_train.registry.DETECTORS`
(:mod:`safe_train.detection.detectors` holds the built-in ones and ``EPS``); a registered plugin detector
works in every function here by name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from safe_train.detection.detectors import Detector, ScoreInputs, cosine_distance
from safe_train.detection.knn import knn
from safe_train.errors import ConfigError, DetectError
from safe_train.registry import DETECTORS

_FALLBACK_K = 16
"""What ``detector_k`` returns for a detector without a neighbourhood (``default_k=None``), as before."""

Array = np.ndarray | torch.Tensor


def parse_detectors(spec: str | Sequence[str]) -> list[str]:
    """``"kdist,slof"`` → ``["kdist", "slof"]`` (order kept, duplicates dropped); a ConfigError for unknown names."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in DETECTORS]
    if unknown or not names:
        raise ConfigError(f"unknown detector(s) {unknown or spec!r}; choose from {', '.join(DETECTORS.names())}")
    return list(dict.fromkeys(names))


def detector_k(name: str, k: int | None) -> int:
    """The neighbourhood size of a detector: ``k`` if given, else its ``default_k`` (the paper's)."""
    if k is not None:
        return int(k)
    default = DETECTORS.get(name).default_k
    return _FALLBACK_K if default is None else int(default)


def _np(x: Array) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def _knn_input(x: Array) -> Array:
    """What :func:`knn` gets: a tensor as it is (a CUDA tensor stays on its device: no host round trip), an
    array as float32."""
    return x.detach() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def local_scores(query: Array, reference: Array, detectors: Sequence[str], *, query_exclude: Array | None = None,
                 reference_exclude: Array | None = None, query_text: Array | None = None, k: int | None = None,
                 metric: str = "l2", seed: int = 0, pair_mismatch: np.ndarray | None = None,
                 query_rows: np.ndarray | None = None, **knn_kwargs: Any) -> dict[str, np.ndarray]:
    """Scores of every query row against ``reference`` (see the module docstring for the formulas).

    ``query_exclude`` / ``reference_exclude``: ``[n, e]`` / ``[m, e]`` reference indices inadmissible for
    each query / reference point (``-1`` = none; a reference point's own index is always excluded).
    ``query_text``: the queries' own captions (for ``clip``). ``pair_mismatch``: ``1 - cos`` of every
    image-caption pair scored together (``auto`` standardises its caption term by it). ``k`` overrides every detector's default
    (``Detector.choose_k``; ``auto`` sizes its own from the reference) and is clamped to the number of
    admissible reference points. The kNN is computed once, for the
    largest k the detectors need; each registered :class:`Detector` scores from it. ``query_rows``: the queries
    are these rows of ``reference`` with exactly the reference's exclusions (its own index and
    ``reference_exclude``), as in a batch reference; when the detectors need the reference's own kNN at
    the same k, the queries' neighbours are then read from that one self-join instead of a second search
    (the same result: the queries' rows of it).
    """
    names = parse_detectors(detectors)
    chosen: dict[str, Detector] = {name: DETECTORS.get(name)() for name in names}
    q, r = _np(query), _np(reference)
    n, m = q.shape[0], r.shape[0]
    inputs = ScoreInputs(q, r, None if query_text is None else _np(query_text), seed,
                         pair_mismatch=None if pair_mismatch is None else np.asarray(pair_mismatch, np.float64))
    ks: dict[str, int] = {}
    local = [name for name, det in chosen.items() if det.default_k is not None]
    if local:
        n_ex_q = 0 if query_exclude is None else int(np.asarray(query_exclude).reshape(n, -1).shape[1])
        n_ex_r = 1 + (0 if reference_exclude is None else int(np.asarray(reference_exclude).reshape(m, -1).shape[1]))
        admissible = m - max(n_ex_q, n_ex_r)
        if admissible < 1:
            raise DetectError(f"a reference set of {m} points leaves no admissible neighbour")
        ks = {name: min(int(k) if k is not None else int(chosen[name].choose_k(admissible)), admissible)
              for name in local}
        q_in, r_in = _knn_input(query), _knn_input(reference)
        with_reference = [name for name in local if chosen[name].needs_reference_knn]
        k_query = max(ks.values())
        if query_rows is not None and with_reference and max(ks[name] for name in with_reference) == k_query:
            r_dist, r_idx = knn(r_in, r_in, k_query, metric=metric, exclude=reference_exclude, exclude_self=True,
                                seed=seed, **knn_kwargs)
            rows = np.asarray(query_rows, dtype=np.int64)
            return _score_all(chosen, ks, dataclasses.replace(
                inputs, query_dist=r_dist.numpy()[rows].astype(np.float64), query_idx=r_idx.numpy()[rows],
                reference_dist=r_dist.numpy().astype(np.float64)))
        q_dist, q_idx = knn(q_in, r_in, k_query, metric=metric, exclude=query_exclude, seed=seed, **knn_kwargs)
        inputs = dataclasses.replace(inputs, query_dist=q_dist.numpy().astype(np.float64), query_idx=q_idx.numpy())
        if with_reference:
            r_dist, _ = knn(r_in, r_in, max(ks[name] for name in with_reference), metric=metric,
                            exclude=reference_exclude, exclude_self=True, seed=seed, **knn_kwargs)
            inputs = dataclasses.replace(inputs, reference_dist=r_dist.numpy().astype(np.float64))
    return _score_all(chosen, ks, inputs)


def _score_all(chosen: dict[str, Detector], ks: dict[str, int], inputs: ScoreInputs) -> dict[str, np.ndarray]:
    return {name: det.score(dataclasses.replace(inputs, k=ks.get(name))) for name, det in chosen.items()}


def clip_score(image: Array, text: Array) -> np.ndarray:
    """``1 - cos(image_i, text_i)`` per pair (the ``clip`` detector)."""
    return cosine_distance(_np(image), _np(text))


def _pair_exclusions(m: int, with_text: bool) -> np.ndarray | None:
    """For a reference ``[images (m); captions (m)]``: each point's partner (the self index is added by knn)."""
    if not with_text:
        return None
    idx = np.arange(2 * m)
    return np.where(idx < m, idx + m, idx - m)[:, None]


def batch_scores(image: Array, text: Array, detectors: Sequence[str], *, k: int | None = None,
                 metric: str = "l2", with_text: bool = True, seed: int = 0, queries: slice | None = None,
                 **knn_kwargs: Any) -> dict[str, np.ndarray]:
    """The paper's batch-reference scores of the ``B`` images of one (global) batch.

    Reference = the batch's images and captions (``with_text=False``: images only). Query ``i``
    excludes itself and its own caption. ``queries``: score only these images (e.g. one rank's share of
    a gathered batch) against the whole reference; the result has one row per chosen image. Tensors stay
    on their device for the kNN (only the scores and the arrays the detectors read come to the host).
    """
    if isinstance(image, torch.Tensor) and isinstance(text, torch.Tensor):
        img, txt = image.detach().float(), text.detach().to(image.device).float()
        reference = torch.cat([img, txt]) if with_text else img
    else:
        img, txt = _np(image), _np(text)
        reference = np.concatenate([img, txt]) if with_text else img
    b = img.shape[0]
    partner = _pair_exclusions(b, with_text)
    self_idx = np.arange(b)[:, None]
    query_exclude = np.concatenate([self_idx, partner[:b]], axis=1) if partner is not None else self_idx
    chosen = slice(None) if queries is None else queries
    return local_scores(img[chosen], reference, detectors, query_exclude=query_exclude[chosen],
                        reference_exclude=partner, query_text=txt[chosen], k=k, metric=metric, seed=seed,
                        pair_mismatch=_pair_mismatch(img, txt, detectors), query_rows=np.arange(b)[chosen],
                        **knn_kwargs)


def _pair_mismatch(image: Array, text: Array, detectors: Sequence[str]) -> np.ndarray | None:
    """``1 - cos`` of every pair (only when ``auto`` is asked for: it standardises by them)."""
    if "auto" not in parse_detectors(detectors):
        return None
    return clip_score(image, text)


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


AUTO_REFERENCE_PAIRS = 32768
"""The ``auto`` reference (``safe-train detect``'s default, ``--detect-reference auto`` in training): a random
sample of at most this many images (the whole set below it), no captions (templated captions are near-duplicates
of each other and blur the density estimate). The kNN costs ``N x min(N, 32768)`` distances, and a cluster of
``C`` poisons keeps ``C x 32768 / N`` members in it."""


def auto_reference_size(n: int) -> int:
    """How many pairs the ``auto`` reference sample holds (all of them up to ``AUTO_REFERENCE_PAIRS``)."""
    return min(int(n), AUTO_REFERENCE_PAIRS)


def auto_reference_scores(image: Array, text: Array, detectors: Sequence[str], **kwargs: Any) -> dict[str, np.ndarray]:
    """Every image against the ``auto`` reference: one rule for the standalone command and the in-loop callback."""
    return global_scores(image, text, detectors, reference_size=auto_reference_size(len(image)), with_text=False,
                         **kwargs)


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
                                 metric=metric, seed=seed, pair_mismatch=_pair_mismatch(img, txt, detectors),
                                 **knn_kwargs))
    return _average(runs)
