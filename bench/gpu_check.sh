#!/usr/bin/env bash
# The prepared GPU check: run once on a lent GPU machine (see BENCHMARKS.md for recorded results).
# Installs nothing and needs no network. Writes everything under $OUT (default bench/gpu_out):
#   env.txt        GPU, driver, torch/triton versions
#   pytest_gpu.txt the GPU-marked tests and the kernel tests compiled for CUDA
#   kernels.json / kernels.md   bench/kernels.py: attention and softmax throughput, with the matmul peak
#   train.txt      a short bf16 training run with flash attention (only where deepspeed and webdataset import)
# Usage: OUT=/path bash bench/gpu_check.sh   (about 5 minutes on an H200)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0  # tests/conftest.py turns the CPU interpreter on unless this says otherwise

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# GPU tests: kernels compiled for CUDA at full size, plus anything else marked gpu.
timeout 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/model 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -5

timeout 300 $PY bench/kernels.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.md" | tail -40

if $PY -c "import deepspeed, webdataset" 2>/dev/null; then
  tmp=$(mktemp -d)
  cat README.md megalm/*.py megalm/*/*.py kernels/*.py > "$tmp/corpus.txt"  # ~0.3 MB of text, no download
  $PY -m megalm.cli prepare --input "$tmp/corpus.txt" --tokenizer bytes --output "$tmp/data" --val-fraction 0.1
  timeout 240 $PY launcher/pretrain.py --config configs/tiny.yaml data.train="$tmp/data/train" \
      data.val="$tmp/data/val" data.tokenizer=bytes model.vocab_size=320 precision.dtype=bf16 \
      model.attention=flash train.max_steps=50 train.run_dir="$tmp/run" train.resume=none 2>&1 | tee "$OUT/train.txt" | tail -8
else
  echo "deepspeed/webdataset not importable here: training run skipped (carry them as wheels, see the device README)" \
    | tee "$OUT/train.txt"
fi
