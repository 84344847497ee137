#!/bin/bash
# Pack what a bare GPU machine lacks for benchmarks/gpu_smoke.py into .gpu_carry/ (ignored by git), within the
# device tool's 64 MiB carry limit: wheels of open_clip_torch, ftfy, wcwidth, webdataset, braceexpand, nltk and
# safe-train itself for the device's Python (DEVICE_PYTHON, default 3.12), and WordNet (zipped) for EDA captions.
# The machine already has torch, torchvision, timm, transformers, scikit-learn, scipy, numpy, pillow, pyyaml.
# Then, on the device (the `run` tool with carry [".gpu_carry"]):
#   pip install --no-index --no-deps -q .gpu_carry/wheels/*.whl &&
#   NLTK_DATA=$PWD/.gpu_carry/nltk_data python benchmarks/gpu_smoke.py --out $OUT/smoke
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu_carry
PY="${DEVICE_PYTHON:-3.12}"
# the versions this checkout is tested with (pyproject allows newer ones)
OPEN_CLIP="$(python -c 'import importlib.metadata as m; print(m.version("open_clip_torch"))')"
WEBDATASET="$(python -c 'import importlib.metadata as m; print(m.version("webdataset"))')"
rm -rf "$DEST"
mkdir -p "$DEST/wheels" "$DEST/nltk_data/corpora"
pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$PY" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$DEST/wheels" "open_clip_torch==$OPEN_CLIP" ftfy wcwidth "webdataset==$WEBDATASET" braceexpand "nltk>=3.8"
pip wheel --quiet --no-deps --no-build-isolation -w "$DEST/wheels" .
# WordNet: the corpus nltk finds here (python -m safe_train.augment install-wordnet puts one there), zipped
# as nltk's downloader ships it (corpora/wordnet.zip holding wordnet/).
CORPUS="$(python -c 'import nltk; print(nltk.data.find("corpora/wordnet"))')"
(cd "$(dirname "$CORPUS")" && python -m zipfile -c "$OLDPWD/$DEST/nltk_data/corpora/wordnet.zip" wordnet)
du -sh "$DEST"/wheels "$DEST"/nltk_data
echo "carry: .gpu_carry ($(du -sm "$DEST" | cut -f1) MiB; the limit is 64 MiB with the working tree)"
