"""Reading and rewriting OpenCLIP training data without touching what is not poisoned.

CSV: every record keeps its exact source text (quoting, line ending), so clean rows are copied byte
for byte; only poisoned rows are re-serialised. Rows are counted the way OpenCLIP's
``pd.read_csv(sep=...)`` counts them (header excluded, empty lines skipped), so row ids match
``safe_train.sample_ids``.

webdataset: samples are grouped like ``webdataset.tariterators.group_by_keys`` (consecutive members
sharing the name up to the first dot of the file name; suffixes lower-cased) and the image is the
first of ``jpg;png;jpeg;webp`` present, as in OpenCLIP's pipeline. ``scan_shard(..., read_json=True)``
also returns each sample's ``json`` member (the scene corpus keeps its labels there).
"""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from safe_train.errors import DataError

IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")  # OpenCLIP's rename(image="jpg;png;jpeg;webp") order
_META = re.compile(r"__[^/]*__($|/)")  # webdataset skips such members
_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


# ----------------------------------------------------------------------------------------- CSV


@dataclass
class CsvRecord:
    """One record: its exact text (with line ending) and parsed fields (None: an empty line)."""

    raw: str
    fields: list[str] | None


@dataclass
class CsvTable:
    header: CsvRecord
    columns: list[str]
    records: list[CsvRecord]  # in file order, empty lines included

    @property
    def rows(self) -> list[CsvRecord]:
        """The data rows, indexed by sample id."""
        return [r for r in self.records if r.fields is not None]

    def column(self, name: str, path: str) -> int:
        if name not in self.columns:
            raise DataError(f"{path}: no column {name!r}; columns are {self.columns}")
        return self.columns.index(name)


class _LineTap:
    """Feeds lines to csv.reader and remembers them, to recover each record's raw text."""

    def __init__(self, lines: Iterator[str]) -> None:
        self.lines, self.taken = lines, []

    def __iter__(self) -> _LineTap:
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.taken.append(line)
        return line

    def pop(self) -> str:
        raw, self.taken = "".join(self.taken), []
        return raw


def read_csv_table(path: str | Path, sep: str) -> CsvTable:
    """Parse ``path`` keeping each record's source text."""
    with open(path, encoding="utf-8", newline="") as handle:
        tap = _LineTap(iter(handle))
        records: list[CsvRecord] = []
        for fields in csv.reader(tap, delimiter=sep):
            records.append(CsvRecord(tap.pop(), fields or None))
    while records and records[0].fields is None:  # pandas skips leading empty lines too
        records.pop(0)
    if not records:
        raise DataError(f"{path}: empty CSV (no header)")
    header, body = records[0], records[1:]
    columns = [c.lstrip("\ufeff") if i == 0 else c for i, c in enumerate(header.fields or [])]
    for number, record in enumerate(r for r in body if r.fields is not None):
        if len(record.fields) != len(columns):
            raise DataError(
                f"{path}: data row {number} has {len(record.fields)} fields, the header has {len(columns)}"
            )
    return CsvTable(header, columns, body)


def line_ending(raw: str) -> str:
    """The line terminator a record's text ends with ('' for a last line without one)."""
    for end in ("\r\n", "\n", "\r"):
        if raw.endswith(end):
            return end
    return ""


def format_csv_row(fields: list[str], sep: str, terminator: str) -> str:
    """A row as text that ``pd.read_csv(sep=sep)`` reads back as ``fields``."""
    buf = io.StringIO()
    csv.writer(buf, delimiter=sep, lineterminator=terminator, quoting=csv.QUOTE_MINIMAL).writerow(fields)
    return buf.getvalue()


# ---------------------------------------------------------------------------------- webdataset


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """(key, lower-cased suffix) of a tar member, or (None, None) if it belongs to no sample."""
    if _META.match(name):
        return None, None
    match = _NAME.match(name)
    if not match:
        return None, None
    return match.group(1), match.group(2).lower()


@dataclass
class WdsSample:
    """One sample of a shard: its key, the member OpenCLIP would use as image, its caption (and json)."""

    shard: str  # shard file name
    key: str
    image_member: str | None
    caption: str | None
    json_text: str | None = None  # the ``json`` member's text, when scanned with read_json=True

    @property
    def usable(self) -> bool:
        """Whether OpenCLIP trains on it (it drops samples without image or caption)."""
        return self.image_member is not None and self.caption is not None


def scan_shard(path: str | Path, read_json: bool = False) -> list[WdsSample]:
    """The samples of one shard, in order; with ``read_json`` each one's ``json`` member too (or None)."""
    samples: list[WdsSample] = []
    current: dict[str, tarfile.TarInfo] = {}
    current_key: str | None = None

    def flush() -> None:
        if current_key is None:
            return
        image = next((current[ext].name for ext in IMAGE_EXTS if ext in current), None)
        caption = None
        if "txt" in current:
            member = tar.extractfile(current["txt"])
            caption = member.read().decode("utf-8", errors="replace") if member else ""
        meta = None
        if read_json and "json" in current:
            member = tar.extractfile(current["json"])
            meta = member.read().decode("utf-8", errors="replace") if member else ""
        samples.append(WdsSample(Path(path).name, current_key, image, caption, meta))

    with tarfile.open(path, "r:*") as tar:
        for info in tar:
            key, suffix = split_member_name(info.name) if info.isreg() else (None, None)
            if key is None:
                continue
            if key != current_key:
                flush()
                current, current_key = {}, key
            current.setdefault(suffix, info)
        flush()
    return samples


def _new_member(name: str, data: bytes, like: tarfile.TarInfo) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A fresh regular member (no inherited pax headers), dated like the member it replaces."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(like.mtime), 0o644
    return info, io.BytesIO(data)


def rewrite_shard(
    src: str | Path,
    dst: str | Path,
    poisoned: dict[str, tuple[str, str]],
    make_image: Callable[[bytes, str], bytes],
) -> None:
    """Copy shard ``src`` to ``dst`` member by member, replacing the poisoned samples.

    ``poisoned`` maps key -> (image member OpenCLIP uses, new caption). A poisoned sample's image
    members are all dropped and ``<key>.png`` (``make_image(original bytes, key)``) takes the place of
    the first one; its ``txt`` gets the new caption. Every other member is copied unchanged.
    """
    with tarfile.open(src, "r:*") as tar, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as out:
        members = tar.getmembers()
        by_name = {m.name: m for m in members}
        written: set[str] = set()
        for info in members:
            key, suffix = split_member_name(info.name) if info.isreg() else (None, None)
            if key not in poisoned:
                out.addfile(info, tar.extractfile(info) if info.isreg() else None)
                continue
            image_member, caption = poisoned[key]
            if suffix in IMAGE_EXTS:
                if key not in written:
                    original = tar.extractfile(by_name[image_member]).read()
                    out.addfile(*_new_member(f"{key}.png", make_image(original, key), info))
                    written.add(key)
            elif suffix == "txt":
                out.addfile(*_new_member(info.name, caption.encode("utf-8"), info))
            else:
                out.addfile(info, tar.extractfile(info))


def write_shard(dst: str | Path, samples: list[tuple[str, bytes, str]], mtime: int = 0) -> None:
    """A new shard of (key, PNG bytes, caption) samples, members ``<key>.png`` then ``<key>.txt``."""
    like = tarfile.TarInfo()
    like.mtime = mtime
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as out:
        for key, png, caption in samples:
            out.addfile(*_new_member(f"{key}.png", png, like))
            out.addfile(*_new_member(f"{key}.txt", caption.encode("utf-8"), like))


# ------------------------------------------------------------------------------------- labels


def parse_label_cell(text: str) -> set[int]:
    """The classes of a CSV label cell: space-separated integer class indices ("7 2"; "" is no class).

    ValueError if a token is not a non-negative integer.
    """
    labels = set()
    for token in text.split():
        if not token.isdigit():
            raise ValueError(f"{token!r} is not a class index")
        labels.add(int(token))
    return labels


def labels_from_json(text: str | None, key: str) -> set[int]:
    """The classes of a webdataset sample from its ``json`` member: the value under ``key``.

    The value may be a list whose items are integers or objects with an integer ``label`` (the scene
    corpus: ``"digits": [{"label": 7, ...}, ...]``), a single integer, or a string of space-separated
    integers (as in a CSV cell). ValueError if the sample has no ``json``, the json has no ``key``, or a
    value is not a class index.
    """
    if text is None:
        raise ValueError("the sample has no json member")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"its json is not valid ({exc})") from exc
    if not isinstance(meta, dict) or key not in meta:
        raise ValueError(f"its json has no {key!r} key")
    value = meta[key]
    if isinstance(value, str):
        return parse_label_cell(value)
    items = value if isinstance(value, list) else [value]
    labels = set()
    for item in items:
        label = item.get("label") if isinstance(item, dict) else item
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise ValueError(
                f"{key!r} holds {item!r}, not a class index (or an object with an integer 'label')"
            )
        labels.add(label)
    return labels
