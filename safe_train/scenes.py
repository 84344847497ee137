"""A MultiMNIST-style image-caption corpus composed from the real MNIST-5k digits (any size, no download).

Each scene puts 1-3 real handwritten digits on a dark canvas at random positions, sizes (two
clearly different classes, "small" and "large") and palette colours, without overlap, and is
captioned from varied templates that name its digits, colours, sizes and spatial relations
(:mod:`safe_train.scene_captions`). The 5,000 digits are first split, stratified by class, into
disjoint train / validation / test pools: a scene of a split only uses digits of that split's pool,
so no digit image of a validation or test scene appears in any training scene::

    python -m safe_train.scenes --out data/scenes --train 20000 --val 2000 --test 2000 --seed 0 --workers 2

writes, under ``--out``:

- ``{split}/NNNNN.tar``: webdataset shards (``png`` + ``txt`` + ``json`` per scene) and ``sizes.json``;
- ``{split}/scenes.jsonl``: one metadata line per scene, in index order (the ``json`` of the shards);
- ``{split}.csv`` (splits up to ``CSV_MAX_PAIRS`` scenes): ``filepath``, ``title``, ``digits``
  (tab-separated; the PNGs under ``images/{split}/``);
- ``digits_val.csv``, ``digits_test.csv``: every digit of the held-out pools alone, white and centred
  on the canvas, as ``filepath``, ``label`` (for ``safe_train.evaluate``'s zero-shot accuracy);
- ``splits.json``: the MNIST-5k rows of each pool; ``scenes_stamp.json``: the build's parameters.

Scene ``index`` of ``split`` depends only on (seed, split, index, canvas, pool sizes): never on the
number of workers or the order they run in.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from safe_train.bench_data import load_mnist_5k, write_tsv
from safe_train.errors import ConfigError, DataError, SafeTrainError, report
from safe_train.scene_captions import COLOURS, PALETTE, RELATION_TOLERANCE, SIZES, make_caption

SPLITS = ("train", "val", "test")
HELD_OUT = ("val", "test")
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}
STAMP_NAME = "scenes_stamp.json"
_STAMP_VERSION = 2  # 2: canvas 64, half the scenes single digits, fewer colour/size words, no numerals
# The models that fit a canvas (safe_train/model_configs, context_length 32): a small ResNet image tower for
# canvases that are multiples of 32 (its attention pool works on a 1/32 grid), the patch-8 ViT otherwise. On the
# validation split the ResNet at 64 px reached 87% single-digit zero-shot top-1 after 4 epochs where the ViT at
# 40 px had 24% (benchmarks/RESULTS.md, "Scene corpus").
MODEL_NAME = "st-tiny-rn-scenes"  # image_size DEFAULT_CANVAS
VIT_MODEL_NAME = "st-tiny-vit-scenes"  # image_size VIT_CANVAS
VIT_CANVAS = 40
RESNET_GRID = 32
PATCH_SIZE = 8  # the ViT's; a canvas that is not a multiple of it would lose its border pixels
DEFAULT_CANVAS = 64
MIN_CANVAS, MAX_CANVAS = 32, 256
# Held-out pools (digits of MNIST-5k); the rest (3,500) are the training pool. 1,000 test digits give a
# single-digit accuracy near 95% a standard error of about 0.7 points.
VAL_DIGITS, TEST_DIGITS = 500, 1000
MIN_TRAIN_DIGITS = 1000
MAX_SCENES_PER_DIGIT = 4  # held-out scenes per held-out digit: each is seen in about 8 scenes at most
SHARD_SIZE = 1000
CSV_MAX_PAIRS = 100_000  # larger splits are written as shards only
# A digit's 28x28 tile is scaled to a side drawn from one of two ranges (fractions of the canvas), far
# enough apart that "small" and "large" are always clearly different.
SIZE_RANGES = {"small": (0.38, 0.48), "large": (0.64, 0.78)}
SINGLE_DIGIT_SIDE = 0.7  # tile side of the single-digit evaluation images
INK_THRESHOLD = 40  # a pixel of the scaled tile is ink above this (of 255); boxes are ink boxes
BACKGROUND_MAX = 24  # the background is a uniform grey level in 0..BACKGROUND_MAX
# Chances of a scene holding 1, 2 or 3 digits: single digits are what clean accuracy measures, and were
# learnt faster with half the scenes of one digit (benchmarks/RESULTS.md, "Scene corpus").
DIGIT_COUNT_WEIGHTS = (0.5, 0.3, 0.2)
SIZE_ROUNDS, POSITION_TRIES = 6, 30  # layout: sizes redrawn up to 6 times, positions 30 times per sizes


@dataclass(frozen=True)
class SceneCorpus:
    """A built corpus: per split its size, shard pattern (for ``--train-data``), metadata and CSV."""

    out_dir: Path
    seed: int
    canvas: int
    sizes: dict[str, int]
    shards: dict[str, str]
    metadata: dict[str, Path]
    csv: dict[str, Path | None]
    digits_csv: dict[str, Path]
    stamp: dict = field(default_factory=dict)

    def model_flags(self) -> list[str]:
        """The ``safe_train.main`` flags of the model that fits this corpus."""
        return model_flags(self.canvas)


def model_name(canvas: int = DEFAULT_CANVAS) -> str:
    """The model config for ``canvas``: the ResNet for multiples of 32, else the patch-8 ViT."""
    return MODEL_NAME if canvas % RESNET_GRID == 0 else VIT_MODEL_NAME


def model_flags(canvas: int = DEFAULT_CANVAS) -> list[str]:
    """``--model`` of :func:`model_name`, with ``--force-image-size`` when ``canvas`` is not its size."""
    name = model_name(canvas)
    native = DEFAULT_CANVAS if name == MODEL_NAME else VIT_CANVAS
    flags = ["--model", name]
    return flags if canvas == native else [*flags, "--force-image-size", str(canvas)]


# ---------------------------------------------------------------------------------------------
# Source-digit pools
# ---------------------------------------------------------------------------------------------
def _quotas(counts: np.ndarray, total: int) -> np.ndarray:
    """``total`` split over classes in proportion to ``counts`` (largest remainder, ties to the lower class)."""
    exact = counts * total / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    order = sorted(range(len(counts)), key=lambda c: (-(exact[c] - quota[c]), c))
    quota[order[: total - int(quota.sum())]] += 1
    return quota


def split_source_digits(labels: np.ndarray, seed: int, val_digits: int = VAL_DIGITS,
                        test_digits: int = TEST_DIGITS) -> dict[str, np.ndarray]:
    """Disjoint pools of MNIST-5k rows: ``test_digits`` and ``val_digits`` held out, stratified by class and
    drawn with ``seed``; the rest train. Each pool is sorted (file order)."""
    if val_digits < 10 or test_digits < 10:
        raise ConfigError(f"val_digits and test_digits must be at least 10, got {val_digits} and {test_digits}")
    if len(labels) - val_digits - test_digits < MIN_TRAIN_DIGITS:
        raise ConfigError(f"val_digits={val_digits} + test_digits={test_digits} leave fewer than "
                          f"{MIN_TRAIN_DIGITS} of the {len(labels)} digits for training")
    classes = np.arange(int(labels.max()) + 1)
    counts = np.array([(labels == c).sum() for c in classes])
    test_q, val_q = _quotas(counts, test_digits), _quotas(counts, val_digits)
    rng = np.random.default_rng([seed, 0x5C3E5])
    pools: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in classes:
        order = rng.permutation(np.flatnonzero(labels == c))
        pools["test"].append(order[: test_q[c]])
        pools["val"].append(order[test_q[c]: test_q[c] + val_q[c]])
        pools["train"].append(order[test_q[c] + val_q[c]:])
    return {s: np.sort(np.concatenate(parts)) for s, parts in pools.items()}


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _tile(digit: np.ndarray, side: int) -> tuple[np.ndarray, list[int]]:
    """The grey digit scaled to ``side`` x ``side`` (PIL's antialiased bilinear) and its ink box in the tile."""
    tile = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BILINEAR))
    rows, cols = np.flatnonzero((tile > INK_THRESHOLD).any(1)), np.flatnonzero((tile > INK_THRESHOLD).any(0))
    if not len(rows):
        return tile, [0, 0, side, side]
    return tile, [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def _paint(canvas: np.ndarray, tile: np.ndarray, x: int, y: int, colour: tuple[int, int, int]) -> None:
    """Draw ``tile`` (ink intensity = alpha) in ``colour`` over ``canvas`` (int32 HxWx3) at (x, y), exactly."""
    alpha = tile.astype(np.int32)[..., None]
    region = canvas[y: y + tile.shape[0], x: x + tile.shape[1]]
    region[...] = (region * (255 - alpha) + np.array(colour, dtype=np.int32) * alpha + 127) // 255


def _layout(rng: np.random.Generator, rows: np.ndarray, images: np.ndarray, canvas: int):
    """Sizes, tiles and positions for the digits ``rows`` such that every pair is apart along some axis.

    Positions are redrawn ``POSITION_TRIES`` times per draw of sizes, sizes ``SIZE_ROUNDS`` times (the last
    time all small); if that all fails the last digit is dropped (one digit always fits). Returns (rows,
    sizes, tiles, positions, ink boxes on the canvas).
    """
    while True:
        n = len(rows)
        for attempt in range(SIZE_ROUNDS):
            sizes = [SIZES[int(b)] for b in rng.integers(2, size=n)]
            if attempt == SIZE_ROUNDS - 1:
                sizes = ["small"] * n  # the last round tries the easiest layout
            tiles = []
            for row, size in zip(rows, sizes, strict=True):
                lo, hi = SIZE_RANGES[size]
                side = int(rng.integers(round(lo * canvas), round(hi * canvas) + 1))
                tiles.append(_tile(images[row], side))
            # all tries at once: top-left corners (tries, digits, xy), then ink boxes on the canvas
            highs = np.array([canvas - t.shape[0] + 1 for t, _ in tiles])
            corners = rng.integers(0, highs[None, :, None], size=(POSITION_TRIES, n, 2))
            boxes = np.array([b for _, b in tiles])[None] + np.concatenate([corners, corners], axis=2)
            ok = np.ones(POSITION_TRIES, dtype=bool)
            for i in range(n):
                for j in range(i + 1, n):
                    a, b = boxes[:, i].T, boxes[:, j].T
                    ok &= ((a[2] <= b[0] + RELATION_TOLERANCE) | (b[2] <= a[0] + RELATION_TOLERANCE)
                           | (a[3] <= b[1] + RELATION_TOLERANCE) | (b[3] <= a[1] + RELATION_TOLERANCE))
            if ok.any():
                k = int(np.argmax(ok))
                return rows, sizes, [t for t, _ in tiles], corners[k].tolist(), boxes[k].tolist()
        rows = rows[:-1]


def render_scene(images: np.ndarray, labels: np.ndarray, pool: np.ndarray, canvas: int, seed: int, split: str,
                 index: int) -> tuple[np.ndarray, dict]:
    """Scene ``index`` of ``split``: (uint8 image HxWx3, metadata with its caption). Depends only on the arguments."""
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    n = 1 + int(rng.choice(len(DIGIT_COUNT_WEIGHTS), p=DIGIT_COUNT_WEIGHTS))
    rows = pool[rng.integers(len(pool), size=n)]
    colours = [COLOURS[int(c)] for c in rng.integers(len(COLOURS), size=n)]
    background = int(rng.integers(BACKGROUND_MAX + 1))
    rows, sizes, tiles, positions, boxes = _layout(rng, rows, images, canvas)
    image = np.full((canvas, canvas, 3), background, dtype=np.int32)
    digits = []
    for row, size, tile, (x, y), box, colour in zip(rows, sizes, tiles, positions, boxes, colours, strict=False):
        _paint(image, tile, x, y, PALETTE[colour])
        digits.append({"label": int(labels[row]), "colour": colour, "size": size, "box": box, "source": int(row)})
    caption = make_caption(digits, rng)
    meta = {"key": _key(index), "split": split, "index": index, "caption": caption, "canvas": canvas,
            "background": background, "digits": digits}
    return image.astype(np.uint8), meta


def render_single_digit(digit: np.ndarray, canvas: int) -> np.ndarray:
    """One digit, white and centred on a black canvas (the single-digit evaluation images)."""
    tile, _ = _tile(digit, round(SINGLE_DIGIT_SIDE * canvas))
    image = np.zeros((canvas, canvas, 3), dtype=np.int32)
    offset = (canvas - tile.shape[0]) // 2
    _paint(image, tile, offset, offset, PALETTE["white"])
    return image.astype(np.uint8)


def _key(index: int) -> str:
    return f"{index:08d}"


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Storage: shards built in worker processes
# ---------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(images: np.ndarray, labels: np.ndarray, pools: dict[str, np.ndarray]) -> None:
    _WORKER.update(images=images, labels=labels, pools=pools)


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)  # mtime 0, uid/gid 0: identical bytes on every build
    info.size, info.mode = len(payload), 0o644
    tar.addfile(info, io.BytesIO(payload))


def _build_shard(task: tuple) -> list[dict]:
    """Write one shard (and the PNGs of its scenes when ``png_dir`` is set); return the scenes' metadata."""
    split, shard, start, stop, canvas, seed, out_dir, png_dir = task
    path = Path(out_dir) / split / f"{shard:05d}.tar"
    tmp = path.with_name(path.name + ".tmp")
    metas = []
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(start, stop):
            image, meta = render_scene(_WORKER["images"], _WORKER["labels"], _WORKER["pools"][split], canvas, seed,
                                       split, index)
            png = _png(image)
            key = meta["key"]
            _add(tar, f"{key}.png", png)
            _add(tar, f"{key}.txt", meta["caption"].encode("utf-8"))
            _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
            if png_dir is not None:
                (Path(png_dir) / f"{key}.png").write_bytes(png)
            metas.append(meta)
    os.replace(tmp, path)
    return metas


def check_build(n: dict[str, int], canvas: int, workers: int = 1, shard_size: int = SHARD_SIZE,
                formats: Sequence[str] = ("wds", "csv"), val_digits: int = VAL_DIGITS,
                test_digits: int = TEST_DIGITS) -> None:
    """ConfigError unless a corpus of ``n`` scenes per split (``{"train": ..., "val": ..., "test": ...}``) can be built."""
    for split, count in n.items():
        if count < 1:
            raise ConfigError(f"n_{split} must be at least 1, got {count}")
    if not MIN_CANVAS <= canvas <= MAX_CANVAS or canvas % PATCH_SIZE:
        raise ConfigError(f"canvas {canvas} is not allowed: use a multiple of {PATCH_SIZE} from {MIN_CANVAS} to "
                          f"{MAX_CANVAS} (smaller canvases leave too few pixels for three legible digits)")
    for split, pool in (("val", val_digits), ("test", test_digits)):
        if n[split] > pool * MAX_SCENES_PER_DIGIT:
            raise ConfigError(f"n_{split}={n[split]} is larger than the {split} pool allows: {pool} held-out digits "
                              f"x {MAX_SCENES_PER_DIGIT} scenes per digit = {pool * MAX_SCENES_PER_DIGIT}")
    if workers < 1 or shard_size < 1:
        raise ConfigError(f"workers and shard_size must be at least 1, got {workers} and {shard_size}")
    unknown = sorted(set(formats) - {"wds", "csv"})
    if unknown or "wds" not in formats:
        raise ConfigError(f"formats must be 'wds' or 'wds,csv' (shards are always written), got {','.join(formats)}")


def _paths(out_dir: Path, split: str, n_shards: int) -> tuple[str, Path, Path]:
    last = f"{n_shards - 1:05d}"
    pattern = str(out_dir / split / ("00000.tar" if n_shards == 1 else f"{{00000..{last}}}.tar"))
    return pattern, out_dir / split / "scenes.jsonl", out_dir / f"{split}.csv"


def _existing(out_dir: Path, stamp: dict) -> SceneCorpus | None:
    try:
        saved = json.loads((out_dir / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if {k: saved.get(k) for k in stamp} != stamp:
        return None
    corpus = _corpus(out_dir, saved)
    needed = [*corpus.metadata.values(), *corpus.digits_csv.values(), *(p for p in corpus.csv.values() if p)]
    needed += [out_dir / s / f"{i:05d}.tar" for s in SPLITS for i in range(saved["n_shards"][s])]
    return corpus if all(p.is_file() for p in needed) else None


def _corpus(out_dir: Path, stamp: dict) -> SceneCorpus:
    sizes = {s: stamp[f"n_{s}"] for s in SPLITS}
    paths = {s: _paths(out_dir, s, stamp["n_shards"][s]) for s in SPLITS}
    csv = {s: paths[s][2] if s in stamp["csv_splits"] else None for s in SPLITS}
    return SceneCorpus(out_dir, stamp["seed"], stamp["canvas"], sizes, {s: paths[s][0] for s in SPLITS},
                       {s: paths[s][1] for s in SPLITS}, csv, {s: out_dir / f"digits_{s}.csv" for s in HELD_OUT},
                       stamp)


def build_scene_corpus(out_dir: str | os.PathLike, n_train: int, n_val: int, n_test: int, seed: int = 0, *,
                       canvas: int = DEFAULT_CANVAS, workers: int = 1, formats: Sequence[str] = ("wds", "csv"),
                       shard_size: int = SHARD_SIZE, val_digits: int = VAL_DIGITS,
                       test_digits: int = TEST_DIGITS) -> SceneCorpus:
    """Build (or reuse) the scene corpus in ``out_dir``; see the module docstring for what is written.

    Deterministic for its parameters (``workers`` only changes the speed). A stamp written last marks a
    finished build: the same parameters return it at once; other parameters rebuild (the split folders,
    images and CSVs of ``out_dir`` are replaced). CSVs are written for splits of at most
    ``CSV_MAX_PAIRS`` scenes when ``formats`` has ``"csv"``.
    """
    n = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    formats = tuple(formats)
    check_build(n, canvas, workers, shard_size, formats, val_digits, test_digits)
    out_dir = Path(out_dir).resolve()
    csv_splits = [s for s in SPLITS if "csv" in formats and n[s] <= CSV_MAX_PAIRS]
    stamp = {"version": _STAMP_VERSION, "seed": int(seed), "canvas": canvas, "shard_size": shard_size,
             "val_digits": val_digits, "test_digits": test_digits, "csv_splits": csv_splits,
             **{f"n_{s}": n[s] for s in SPLITS}}
    existing = _existing(out_dir, stamp)
    if existing is not None:
        return existing

    started = time.perf_counter()
    try:
        images, labels = load_mnist_5k()
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from None
    pools = split_source_digits(labels, int(seed), val_digits, test_digits)
    (out_dir / STAMP_NAME).unlink(missing_ok=True)
    for name in (*SPLITS, "images", "digits"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    n_shards = {s: -(-n[s] // shard_size) for s in SPLITS}
    tasks = []
    for s in SPLITS:
        (out_dir / s).mkdir(parents=True)
        for i in range(n_shards[s]):
            png_dir = out_dir / "images" / s / f"{i:05d}" if s in csv_splits else None
            if png_dir is not None:
                png_dir.mkdir(parents=True)
            tasks.append((s, i, i * shard_size, min((i + 1) * shard_size, n[s]), canvas, int(seed), str(out_dir),
                          None if png_dir is None else str(png_dir)))
    if workers == 1 or len(tasks) == 1:
        _init_worker(images, labels, pools)
        results = [_build_shard(t) for t in tasks]
    else:
        with multiprocessing.get_context().Pool(workers, _init_worker, (images, labels, pools)) as pool:
            results = pool.map(_build_shard, tasks, chunksize=1)
    metas: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for task, result in zip(tasks, results, strict=True):
        metas[task[0]].extend(result)

    for s in SPLITS:
        pattern, meta_path, csv_path = _paths(out_dir, s, n_shards[s])
        sizes = {f"{i:05d}.tar": min(shard_size, n[s] - i * shard_size) for i in range(n_shards[s])}
        (out_dir / s / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n", encoding="utf-8")
        with meta_path.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(m, sort_keys=True) + "\n" for m in metas[s])
        if s in csv_splits:
            rows = [(out_dir / "images" / s / f"{m['index'] // shard_size:05d}" / f"{m['key']}.png", m["caption"],
                     " ".join(str(d["label"]) for d in m["digits"])) for m in metas[s]]
            write_tsv(csv_path, ("filepath", "title", "digits"), rows)
    for s in HELD_OUT:
        (out_dir / "digits" / s).mkdir(parents=True)
        rows = []
        for row in pools[s]:
            path = out_dir / "digits" / s / f"mnist_{row:04d}.png"
            path.write_bytes(_png(render_single_digit(images[row], canvas)))
            rows.append((path, int(labels[row])))
        write_tsv(out_dir / f"digits_{s}.csv", ("filepath", "label"), rows)
    (out_dir / "splits.json").write_text(json.dumps({s: pools[s].tolist() for s in SPLITS}) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - started
    stamp.update(n_shards=n_shards, build_seconds=round(seconds, 2), workers=workers,
                 pairs_per_second=round(sum(n.values()) / seconds, 1))
    (out_dir / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")
    return _corpus(out_dir, stamp)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m safe_train.scenes", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=20_000, help="training scenes (default 20,000)")
    p.add_argument("--val", type=int, default=2_000, help="validation scenes (default 2,000)")
    p.add_argument("--test", type=int, default=2_000, help="test scenes (default 2,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--canvas", type=int, default=DEFAULT_CANVAS, help=f"canvas side in pixels (default {DEFAULT_CANVAS})")
    p.add_argument("--workers", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="scenes per shard")
    p.add_argument("--formats", default="wds,csv", help="wds, or wds,csv (CSV only for splits of at most "
                   f"{CSV_MAX_PAIRS:,} scenes)")
    p.add_argument("--val-digits", type=int, default=VAL_DIGITS, help="MNIST-5k digits held out for validation")
    p.add_argument("--test-digits", type=int, default=TEST_DIGITS, help="MNIST-5k digits held out for test")
    args = p.parse_args(argv)
    try:
        corpus = build_scene_corpus(args.out, args.train, args.val, args.test, args.seed, canvas=args.canvas,
                                    workers=args.workers, formats=[f.strip() for f in args.formats.split(",")],
                                    shard_size=args.shard_size, val_digits=args.val_digits,
                                    test_digits=args.test_digits)
    except (SafeTrainError, OSError) as e:
        return report(e, "safe_train.scenes")
    for s in SPLITS:
        print(f"{s}: {corpus.sizes[s]} scenes in {corpus.shards[s]}" + (f", {corpus.csv[s]}" if corpus.csv[s] else ""))
    for s in HELD_OUT:
        print(f"single digits ({s}): {corpus.digits_csv[s]}")
    stamp = corpus.stamp
    print(f"model: {' '.join(corpus.model_flags())}; built in {stamp['build_seconds']} s "
          f"({stamp['pairs_per_second']} pairs/s, {stamp['workers']} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
