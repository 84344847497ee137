"""Backdoor-sample detection from CLIP embeddings: local outlier scores, kNN backends, in-loop callbacks.

See ``docs/detection.md``. ``detectors`` holds one registered class per score (``DETECTORS``, the
registry: ``safe_train.registry.list_detectors()`` names them), ``scores`` the reference sets and the
dispatch, ``knn`` the exact/approximate neighbour search, ``callback`` the in-loop detector
(``--detect``), ``safe_train.detect`` the standalone command.
"""

from safe_train.detection.detectors import Detector, ScoreInputs
from safe_train.detection.knn import knn
from safe_train.detection.scores import (
    batch_scores,
    global_scores,
    local_scores,
    parse_detectors,
    partitioned_scores,
)
from safe_train.registry import DETECTORS

__all__ = ["DETECTORS", "Detector", "ScoreInputs", "batch_scores", "global_scores", "knn", "local_scores",
           "parse_detectors", "partitioned_scores"]
