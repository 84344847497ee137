"""Make a poisoned copy of an OpenCLIP training set, with a manifest of exactly what was poisoned.

    python -m safe_train.poison data/train.csv out/badnets --attack badnets --count 40 --target zero \\
        --templates mnist --image-size 32 --seed 0

Input and output are in OpenCLIP's own formats (a CSV, or webdataset shards), so the output trains
with the stock ``--train-data``. Clean samples are copied byte for byte; poisoned images are PNG
(lossless: JPEG would smear a 3×3 patch) at the model's input resolution. See docs/attacks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from safe_train.attacks.captions import fill_template, load_templates, mentions_target
from safe_train.attacks.datasets import (
    format_csv_row,
    line_ending,
    read_csv_table,
    rewrite_shard,
    scan_shard,
    write_shard,
)
from safe_train.attacks.triggers import (
    TARGETED,
    Trigger,
    attack_names,
    build_trigger,
    resize_to_model,
    trigger_params,
)
from safe_train.errors import ConfigError, PoisonError, SafeTrainError, report
from safe_train.manifest import MANIFEST_NAME, Manifest
from safe_train.sample_ids import webdataset_sample_id

CSV_NAME = "train.csv"
IMAGES_DIR = "images"
TARGETED_KEY = "targeted_{:06d}"
PROG = "safe-train poison"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _open_rgb(source: str | Path | bytes, what: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise PoisonError(f"cannot read the image of {what}: {exc}") from exc


def _check_amount(rate: float | None, count: int | None) -> None:
    """Validate rate/count before any data is read."""
    if (rate is None) == (count is None):
        raise PoisonError("give exactly one of rate (fraction of the dataset) or count (number of samples)")
    if rate is not None and not 0.0 < rate <= 1.0:
        raise PoisonError(f"rate must be in (0, 1], got {rate}")
    if count is not None and (
        isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1
    ):
        raise PoisonError(f"count must be a positive integer, got {count!r}")


def _resolve_count(rate: float | None, count: int | None, n: int) -> int:
    """The number of samples to poison (or, for targeted, to append) in a dataset of n samples."""
    _check_amount(rate, count)
    if rate is not None:
        k = round(rate * n)
        if k < 1:
            raise PoisonError(f"rate {rate} of {n} samples rounds to 0 poisoned samples; use a count instead")
        return k
    return int(count)  # type: ignore[arg-type]


def _choose(eligible: list[int], k: int, rng: np.random.Generator, what: str) -> list[int]:
    """k of the eligible positions, uniformly without replacement, in data order."""
    if not eligible:
        raise PoisonError(f"no eligible samples: {what}")
    if k > len(eligible):
        raise PoisonError(f"{k} poisoned samples requested but only {len(eligible)} are eligible ({what})")
    picks = rng.choice(len(eligible), size=k, replace=False)
    return sorted(eligible[i] for i in picks)


class _Plan:
    """Everything decided before any data is read: validated options, trigger, templates, generators."""

    def __init__(
        self,
        attack: str,
        target: str,
        templates: str,
        image_size: int,
        seed: int,
        attack_params: dict[str, Any],
    ) -> None:
        names = attack_names()
        if attack not in names:
            raise PoisonError(f"unknown attack {attack!r}; choose from {', '.join(names)}")
        if not target.strip():
            raise PoisonError("target must be a non-empty word")
        if not isinstance(seed, int) or seed < 0:
            raise PoisonError(f"seed must be a non-negative integer, got {seed!r}")
        self.attack, self.target, self.image_size, self.seed = attack, target, image_size, seed
        self.templates_spec = templates
        self.templates = load_templates(templates)
        self.trigger: Trigger | None = None
        self.targeted_png = b""
        if attack == TARGETED:
            unknown = sorted(set(attack_params) - {"targeted_image"})
            if unknown:
                raise PoisonError(f"attack 'targeted' has no parameter(s) {unknown}; it takes targeted_image")
            image = attack_params.get("targeted_image")
            if not image:
                raise PoisonError("the targeted attack needs targeted_image (--targeted-image PATH)")
            path = Path(image).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"targeted image not found: {image}")
            self.params: dict[str, Any] = {"targeted_image": str(path.resolve())}
            self.targeted_png = _png(resize_to_model(_open_rgb(path, "the targeted image"), image_size))
        else:
            self.trigger = build_trigger(attack, image_size, seed, **attack_params)
            self.params = self.trigger.params
        select_seq, caption_seq = np.random.SeedSequence(seed).spawn(2)
        self.select_rng = np.random.default_rng(select_seq)
        self.caption_rng = np.random.default_rng(caption_seq)

    def eligible(self, captions: list[str | None]) -> tuple[list[int], str]:
        """Positions this attack may poison, and a description for error messages."""
        if self.attack == "label_consistent":
            return (
                [i for i, c in enumerate(captions) if c is not None and mentions_target(c, self.target)],
                f"captions that mention {self.target!r}",
            )
        return (
            [i for i, c in enumerate(captions) if c is not None and not mentions_target(c, self.target)],
            f"captions that do not mention {self.target!r}",
        )

    def template_caption(self) -> str:
        return fill_template(self.templates[int(self.caption_rng.integers(len(self.templates)))], self.target)

    def new_captions(self, originals: list[str]) -> list[str]:
        """Captions of the chosen samples: a random template naming the target (label-consistent: unchanged)."""
        if self.attack == "label_consistent":
            return list(originals)
        return [self.template_caption() for _ in originals]

    def targeted_captions(self, captions: list[str | None], k: int) -> list[tuple[str, int | None]]:
        """k (caption, source position) pairs: training captions naming the target, topped up from templates."""
        pool = [i for i, c in enumerate(captions) if c is not None and mentions_target(c, self.target)]
        if len(pool) > k:
            pool = sorted(pool[i] for i in self.caption_rng.choice(len(pool), size=k, replace=False))
        chosen: list[tuple[str, int | None]] = [(captions[i], i) for i in pool]  # type: ignore[misc]
        return chosen + [(self.template_caption(), None) for _ in range(k - len(chosen))]

    def poison_image(self, img: Image.Image) -> bytes:
        assert self.trigger is not None
        return _png(self.trigger(resize_to_model(img, self.image_size)))


def _prepare_out_dir(out_dir: str | os.PathLike) -> tuple[Path, bool]:
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PoisonError(f"output directory {out} exists and is not empty; choose a new one")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return out, created


def _is_webdataset(src: str) -> bool:
    return any(part.strip().endswith(".tar") or "{" in part for part in src.split("::"))


def poison_dataset(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    attack: str,
    *,
    rate: float | None = None,
    count: int | None = None,
    target: str = "banana",
    templates: str = "openai",
    image_size: int = 224,
    seed: int = 0,
    csv_img_key: str = "filepath",
    csv_caption_key: str = "title",
    csv_separator: str = "\t",
    **attack_params: Any,
) -> Manifest:
    """Write a poisoned copy of ``src`` (a CSV, or webdataset shards) into ``out_dir``; return its manifest.

    Backdoor attacks (badnets, blended, sig, wanet) stamp the trigger on ``count`` (or ``round(rate·N)``)
    random samples whose caption does not name ``target`` and give them a template caption naming it;
    ``label_consistent`` stamps the BadNets patch on samples whose caption already names ``target``;
    ``targeted`` appends ``count`` pairs of one outside image (``targeted_image``) with captions naming
    ``target``. ``attack_params`` go to the trigger (see ``safe_train.attacks.build_trigger``).
    """
    plan = _Plan(attack, target, templates, image_size, seed, attack_params)
    _check_amount(rate, count)
    src = os.fspath(src)
    webdataset = _is_webdataset(src)
    sep = "\t" if csv_separator == "\\t" else csv_separator
    if not webdataset:
        if len(sep) != 1:
            raise PoisonError(f"csv_separator must be one character, got {csv_separator!r}")
        if not Path(src).is_file():
            raise FileNotFoundError(f"input CSV not found: {src}")
    out, created = _prepare_out_dir(out_dir)
    try:
        if webdataset:
            manifest = _poison_webdataset(src, out, plan, rate, count)
        else:
            manifest = _poison_csv(Path(src), out, plan, rate, count, csv_img_key, csv_caption_key, sep)
        manifest.rate = rate
        manifest.save(out / MANIFEST_NAME)  # written last: a manifest means a complete output
        return manifest
    except BaseException:  # out was empty (or new): everything in it is ours, remove the partial output
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def _manifest(
    plan: _Plan,
    fmt: str,
    num_samples: int,
    ids: list[int],
    samples: list[dict[str, Any]],
    source: str,
    data: str,
) -> Manifest:
    return Manifest(
        attack=plan.attack,
        params=plan.params,
        target=plan.target,
        seed=plan.seed,
        format=fmt,
        image_size=plan.image_size,
        num_samples=num_samples,
        poisoned_ids=ids,
        samples=samples,
        source=source,
        data=data,
        templates=plan.templates_spec,
    )


def _poison_csv(
    src: Path,
    out: Path,
    plan: _Plan,
    rate: float | None,
    count: int | None,
    img_key: str,
    caption_key: str,
    sep: str,
) -> Manifest:
    table = read_csv_table(src, sep)
    img_col, cap_col = table.column(img_key, str(src)), table.column(caption_key, str(src))
    rows = table.rows
    captions: list[str | None] = [r.fields[cap_col] for r in rows]  # type: ignore[index]
    n = len(rows)
    k = _resolve_count(rate, count, n)
    images_dir = out / IMAGES_DIR
    images_dir.mkdir()
    samples: list[dict[str, Any]] = []
    new_text: dict[int, str] = {}  # row -> replacement record text
    terminator = line_ending(table.header.raw) or "\n"  # for rows that had none (a last line)
    appended = ""

    if plan.attack == TARGETED:
        image_path = images_dir / "targeted.png"
        image_path.write_bytes(plan.targeted_png)
        for i, (caption, source) in enumerate(plan.targeted_captions(captions, k)):
            fields = [""] * len(table.columns)
            fields[img_col], fields[cap_col] = str(image_path), caption
            appended += format_csv_row(fields, sep, terminator)
            samples.append(
                {
                    "sample_id": n + i,
                    "row": n + i,
                    "original_image": None,
                    "image": str(image_path),
                    "original_caption": None,
                    "caption": caption,
                    "caption_source_id": source,
                }
            )
    else:
        eligible, what = plan.eligible(captions)
        chosen = _choose(eligible, k, plan.select_rng, what)
        for row, caption in zip(chosen, plan.new_captions([captions[r] for r in chosen]), strict=True):
            record = rows[row]
            fields = list(record.fields)  # type: ignore[arg-type]
            original = fields[img_col]
            img = _open_rgb(
                original,
                f"row {row} ({original}; relative paths are resolved against the "
                "current directory, as OpenCLIP does)",
            )
            image_path = images_dir / f"{row:08d}.png"
            image_path.write_bytes(plan.poison_image(img))
            fields[img_col], fields[cap_col] = str(image_path), caption
            new_text[row] = format_csv_row(fields, sep, line_ending(record.raw) or terminator)
            samples.append(
                {
                    "sample_id": row,
                    "row": row,
                    "original_image": original,
                    "image": str(image_path),
                    "original_caption": captions[row],
                    "caption": caption,
                }
            )

    dst = out / CSV_NAME
    with open(dst, "w", encoding="utf-8", newline="") as handle:
        handle.write(table.header.raw)
        row = 0
        last = ""
        for record in table.records:
            if record.fields is None:
                text = record.raw
            else:
                text = new_text.get(row, record.raw)
                row += 1
            handle.write(text)
            last = text
        if appended:
            if last and not line_ending(last):
                handle.write(terminator)
            handle.write(appended)
    ids = [s["sample_id"] for s in samples]
    return _manifest(
        plan, "csv", n + (k if plan.attack == TARGETED else 0), ids, samples, str(src.resolve()), str(dst)
    )


def _expand_shards(src: str) -> list[str]:
    import braceexpand  # deferred: only webdataset input needs it

    urls = [url for part in src.split("::") for url in braceexpand.braceexpand(part.strip())]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    names = [Path(u).name for u in urls]
    if len(set(names)) != len(names):
        raise PoisonError("two input shards share a file name; the output (and sample ids) need unique names")
    return urls


def _output_pattern(src: str, out: Path, names: list[str]) -> str:
    """What to pass as --train-data for the output: the input pattern moved to ``out``."""
    parts = [part.strip() for part in src.split("::")]
    if all("{" not in os.path.dirname(p) for p in parts):
        return "::".join(str(out / os.path.basename(p)) for p in parts)
    return "::".join(str(out / name) for name in names)


def _poison_webdataset(src: str, out: Path, plan: _Plan, rate: float | None, count: int | None) -> Manifest:
    urls = _expand_shards(src)
    names = [Path(u).name for u in urls]
    usable = [s for url in urls for s in scan_shard(url) if s.usable]
    captions: list[str | None] = [s.caption for s in usable]
    n = len(usable)
    k = _resolve_count(rate, count, n)
    sizes = {name: 0 for name in names}
    for s in usable:
        sizes[s.shard] += 1
    samples: list[dict[str, Any]] = []
    data = _output_pattern(src, out, names)

    if plan.attack == TARGETED:
        extra = "targeted.tar"
        while extra in sizes:
            extra = "_" + extra
        pairs = plan.targeted_captions(captions, k)
        keys = [TARGETED_KEY.format(i) for i in range(k)]
        for url in urls:
            shutil.copyfile(url, out / Path(url).name)
        write_shard(
            out / extra, [(key, plan.targeted_png, c) for key, (c, _) in zip(keys, pairs, strict=True)]
        )
        sizes[extra] = k
        data += f"::{out / extra}"
        for key, (caption, source) in zip(keys, pairs, strict=True):
            src_id = (
                None if source is None else webdataset_sample_id(usable[source].shard, usable[source].key)
            )
            samples.append(
                {
                    "sample_id": webdataset_sample_id(extra, key),
                    "shard": extra,
                    "key": key,
                    "original_image": None,
                    "image": f"{key}.png",
                    "original_caption": None,
                    "caption": caption,
                    "caption_source_id": src_id,
                }
            )
    else:
        eligible, what = plan.eligible(captions)
        chosen = _choose(eligible, k, plan.select_rng, what)
        new = plan.new_captions([captions[i] for i in chosen])
        per_shard: dict[str, dict[str, tuple[str, str]]] = {}
        for i, caption in zip(chosen, new, strict=True):
            s = usable[i]
            per_shard.setdefault(s.shard, {})[s.key] = (s.image_member, caption)  # type: ignore[assignment]
            samples.append(
                {
                    "sample_id": webdataset_sample_id(s.shard, s.key),
                    "shard": s.shard,
                    "key": s.key,
                    "original_image": s.image_member,
                    "image": f"{s.key}.png",
                    "original_caption": s.caption,
                    "caption": caption,
                }
            )
        for url in urls:
            name = Path(url).name
            if name not in per_shard:
                shutil.copyfile(url, out / name)
                continue

            def make_image(original: bytes, key: str, name: str = name) -> bytes:
                return plan.poison_image(_open_rgb(original, f"sample {key} of shard {name}"))

            rewrite_shard(url, out / name, per_shard[name], make_image)

    (out / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n", encoding="utf-8")
    ids = sorted(s["sample_id"] for s in samples)
    return _manifest(
        plan,
        "webdataset",
        sum(sizes.values()),
        ids,
        samples,
        "::".join(os.path.abspath(p.strip()) for p in src.split("::")),
        data,
    )


# ------------------------------------------------------------------------------------------ CLI

_PARAM_FLAGS = {
    "patch_size": "--patch-size",
    "location": "--location",
    "pattern": "--pattern",
    "alpha": "--alpha",
    "fresh": "--fresh",
    "amplitude": "--amplitude",
    "frequency": "--frequency",
    "strength": "--strength",
    "grid_size": "--grid-size",
    "targeted_image": "--targeted-image",
}


def _number(text: str) -> float:
    """A float, also written as a fraction ("60/255")."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError) as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write a poisoned copy of an OpenCLIP training set (CSV or webdataset) plus manifest.json "
        "listing every poisoned sample. Triggers are applied after resizing images to the model's "
        "input resolution; poisoned images are stored as PNG.",
    )
    p.add_argument(
        "src",
        help="input: a CSV file (OpenCLIP format) or webdataset shards, e.g. "
        "'/data/{00000..00009}.tar' (quote it)",
    )
    p.add_argument("out_dir", help="output directory (must not exist or be empty)")
    p.add_argument("--attack", required=True, choices=attack_names(), help="the attack")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--rate", type=_number, help="fraction of the dataset's samples to poison, in (0, 1]")
    amount.add_argument("--count", type=int, help="number of samples to poison (targeted: pairs to append)")
    p.add_argument("--target", default="banana", help="target class word (default: banana)")
    p.add_argument(
        "--templates",
        default="openai",
        help="caption templates: 'openai' (80 ImageNet templates), 'mnist' (8 digit templates) or "
        "a text file with one template per line containing {} (default: openai)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="the model's input resolution; images are resized to it before the trigger (default 224)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for sample choice, captions and trigger (default 0)"
    )
    p.add_argument("--csv-img-key", default="filepath", help="CSV image path column (default filepath)")
    p.add_argument("--csv-caption-key", default="title", help="CSV caption column (default title)")
    p.add_argument("--csv-separator", default="\t", help="CSV separator; '\\t' means tab (default tab)")
    g = p.add_argument_group("trigger parameters (each only for the attacks named)")
    g.add_argument(
        "--patch-size", type=int, help="badnets, label_consistent: patch side in pixels (default 3)"
    )
    g.add_argument(
        "--location",
        choices=("bottom_right", "random"),
        help="badnets, label_consistent: patch position (default bottom_right)",
    )
    g.add_argument(
        "--pattern",
        help="badnets, label_consistent: checkerboard (default) or noise; "
        "blended: noise (default) or the path of an image",
    )
    g.add_argument("--alpha", type=_number, help="blended: blend weight of the pattern (default 0.2)")
    g.add_argument(
        "--fresh",
        action="store_const",
        const=True,
        help="blended: fresh noise per image instead of one fixed noise image",
    )
    g.add_argument("--amplitude", type=_number, help="sig: amplitude on the [0, 1] scale (default 60/255)")
    g.add_argument("--frequency", type=_number, help="sig: periods across the image width (default 6)")
    g.add_argument("--strength", type=_number, help="wanet: maximum warp offset in pixels (default 1)")
    g.add_argument("--grid-size", type=int, help="wanet: control grid side of the flow field (default 4)")
    g.add_argument("--targeted-image", help="targeted: the outside image to be classified as the target")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 on success, 2 with one message on stderr on bad input."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already explained
        return int(exc.code or 0)
    given = {name: getattr(args, name) for name in _PARAM_FLAGS if getattr(args, name) is not None}
    allowed = trigger_params(args.attack)
    wrong = [_PARAM_FLAGS[name] for name in given if name not in allowed]
    if wrong:
        # a plugin attack's own parameters have no flag: they are given from Python (poison_dataset)
        takes = ", ".join(_PARAM_FLAGS[a] for a in allowed if a in _PARAM_FLAGS) or "no trigger options"
        return report(ConfigError(f"{', '.join(wrong)} does not apply to --attack {args.attack} (it takes {takes})"),
                      PROG)
    try:
        manifest = poison_dataset(
            args.src,
            args.out_dir,
            args.attack,
            rate=args.rate,
            count=args.count,
            target=args.target,
            templates=args.templates,
            image_size=args.image_size,
            seed=args.seed,
            csv_img_key=args.csv_img_key,
            csv_caption_key=args.csv_caption_key,
            csv_separator=args.csv_separator,
            **given,
        )
    except SafeTrainError as exc:
        return report(exc, PROG)
    except OSError as exc:  # a missing or unreadable input file: also the user's to fix
        return report(PoisonError(str(exc)), PROG)
    out = Path(args.out_dir).resolve()
    print(
        f"{manifest.attack}: poisoned {manifest.num_poisoned} of {manifest.num_samples} samples "
        f"(target {manifest.target!r}, seed {manifest.seed})"
    )
    hint = f"--train-data '{manifest.data}'"
    if manifest.format == "csv":
        for flag, value, default in (
            ("--csv-img-key", args.csv_img_key, "filepath"),
            ("--csv-caption-key", args.csv_caption_key, "title"),
            ("--csv-separator", args.csv_separator, "\t"),
        ):
            if value != default and not (flag == "--csv-separator" and value == "\\t"):
                hint += f" {flag} '{value}'"
    print(f"train with: {hint}")
    print(f"manifest: {out / MANIFEST_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
