"""Backdoor-sample detection from CLIP embeddings: local outlier scores, kNN backends, in-loop callbacks.

See ``docs/detection.md``. ``scores`` holds the formulas, ``knn`` the exact/approximate neighbour
search, ``callback`` the in-loop detector (``--detect``), ``safe_train.detect`` the standalone command.
"""

from safe_train.detection.knn import knn
from safe_train.detection.scores import (
    DETECTORS,
    batch_scores,
    global_scores,
    local_scores,
    parse_detectors,
    partitioned_scores,
)

__all__ = ["DETECTORS", "batch_scores", "global_scores", "knn", "local_scores", "parse_detectors",
           "partitioned_scores"]
