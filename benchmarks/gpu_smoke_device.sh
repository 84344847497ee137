#!/bin/bash
# What a lent GPU machine runs (the device tool: command `bash benchmarks/gpu_smoke_device.sh`, carry
# [".gpu_carry"], built here first with benchmarks/gpu_smoke_pack.sh). Installs the carried wheels offline,
# prints the machine, runs benchmarks/gpu_smoke.py, and leaves smoke.json and the log under $OUT.
set -uo pipefail
OUT="${OUT:-gpu_smoke_out}"
mkdir -p "$OUT"
python3 -m pip install --no-index --no-deps -q .gpu_carry/wheels/*.whl || exit 3
export NLTK_DATA="$PWD/.gpu_carry/nltk_data" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import torch, open_clip, webdataset; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "open_clip", open_clip.__version__, "webdataset", webdataset.__version__)'
python3 benchmarks/gpu_smoke.py --device cuda --out /tmp/gpu_smoke "$@" 2>&1 | tee "$OUT/smoke.log"
rc=${PIPESTATUS[0]}
cp /tmp/gpu_smoke/smoke.json "$OUT/" 2>/dev/null || true
tar -czf "$OUT/logs.tar.gz" --exclude='*.pt' -C /tmp/gpu_smoke logs 2>/dev/null || true
exit "$rc"
