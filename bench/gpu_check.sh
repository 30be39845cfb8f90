#!/usr/bin/env bash
# The prepared GPU check: run once on a lent GPU machine (see BENCHMARKS.md for recorded results).
# Installs nothing and needs no network. Writes everything under $OUT (default bench/gpu_out), 7 files:
#   env.txt        GPU, driver, torch/triton versions
#   llama_1b.txt   100 steps of configs/llama_1b.yaml (1.1B Llama, seq 4096, bf16, flash attention) on byte-level
#                  shards of this repository's text; llama_1b.json: its tokens/s, TFLOP/s, MFU and peak memory
#                  (mean over the rows after the first 10 steps, which include Triton compilation)
#   pytest_gpu.txt the GPU-marked tests and the kernel tests compiled for CUDA
#   kernels.json / kernels.md   bench/kernels.py: attention and softmax throughput, with the matmul peak
#   train.txt      a short bf16 run of the tiny config with flash attention
# Training needs deepspeed and webdataset, which the GPU image lacks: carry them as wheels (see the device
# README); without them both training runs are skipped and say so.
# Usage: OUT=/path bash bench/gpu_check.sh   The whole script stays under BUDGET seconds (default 470, < 8 min):
# every step's timeout is cut to what is left.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu_out}
PY=${PY:-python3}
BUDGET=${BUDGET:-470}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0  # tests/conftest.py turns the CPU interpreter on unless this says otherwise

# cap WANT RESERVE: seconds a step may take: WANT, or less so that RESERVE seconds stay for the steps after it.
cap() { local t=$(( BUDGET - SECONDS - $2 )); (( t > $1 )) && t=$1; (( t < 5 )) && t=5; echo "$t"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

llama_summary() {  # metrics.jsonl -> llama_1b.json and a one-line summary
  $PY - "$1" "$OUT/llama_1b.json" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if "loss" in r]
steady = rows[1:] or rows  # the first row's steps include Triton compilation and allocator warm-up
mean = lambda k: sum(r[k] for r in steady) / len(steady) if all(r.get(k) is not None for r in steady) else None
out = {"steps": rows[-1]["step"], "tokens_per_s": mean("tokens_per_s"), "tflops_per_device": mean("tflops"),
       "mfu": mean("mfu"), "peak_mem_gib": max(r["mem_bytes"] for r in rows) / 2**30,
       "data_wait_s_per_step": mean("data_wait_s"), "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
       "rows": rows}
json.dump(out, open(sys.argv[2], "w"), indent=1)
mfu = f"{out['mfu']:.1%}" if out["mfu"] is not None else "n/a"
print(f"llama_1b: {out['tokens_per_s']:,.0f} tokens/s, {out['tflops_per_device']:.1f} TFLOP/s, MFU {mfu}, "
      f"peak memory {out['peak_mem_gib']:.1f} GiB, loss {out['loss_first']:.3f} -> {out['loss_last']:.3f}")
PYEOF
}

if $PY -c "import deepspeed, webdataset" 2>/dev/null; then
  tmp=$(mktemp -d)
  find . -path ./.venv -prune -o -path ./.git -prune -o \( -name '*.py' -o -name '*.md' -o -name '*.yaml' \) -print \
    | sort | xargs cat > "$tmp/corpus.txt"  # ~1 MB of text, no download
  $PY -m megalm.cli prepare --input "$tmp/corpus.txt" --tokenizer bytes --output "$tmp/data" --val-fraction 0.1
  data=(data.train="$tmp/data/train" data.tokenizer=bytes train.resume=none)
  llama() {  # extra overrides...
    timeout "$(cap 300 150)" $PY launcher/pretrain.py --config configs/llama_1b.yaml "${data[@]}" data.val=null \
      train.max_steps=100 train.log_interval=10 optim.warmup_steps=10 train.run_dir="$tmp/llama" "$@" \
      > "$OUT/llama_1b.txt" 2>&1
  }
  llama
  if [ ! -s "$tmp/llama/metrics.jsonl" ] && grep -qi "out of memory" "$OUT/llama_1b.txt" && (( BUDGET - SECONDS > 250 )); then
    echo "llama_1b: out of memory at micro batch 8, again at 4" | tee -a "$OUT/env.txt"
    mv "$OUT/llama_1b.txt" "$OUT/llama_1b_oom.txt"
    llama train.micro_batch_size=4 train.global_batch_size=4
    cat "$OUT/llama_1b_oom.txt" >> "$OUT/llama_1b.txt" && rm "$OUT/llama_1b_oom.txt"
  fi
  tail -12 "$OUT/llama_1b.txt"
  if [ -s "$tmp/llama/metrics.jsonl" ]; then llama_summary "$tmp/llama/metrics.jsonl" | tee -a "$OUT/llama_1b.txt"; fi
else
  echo "deepspeed/webdataset not importable here: training runs skipped (carry them as wheels, see the device README)" \
    | tee "$OUT/llama_1b.txt" "$OUT/train.txt"
fi

# GPU tests: kernels compiled for CUDA at full size, plus anything else marked gpu.
timeout "$(cap 150 100)" $PY -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/model 2>&1 \
  | tee "$OUT/pytest_gpu.txt" | tail -5

timeout "$(cap 150 45)" $PY bench/kernels.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.md" | tail -40

if [ -n "${tmp:-}" ] && (( BUDGET - SECONDS > 30 )); then
  $PY -m megalm.cli prepare --input "$tmp/corpus.txt" --tokenizer bytes --output "$tmp/small" --val-fraction 0.1 \
    > /dev/null 2>&1
  timeout "$(cap 60 0)" $PY launcher/pretrain.py --config configs/tiny.yaml data.train="$tmp/small/train" \
      data.val="$tmp/small/val" data.tokenizer=bytes model.vocab_size=320 precision.dtype=bf16 \
      model.attention=flash train.max_steps=50 train.run_dir="$tmp/run" train.resume=none 2>&1 | tee "$OUT/train.txt" | tail -8
elif [ -n "${tmp:-}" ]; then
  echo "tiny training run skipped: the time budget is spent" | tee "$OUT/train.txt"
fi
echo "gpu_check: ${SECONDS}s of ${BUDGET}s"
