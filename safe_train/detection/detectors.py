"""The detectors: one registered class per backdoor-sample score, holding its formula.

Each class registers itself in :data:`safe_train.registry.DETECTORS` under its ``name`` (the name
``--detect`` and ``--detectors`` take). :func:`safe_train.detection.scores.local_scores` computes the
neighbourhoods once, for the largest ``k`` any requested detector needs, and hands every detector a
:class:`ScoreInputs`; a detector only turns those arrays into one score per query (higher = more likely
a backdoor sample). The formulas and their notation are in :mod:`safe_train.detection.scores`.

A new detector is one class, here or in a plugin (entry-point group ``safe_train.detectors``)::

    @DETECTORS.register
    class MeanDistance(Detector):
        name = "meandist"          # lower case: detector names are matched case-insensitively
        default_k = 16             # None: it needs no neighbourhood
        def score(self, x: ScoreInputs) -> np.ndarray:
            return x.query_dist[:, : x.k].mean(axis=1)

This module imports neither torch nor :mod:`safe_train.detection.scores` (which imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from safe_train.errors import DetectError
from safe_train.registry import DETECTORS

EPS = 1e-12
"""Distances below this count as this in ratios and logarithms (duplicates give large finite scores)."""

IFOREST_TREES = 100


@dataclass(frozen=True)
class ScoreInputs:
    """What a detector scores from; the neighbour arrays are precomputed by ``local_scores``.

    ``query_dist`` / ``query_idx``: ``[n, >= k]`` ascending distances from each query to its admissible
    reference points and their indices in ``reference``. ``reference_dist``: ``[m, >= k]`` the same
    inside the reference set (only for a detector with ``needs_reference_knn``). Each array holds at
    least ``k`` columns (more when another detector needs more); use the first ``k``.
    """

    query: np.ndarray  # [n, d] float32
    reference: np.ndarray  # [m, d] float32
    query_text: np.ndarray | None  # [n, d] float32, the queries' own captions, or None
    seed: int
    k: int | None = None  # this detector's neighbourhood size (clamped to the admissible points)
    query_dist: np.ndarray | None = None  # float64
    query_idx: np.ndarray | None = None  # int64
    reference_dist: np.ndarray | None = None  # float64
    pair_mismatch: np.ndarray | None = None  # [p] float64: 1 - cos(image, caption) of every pair scored together


class Detector:
    """Base class of a registered detector; constructed with no arguments.

    ``default_k``: the neighbourhood size when ``--detect-k`` is not given, or None if the detector
    needs no neighbourhood. ``needs_reference_knn``: whether it also needs the reference points' own
    neighbourhoods (``ScoreInputs.reference_dist``).
    """

    name: ClassVar[str] = ""
    default_k: ClassVar[int | None] = None
    needs_reference_knn: ClassVar[bool] = False

    def choose_k(self, reference_size: int) -> int | None:
        """The neighbourhood size without ``--detect-k`` / ``--k``, given the admissible reference points per query;
        ``default_k`` unless a detector sizes its neighbourhood from the data (``auto``)."""
        return self.default_k

    def score(self, x: ScoreInputs) -> np.ndarray:
        """One float64 score per query row."""
        raise NotImplementedError


def lid_mle(dist: np.ndarray) -> np.ndarray:
    """LID maximum-likelihood estimate from each row's k ascending distances."""
    d = np.maximum(dist.astype(np.float64), EPS)
    k = d.shape[1]
    total = np.log(d / d[:, -1:]).sum(axis=1)
    return -k / np.minimum(total, -EPS)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``1 - cos(a_i, b_i)`` per row pair, in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), EPS)
    return 1.0 - cos


def _kdist_ratio_terms(x: ScoreInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The query's k-distance ``[n, 1]``, its neighbours ``[n, k]`` and their k-distances ``[n, k]``."""
    kk = x.k
    neighbours = x.query_idx[:, :kk]
    own_kdist = np.maximum(x.query_dist[:, kk - 1], EPS)[:, None]
    ref_kdist = np.maximum(x.reference_dist[:, kk - 1], EPS)[neighbours]
    return own_kdist, neighbours, ref_kdist


@DETECTORS.register
class KDistance(Detector):
    """``r_k(q)``: the distance to the k-th nearest admissible reference point."""

    name = "kdist"
    default_k = 16

    def score(self, x: ScoreInputs) -> np.ndarray:
        return x.query_dist[:, x.k - 1]


@DETECTORS.register
class SimplifiedLOF(Detector):
    """``(1/k) * sum_{o in N_k(q)} kdist_k(q) / kdist_k(o)`` (Schubert et al.)."""

    name = "slof"
    default_k = 16
    needs_reference_knn = True

    def score(self, x: ScoreInputs) -> np.ndarray:
        own_kdist, _, ref_kdist = _kdist_ratio_terms(x)
        return (own_kdist / ref_kdist).mean(axis=1)


@DETECTORS.register
class LocalIntrinsicDimensionality(Detector):
    """``-((1/k) * sum_i ln(r_i(q) / r_k(q)))^-1`` (Levina-Bickel / Amsaleg et al.)."""

    name = "lid"
    default_k = 64

    def score(self, x: ScoreInputs) -> np.ndarray:
        return lid_mle(x.query_dist[:, : x.k])


@DETECTORS.register
class DimensionalityAwareOutlier(Detector):
    """``(1/k) * sum_{o in N_k(q)} LID_k(o) * ln(kdist_k(q) / kdist_k(o))`` (Anderberg et al.)."""

    name = "dao"
    default_k = 16
    needs_reference_knn = True

    def score(self, x: ScoreInputs) -> np.ndarray:
        own_kdist, neighbours, ref_kdist = _kdist_ratio_terms(x)
        ref_lid = lid_mle(x.reference_dist[:, : x.k])[neighbours]
        return (ref_lid * np.log(own_kdist / ref_kdist)).mean(axis=1)


@DETECTORS.register
class IsolationForestScore(Detector):
    """``-score_samples(q)`` of a scikit-learn isolation forest (100 trees, seeded) fit on the reference."""

    name = "iforest"

    def score(self, x: ScoreInputs) -> np.ndarray:
        from sklearn.ensemble import IsolationForest  # deferred: scikit-learn takes 1-2 s to import

        forest = IsolationForest(n_estimators=IFOREST_TREES, random_state=x.seed).fit(x.reference)
        return -forest.score_samples(x.query).astype(np.float64)


@DETECTORS.register
class ClipScore(Detector):
    """``1 - cos(image, own caption)``: needs no reference set (a weak baseline)."""

    name = "clip"

    def score(self, x: ScoreInputs) -> np.ndarray:
        if x.query_text is None:
            raise DetectError("the clip score needs the queries' captions (query_text)")
        return cosine_distance(x.query, x.query_text)


# ---- the rate-robust default ---------------------------------------------------------------------
AUTO_K_MIN = 4
"""Smallest scale of the ``auto`` ladder: a group of >= 5 near-duplicates is visible as dense from here on."""

AUTO_K_MAX = 256
"""Largest scale of the ``auto`` ladder (cost: one kNN of this many neighbours per query and reference point)."""

AUTO_POINTS_PER_K = 64
"""``auto`` looks at most ``reference_size / 64`` neighbours deep, so the deepest scale still holds < 2% of the
reference: a density estimate, not a global distance."""


def auto_top_k(reference_size: int) -> int:
    """The deepest ``auto`` scale for ``reference_size`` admissible points: the largest power of two
    ``<= reference_size / AUTO_POINTS_PER_K``, within ``[AUTO_K_MIN, AUTO_K_MAX]`` and never above the points there are."""
    top = AUTO_K_MIN
    while top * 2 <= min(AUTO_K_MAX, reference_size // AUTO_POINTS_PER_K):
        top *= 2
    return max(1, min(top, reference_size))


def auto_ladder(top: int) -> list[int]:
    """The scales ``4, 8, 16, ... <= top`` (plus ``top`` itself when it is not one of them)."""
    ladder, k = [], AUTO_K_MIN
    while k <= top:
        ladder.append(k)
        k *= 2
    if not ladder or ladder[-1] != top:
        ladder.append(top)
    return ladder


def auto_tau(n: int) -> float:
    """``sqrt(2 ln n)``: about the largest of ``n`` standard normal values, so a clean set of ``n`` points rarely
    exceeds it; the dense and caption terms of ``auto`` count only what lies beyond it."""
    return float(np.sqrt(2.0 * np.log(max(int(n), 2))))


def robust_z(values: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """``(values - median) / (1.4826 * MAD)`` column-wise, median and MAD from ``sample``: a few hundred poisons
    barely move either, unlike a mean and standard deviation."""
    median = np.median(sample, axis=0)
    scale = 1.4826 * np.median(np.abs(sample - median), axis=0)
    return (values - median) / np.maximum(scale, EPS)


@dataclass(frozen=True)
class AutoTerms:
    """The parts of an ``auto`` score, per query (see :class:`AutoDetector`)."""

    sparse: np.ndarray
    dense: np.ndarray
    caption: np.ndarray | None
    tau: float
    ladder: tuple[int, ...]

    @property
    def score(self) -> np.ndarray:
        total = np.maximum(self.sparse, self.dense - self.tau)
        if self.caption is not None:
            total = total + np.maximum(self.caption - self.tau, 0.0)
        return total


def auto_terms(x: ScoreInputs) -> AutoTerms:
    """The three pieces of evidence of :class:`AutoDetector` from precomputed neighbourhoods."""
    ladder = auto_ladder(x.k)
    columns = [k - 1 for k in ladder]
    query_log = np.log(np.maximum(x.query_dist[:, columns], EPS))
    reference_log = np.log(np.maximum(x.reference_dist[:, columns], EPS))
    z = robust_z(query_log, reference_log)
    caption = None
    if x.query_text is not None and len(x.query):
        mismatch = cosine_distance(x.query, x.query_text)
        sample = x.pair_mismatch if x.pair_mismatch is not None and len(x.pair_mismatch) else mismatch
        caption = robust_z(mismatch, sample)
    return AutoTerms(sparse=z.max(axis=1), dense=(-z).max(axis=1), caption=caption,
                     tau=auto_tau(len(x.reference_dist)), ladder=tuple(ladder))


@DETECTORS.register
class AutoDetector(Detector):
    """The rate-robust default: ``max(S, D - tau) + max(C - tau, 0)`` (docs/detection.md, "auto").

    ``z_k(q)``: ``ln r_k(q)`` standardised by the median and MAD of the reference points' own ``ln kdist_k``,
    for ``k`` in the ladder ``4, 8, ..., K`` (``K``: :func:`auto_top_k` of the reference size, or ``--k``).
    ``S = max_k z_k`` (sparse at some scale: few poisons among clean neighbours), ``D = max_k -z_k``
    (abnormally dense: a trigger that collapsed many poisons into one tight cluster), ``C`` the robust z of the
    image-caption cosine distance against every pair scored together (``pair_mismatch``: the whole batch or
    data set, so a rank's share of a batch scores as in one process; else the queries; mismatched captions,
    before the backdoor is learned),
    ``tau = sqrt(2 ln m)`` for ``m`` reference points. ``S`` orders the samples; ``D`` and ``C`` count only
    beyond ``tau``, where clean samples rarely reach, so they lift what is extreme without reordering the rest.
    """

    name = "auto"
    default_k = AUTO_K_MAX
    needs_reference_knn = True

    def choose_k(self, reference_size: int) -> int | None:
        return auto_top_k(reference_size)

    def score(self, x: ScoreInputs) -> np.ndarray:
        return auto_terms(x).score
