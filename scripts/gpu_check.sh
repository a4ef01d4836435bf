#!/usr/bin/env bash
# On a machine with a CUDA GPU: parity on CUDA in all three precision modes against the goldens,
# then the full-size 7B-D benchmark (random weights, bf16): time to first token with a 13-crop image
# and batch-1 decode speed against the HBM bound. Prints a short table last; about 3-5 minutes.
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

parity="skipped (no golden folder)"
if [ -d "$GOLDEN" ]; then
  timeout 240 $PY scripts/parity.py --golden "$GOLDEN" --tokenizer "$TOKENIZER" --out "$OUT/parity" --device cuda \
    2>&1 | tee "$OUT/parity.txt" | grep -E "^FAIL|^parity:"
  parity=$(tail -n 1 "$OUT/parity.txt")
fi

timeout 300 $PY scripts/bench.py --workload full --dtype bf16 --device cuda 2>&1 | tee "$OUT/bench_full.txt" | tail -n 1
timeout 120 $PY scripts/bench.py --workload mid --dtype bf16 --device cuda 2>&1 | tee "$OUT/bench_mid.txt" | tail -n 1

$PY - "$OUT" "$parity" <<'PY'
import json, sys
out, parity = sys.argv[1], sys.argv[2]
def last(name):
    try:
        return json.loads(open(f"{out}/{name}").read().strip().splitlines()[-1])
    except Exception as e:
        return {"error": str(e)}
full, mid = last("bench_full.txt"), last("bench_mid.txt")
rows = [("parity (CUDA, fp32/autocast/bf16)", parity),
        ("7B-D bf16 time to first token, 13 crops", f"{full.get('ttft_s', '?')} s (target <= 0.150)"),
        ("7B-D bf16 batch-1 decode", f"{full.get('decode_tok_s', '?')} tok/s"),
        ("  HBM bound (measured copy bandwidth)", f"{full.get('bandwidth_bound_tok_s', '?')} tok/s "
                                                   f"at {full.get('bandwidth_gb_s', '?')} GB/s"),
        ("  fraction of bound", f"{full.get('fraction_of_bound', '?')} (target >= 0.75)"),
        ("mid (Qwen2-0.5B-sized) bf16 decode", f"{mid.get('decode_tok_s', '?')} tok/s, prefill {mid.get('prefill_s', '?')} s")]
w = max(len(r[0]) for r in rows)
print("\n" + "\n".join(f"{a:<{w}}  {b}" for a, b in rows))
PY
