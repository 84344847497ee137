"""Every sample reaches the loss exactly once per epoch with its stable id: 1-2 ranks x 0-2 workers, CSV and wds."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, base_env, train_flags
from helpers import load_table

from safe_train.sample_ids import webdataset_sample_id


def _wds_ids(pattern: str) -> np.ndarray:
    directory = Path(pattern).parent
    ids = []
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys = {m.name.rsplit(".", 1)[0] for m in tar.getmembers()}
        ids += [webdataset_sample_id(str(shard), k) for k in keys]
    return np.sort(np.array(ids, dtype=np.int64))


@pytest.mark.parametrize("kind,ranks,workers", [
    ("csv", 1, 0), ("webdataset", 2, 2),  # the default run: 1 rank on CSV, 2 ranks x 2 workers on webdataset
    *(pytest.param(kind, ranks, workers, marks=pytest.mark.slow)
      for kind in ("csv", "webdataset") for ranks, workers in ((1, 0), (1, 2), (2, 0), (2, 2))
      if (kind, ranks, workers) not in {("csv", 1, 0), ("webdataset", 2, 2)}),
])  # the slow ones are also covered, with exact losses, by test_step_resume's 0/2-worker and 2-rank cases
def test_ids_reaching_the_loss_are_exactly_the_dataset(kind, ranks, workers, csv_64, wds_4x16, tmp_path):
    data = csv_64 if kind == "csv" else wds_4x16
    flags = train_flags(
        data,
        tmp_path,
        "run",
        epochs=1,
        batch_size=8,
        workers=workers,
        dataset_type=kind,
        extra=["--track-samples"],
    )
    if ranks == 1:
        cmd = [PYTHON, "-m", "safe_train.main", *flags]
    else:
        cmd = [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            "-m",
            "safe_train.main",
            *flags,
        ]
    proc = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = load_table(tmp_path / "run", 1)
    expected = np.arange(64) if kind == "csv" else _wds_ids(wds_4x16)
    np.testing.assert_array_equal(table.ids, expected)
    np.testing.assert_array_equal(table["times_seen"], np.ones(64, dtype=np.int32))
    np.testing.assert_array_equal(table["last_epoch"], np.zeros(64, dtype=np.int32))
    if ranks > 1:
        assert "per-sample state identical on 2 ranks (64 samples)" in proc.stdout + proc.stderr
