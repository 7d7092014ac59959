#!/usr/bin/env bash
# On a GPU machine: the GPU tests (one process, then NCCL ones under MPI when there are >= 2 GPUs) and the
# benchmarks, in one go, with a summary table at the end. Logs go to ${OUT:-out}/.
#   MPILLM_TEST_MODEL=/path/SmolLM2-135M-Instruct.Q4_1.gguf scripts/gpu_check.sh [bench models...]
# On the lent machines: source .device/env.sh first (it defines $PY and $MPIRUN).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
PY=${PY:-python3}
MPIRUN=${MPIRUN:-mpiexec}
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
models=("$@"); [ ${#models[@]} -eq 0 ] && models=(dummy:llama3-8b)
status=0
echo "== GPU tests (1 process)" | tee "$OUT/gpu-tests.log"
$PY -m pytest tests/gpu -q -ra -p no:cacheprovider 2>&1 | tee -a "$OUT/gpu-tests.log"; status=$((status | PIPESTATUS[0]))
if [ "$NGPU" -ge 2 ]; then
  echo "== GPU tests (MPI, 2 ranks)" | tee -a "$OUT/gpu-tests.log"
  $MPIRUN -n 2 $PY -m pytest --with-mpi --only-mpi tests/gpu/test_tp_gpu.py -q -ra -p no:cacheprovider 2>&1 | tee -a "$OUT/gpu-tests.log"
  status=$((status | PIPESTATUS[0]))
fi
rm -f "$OUT/bench.jsonl"
for m in "${models[@]}"; do
  echo "== bench $m tp=1" | tee -a "$OUT/bench.log"
  $PY scripts/bench.py --model "$m" --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/bench.log"
  # Weight-only quantization: W8A16 and, for random weights, W4A16 (a checkpoint's own Q4 blocks run by default).
  quants=(int8); case "$m" in dummy:*) quants+=(q4);; esac
  for q in "${quants[@]}"; do
    echo "== bench $m tp=1 --quantize $q" | tee -a "$OUT/bench.log"
    $PY scripts/bench.py --model "$m" --quantize $q --batch 1,8,32 --prefill 2048 \
      --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/bench.log"
  done
  # A/B in this run: programmatic dependent launch in the decode graphs (the default above) against none.
  echo "== bench $m tp=1 --no-pdl" | tee -a "$OUT/bench.log"
  $PY scripts/bench.py --model "$m" --no-pdl --batch 1,8,32 --prefill "" --json "$OUT/bench.jsonl" 2>&1 \
    | tee -a "$OUT/bench.log"
  # A/B in this run: decode steps launched one ahead, inputs fed on the GPU (the default above, as the engine
  # runs) against reading each step back before launching the next.
  echo "== bench $m tp=1 --sync-steps" | tee -a "$OUT/bench.log"
  $PY scripts/bench.py --model "$m" --sync-steps --batch 1,8,32 --prefill "" --json "$OUT/bench.jsonl" 2>&1 \
    | tee -a "$OUT/bench.log"
  # A/B in this run: decode attention spread over more blocks at small batch (the default above) against one
  # partition per 512 keys.
  echo "== bench $m tp=1 MPILLM_DECODE_SPLIT=0" | tee -a "$OUT/bench.log"
  MPILLM_DECODE_SPLIT=0 $PY scripts/bench.py --model "$m" --batch 1,8,32 --prefill "" --json "$OUT/bench.jsonl" 2>&1 \
    | tee -a "$OUT/bench.log"
  # A/B in this run: rope and the KV store fused into the q/k/v projection (the default above) against two kernels.
  echo "== bench $m tp=1 --no-fuse-rope" | tee -a "$OUT/bench.log"
  $PY scripts/bench.py --model "$m" --no-fuse-rope --batch 1,8,32 --prefill "" --json "$OUT/bench.jsonl" 2>&1 \
    | tee -a "$OUT/bench.log"
  # A/B in this run: SwiGLU fused into the gate/up projection (the default above) against two kernels.
  echo "== bench $m tp=1 --no-fuse-swiglu" | tee -a "$OUT/bench.log"
  $PY scripts/bench.py --model "$m" --no-fuse-swiglu --batch 1,8 --prefill "" --json "$OUT/bench.jsonl" 2>&1 \
    | tee -a "$OUT/bench.log"
  # Decode attention alone, its plain and _occ builds at small and large batches (prints only).
  echo "== bench $m --attention" | tee -a "$OUT/bench.log"
  $PY scripts/bench.py --model "$m" --attention --batch 1,32,128,512 --context 531 2>&1 | tee -a "$OUT/bench.log"
  # Offline throughput: 1,000 ShareGPT-like requests, continuous batching next to static batching.
  echo "== bench $m --throughput 1000" | tee -a "$OUT/bench.log"
  $PY scripts/bench.py --model "$m" --throughput 1000 --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/bench.log"
  for tp in 2 4; do
    if [ "$NGPU" -ge $tp ]; then
      echo "== bench $m tp=$tp" | tee -a "$OUT/bench.log"
      $MPIRUN -n $tp $PY scripts/bench.py --model "$m" --tp $tp --batch 1,32 --prefill 512,2048 --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/bench.log"
      echo "== bench $m tp=$tp --overlap" | tee -a "$OUT/bench.log"       # A/B: overlapped prefill micro-batches
      $MPIRUN -n $tp $PY scripts/bench.py --model "$m" --tp $tp --overlap --batch "" --prefill 512,2048 --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/bench.log"
      echo "== bench $m tp=$tp --no-fuse-ar-norm" | tee -a "$OUT/bench.log"   # A/B: all-reduce + norm fused
      $MPIRUN -n $tp $PY scripts/bench.py --model "$m" --tp $tp --no-fuse-ar-norm --batch 1,32 --prefill "" --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/bench.log"
      echo "== bench $m tp=$tp --nccl-only" | tee -a "$OUT/bench.log"     # A/B: the one-shot IPC all-reduce
      $MPIRUN -n $tp $PY scripts/bench.py --model "$m" --tp $tp --nccl-only --batch 1,32 --prefill "" --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/bench.log"
    fi
  done
done
$PY - "$OUT/bench.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if len(sys.argv) > 1 else []
print("\n| GPU | model | weights | tp | what | tok/s | detail |\n|---|---|---|---|---|---|---|")
for r in rows:
    if r["kind"] == "decode":
        d = f"{r['ms_step']:.3f} ms/step, {r['gb_s']:.0f} GB/s = {100 * r['roofline_frac']:.1f}% of copy bw"
        what = f"decode b={r['batch']}" + ("" if r.get("fuse_swiglu", True) else ", unfused SwiGLU") \
            + (", NCCL only" if r.get("allreduce") == "nccl" and r["tp"] > 1 else "") \
            + ("" if r.get("pdl", True) else ", no PDL") \
            + (", no decode split" if r.get("decode_split", 1) == 0 else "") \
            + ("" if r.get("fuse_rope", True) else ", unfused rope") \
            + (", all-reduce and norm unfused" if r["tp"] > 1 and r.get("fuse_ar_norm") is False else "") \
            + (", steps read back one by one" if r.get("pipelined") is False else "")
    elif r["kind"] == "throughput":
        d = f"{r['req_s']:.2f} req/s, {r['total_tok_s']:.0f} total tok/s, {r['requests']} requests"
        print(f"| {r['gpu']} | {r['model']} | none | 1 | throughput, {r['mode']} (output tok/s) | "
              f"{r['out_tok_s']:.1f} | {d} |")
        continue
    else:
        d = f"{r['ms']:.1f} ms, {r['tflops']:.1f} TFLOP/s"
        what = f"prefill {r['tokens']}" + (", overlapped micro-batches" if r.get("overlap") else "")
    print(f"| {r['gpu']} | {r['model']} | {r.get('quantize', 'none')} | {r['tp']} | {what} | {r['tok_s']:.1f} | {d} |")
PYEOF
exit $status
