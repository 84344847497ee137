"""Webdataset faults (issue 14): unreadable shards stop a run that cannot read anything, and every lost
sample is counted and named instead of being padded over silently."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, base_env, digit_images, train_flags, write_wds_dataset
from helpers import run_safe_train
from PIL import Image

from safe_train.data import LoaderInfo, SkipCounter, WarningLimiter, wds_loader
from safe_train.errors import DataError


class Deadline(BaseException):
    """The code under test did not return in time (it used to loop forever). A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` in a data pipeline can swallow it."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Interrupt the main thread after ``seconds`` (the faults under test used to spin without end)."""

    def expire(signum, frame):
        raise Deadline(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tiny_transform(image: Image.Image, caption: str, sample_id: int) -> dict[str, torch.Tensor]:
    return {"image": torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32)),
            "text": torch.tensor([len(caption)])}


def loader(shards: str, *, batch_size: int = 5, workers: int = 0, num_samples: int = 64,
           resampled: bool = False, counter: SkipCounter | None = None) -> LoaderInfo:
    args = argparse.Namespace(train_data=shards, train_num_samples=num_samples, batch_size=batch_size,
                              workers=workers, world_size=1, rank=0, seed=0, dataset_resampled=resampled,
                              train_data_upsampling_factors=None)
    return wds_loader(args, tiny_transform, skip_counter=counter or SkipCounter(), persistent=False)


def one_pass(info: LoaderInfo) -> list[dict]:
    """The batches of exactly one pass over the shards (``with_epoch`` would start further passes)."""
    pipeline = info.dataloader.pipeline[0].dataset
    return list(pipeline.iterator1())


def damage(folder: Path) -> None:
    """Shard 0 ends cleanly after 10 of its 16 samples, shard 1 breaks inside sample 5's image,
    shard 2 is not a tar at all, shard 3 is missing."""
    for shard, cut in ((0, "header"), (1, "data")):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path) as tar:
            members = tar.getmembers()  # two members (png, txt) per sample
        at = members[20].offset if cut == "header" else members[10].offset_data + 100
        path.write_bytes(path.read_bytes()[:at])
    (folder / "00002.tar").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "00003.tar").unlink()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# ---- fault 2: every lost sample is counted and named ----------------------------------------------------
def test_shard_faults_count_the_samples_sizes_json_gives_them(tmp_path, caplog):
    shards = write_wds_dataset(tmp_path, shards=4, per_shard=16)
    damage(tmp_path)
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING), deadline(60):
        batches = one_pass(loader(shards, counter=counter))
    assert sum(len(b["sample_id"]) for b in batches) == 15  # 10 + 5 readable samples, 3 batches of 5
    assert counter.value == 6 + 11 + 16 + 16 and counter.shards == 0
    log = messages(caplog)
    assert re.search(r"00000\.tar ended after 10 of its 16 samples \(sizes\.json\): 6 lost", log)
    assert re.search(r"00001\.tar: ReadError: .* after 5 sample\(s\); 11 of its 16 samples", log)
    assert re.search(r"00002\.tar: ReadError: .*; 16 of its 16 samples", log)
    assert re.search(r"00003\.tar: FileNotFoundError: .*; 16 of its 16 samples", log)
    assert "Handling webdataset error" not in log


def test_shard_faults_without_sizes_json_count_skipped_shards(tmp_path, caplog):
    shards = write_wds_dataset(tmp_path, shards=4, per_shard=16)
    damage(tmp_path)
    (tmp_path / "sizes.json").unlink()
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING), deadline(60):
        one_pass(loader(shards, counter=counter))
    # shard 0 ends cleanly: without a size it cannot be told from a short shard
    assert counter.value == 0 and counter.shards == 3
    log = messages(caplog)
    for shard in ("00001.tar", "00002.tar", "00003.tar"):
        assert re.search(rf"skipping webdataset shard \S*{shard}: .*samples lost: unknown", log), shard


def test_samples_without_caption_or_image_and_corrupt_images_are_counted_and_named(tmp_path, caplog):
    images, _ = digit_images(16)
    good = [(f"good_{i:02d}", {"png": png_bytes(im), "txt": b"a digit"}) for i, im in enumerate(images)]
    bad = [("nocap_0", {"png": png_bytes(images[0])}), ("nocap_1", {"jpg": png_bytes(images[1])}),
           ("noimg_0", {"txt": b"a caption alone"}), ("empty_0", {"json": b"{}"}),
           ("corrupt_0", {"png": b"not a png at all", "txt": b"a broken image"})]
    write_shard(tmp_path / "00000.tar", good[:8] + bad + good[8:])
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING), deadline(60):
        batches = one_pass(loader(str(tmp_path / "00000.tar"), batch_size=4, num_samples=16, counter=counter))
    assert sum(len(b["sample_id"]) for b in batches) == 16
    assert counter.value == 5
    log = messages(caplog)
    url = str(tmp_path / "00000.tar")
    assert f"skipping webdataset sample 'nocap_0' of {url}: no caption (.txt)" in log
    assert f"skipping webdataset sample 'nocap_1' of {url}: no caption (.txt)" in log
    assert f"skipping webdataset sample 'noimg_0' of {url}: no image" in log
    assert f"skipping webdataset sample 'empty_0' of {url}: no caption (.txt) and no image" in log
    assert f"skipping unreadable webdataset sample 'corrupt_0' of {url}: " in log
    assert "BytesIO" not in log


def test_warnings_are_rate_limited(caplog):
    limiter = WarningLimiter(first=20, every=1000)
    with caplog.at_level(logging.WARNING):
        for i in range(2500):
            limiter.warn("sample without caption or image", f"lost sample {i}")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:20] == [f"lost sample {i}" for i in range(20)]
    assert "summarised every 1000" in lines[20]
    assert len(lines) == 23 and "1000 warnings" in lines[21] and "2000 warnings" in lines[22]


def test_losses_reach_skipped_samples_total(tmp_path):
    """End to end, the missing shard's samples are counted in the worker and logged by the main process."""
    data = tmp_path / "data"
    shards = write_wds_dataset(data, shards=4, per_shard=16)
    (data / "00003.tar").unlink()
    flags = train_flags(shards, tmp_path, "lossy", epochs=1, batch_size=8, workers=1, dataset_type="webdataset",
                        extra=["--train-num-samples", "64"])
    assert run_safe_train(flags) == 0
    log = (tmp_path / "lossy" / "out.log").read_text()
    # 8 batches: one whole pass (48 samples, the missing shard counted once), then 16 more samples of a
    # second pass, which may or may not have reached the missing shard
    found = re.search(r"skipped_samples_total: (\d+)", log)
    assert found and int(found.group(1)) in (16, 32), log[-3000:]


# ---- fault 1: nothing readable stops the run --------------------------------------------------------------
def test_all_shards_missing_exits_with_one_line(tmp_path):
    missing = tmp_path / "missing" / "{00000..00003}.tar"
    flags = train_flags(missing, tmp_path, "m", epochs=1, dataset_type="webdataset",
                        extra=["--train-num-samples", "128"])
    proc = subprocess.run([PYTHON, "-m", "safe_train.main", *flags], env=base_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("safe-train: error: none of the 4 training shard(s) exists")
    assert "missing/00000.tar" in errors[0] and "Traceback" not in proc.stderr


def test_unreadable_shards_stop_a_worker_with_a_one_line_error(tmp_path):
    shards = write_wds_dataset(tmp_path, shards=4, per_shard=16)
    for shard in tmp_path.glob("*.tar"):
        shard.write_bytes(b"\0garbage" * 100)
    with deadline(60), pytest.raises(DataError) as raised:
        for _ in loader(shards, workers=1).dataloader:
            pass
    message = str(raised.value)
    assert "data-loader worker 0 of rank 0" in message and "none of its 4 shard(s) could be read" in message
    assert "00000.tar (ReadError" in message
    assert "\n" not in message and "Traceback" not in message


def test_a_pass_without_usable_samples_stops(tmp_path, caplog):
    images, _ = digit_images(8)
    write_shard(tmp_path / "00000.tar", [(f"k{i}", {"png": png_bytes(im)}) for i, im in enumerate(images)])
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING), deadline(60), pytest.raises(DataError, match="gave 8 sample"):
        for _ in loader(str(tmp_path / "00000.tar"), counter=counter).dataloader:
            pass
    assert counter.value == 8


def test_resampled_unreadable_shards_stop(tmp_path):
    shards = write_wds_dataset(tmp_path, shards=4, per_shard=16)
    for shard in tmp_path.glob("*.tar"):
        shard.write_bytes(b"")
    counter = SkipCounter()
    with deadline(60), pytest.raises(DataError, match="100 webdataset shards in a row gave no sample"):
        for _ in loader(shards, resampled=True, counter=counter).dataloader:
            pass
    assert counter.value == 100 * 16
