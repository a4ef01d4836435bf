#!/usr/bin/env bash
# On a machine with a CUDA GPU: parity on CUDA in all three precision modes against the goldens,
# then the full-size 7B-D benchmark (random weights, bf16): time to first token with a 13-crop image
# and batch-1 decode speed against the HBM bound, eager CUDA graph and compiled decode step, and 16 rows
# decoded together against one (the default path); then
# parity again with the compiled step; then one fine-tuning step of the 7B-D in bf16 (one 13-crop image,
# a 256-token answer) with LoRA + activation checkpointing and with every weight: peak GPU memory and
# step time; the decode benchmark again with int8 and int4 weights (issue 13's target: int4 >= 2x bf16).
# Then the batch job on the 7B-D against generate per record. Prints a short table last; about 5 minutes
# on an H200.
#
#   bash scripts/gpu_check.sh [GOLDEN_DIR [TOKENIZER_DIR]]     (default: ../shared/golden, ../shared/tokenizer)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GOLDEN=${1:-${MOLMO_SHARED:-../shared}/golden}
TOKENIZER=${2:-${MOLMO_SHARED:-../shared}/tokenizer}
[ -d "$GOLDEN" ] || GOLDEN=shared/golden
[ -d "$TOKENIZER" ] || TOKENIZER=shared/tokenizer
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# What the project needs at run time; the CUDA image usually has all of it already.
if ! $PY -c "import torch, safetensors, tokenizers, huggingface_hub, PIL, numpy, einops" 2>/dev/null; then
  $PY -m pip install -q --no-build-isolation -e . || { echo "gpu_check: cannot install the project"; exit 1; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1

parity() {  # name, extra flags
  local name=$1; shift
  if [ ! -d "$GOLDEN" ]; then echo "skipped (no golden folder)" > "$OUT/$name.txt"; return; fi
  timeout 240 $PY scripts/parity.py --golden "$GOLDEN" --tokenizer "$TOKENIZER" --out "$OUT/$name" --device cuda "$@" \
    2>&1 | tee "$OUT/$name.txt" | grep -E "^FAIL|^parity:|Error|error"
}
bench() {  # name, extra flags
  local name=$1; shift
  timeout 300 $PY scripts/bench.py --workload full --dtype bf16 --device cuda "$@" 2>&1 | tee "$OUT/$name.txt" | tail -n 3
}

train() {  # name, extra flags
  local name=$1; shift
  timeout 300 $PY scripts/bench.py --workload train --size full --device cuda --steps 3 "$@" 2>&1 | tee "$OUT/$name.txt" | tail -n 1
}

parity parity
parity parity_tp1 --tp 1   # the tensor-parallel code path (DTensor, NCCL) on the one GPU
bench bench_full --batch-rows 16
bench bench_full_compiled --compile
parity parity_compiled --compile
bench bench_full_int8 --quantize int8
bench bench_full_int4 --quantize int4
timeout 300 $PY scripts/bench.py --workload batch --size full --device cuda --tokenizer "$TOKENIZER" 2>&1 \
  | tee "$OUT/batch_full.txt" | tail -n 1
train train_lora --lora-rank 8 --gradient-checkpointing
train train_full

$PY scripts/gpu_summary.py "$OUT" "$(dirname "$GOLDEN")"
