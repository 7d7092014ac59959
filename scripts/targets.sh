#!/bin/bash
# Issue 5's and 6's target measurements in one call on the GPU machine this runs on, then their ratios
# (bench.py --summarize). Random weights with real shapes (no checkpoint), decode at batch 1, in ROUNDS rounds
# whose configurations alternate, so that every ratio is of runs on one machine in one call:
#   1 GPU:  Llama-3-8B int8 and Q4_0 (LM heads bf16, then both quantized): issue 6's W4A16 / int8;
#   2 GPUs: + bf16 TP 1 and TP 2;   4 GPUs: + TP 4 (issue 5's ratios), then Llama-3-70B bf16 at TP 4 (b=1, 32).
# Usage, from the project root:  scripts/targets.sh OUTDIR [ROUNDS]
#   (PY and MPIRUN from the environment, as .device/env.sh sets them on the lent machines; defaults python3 and
#   mpiexec). Writes OUTDIR/targets.log, OUTDIR/targets.jsonl, OUTDIR/summary.txt and OUTDIR/gpus.txt.
# Peers (scripts/peers/README.md), after the rounds, when their code is there: GPTFAST (a folder with gpt-fast's
# model.py, quantize.py and tp.py; default .peers/gpt-fast) runs bf16, int8 and int4 on one GPU and bf16 at TP 2 /
# TP 4 where the GPUs allow (torchrun); LLAMA_BENCH (a llama-bench binary; default .peers/llama.cpp/llama-bench)
# runs on the random GGUFs that scripts/peers/random_gguf.py writes to GGUF_DIR (4-9 GB each; default
# ${TMPDIR:-/tmp}/mpillm-peer-gguf, outside OUTDIR, whose files a device command brings back), with
# ours in groups of 32 for its Q8_0; LLAMA_BATCHED (a llama-batched-bench binary; default
# .peers/llama.cpp/llama-batched-bench) runs 8 and 32 sequences together on the Q4_0 file with the F16 LM head,
# against ours at those batches. Each peer command is bounded by PEER_TIMEOUT seconds (default 600).
# (scripts/gpu_check.sh is the broad check: every GPU test and benchmark with its A/Bs, once each.)
set -uo pipefail
out=${1:?usage: scripts/targets.sh OUTDIR [ROUNDS]}
rounds=${2:-2}
PY=${PY:-python3}
MPIRUN=${MPIRUN:-mpiexec}
gpus=$(nvidia-smi -L | wc -l)
mkdir -p "$out"
{ nvidia-smi -L; date -u; } > "$out/gpus.txt"
B="scripts/bench.py --prefill= --model dummy:llama3-8b --steps 64 --batch 1 --json $out/targets.jsonl"
for r in $(seq "$rounds"); do
    echo "== round $r"
    for q in int8 q4; do $PY $B --quantize $q; done
    for q in int8 q4; do $PY $B --quantize $q --quantize-lm-head; done
    if [ "$gpus" -ge 2 ]; then
        $PY $B
        $MPIRUN -n 2 $PY $B --tp 2
    fi
    if [ "$gpus" -ge 4 ]; then
        $MPIRUN -n 4 $PY $B --tp 4
    fi
done 2>&1 | tee "$out/targets.log"
if [ "$gpus" -ge 4 ]; then
    $MPIRUN -n 4 $PY scripts/bench.py --prefill= --model dummy:llama3-70b --steps 32 --batch 1,32 --tp 4 \
        --json "$out/targets-70b.jsonl" 2>&1 | tee -a "$out/targets.log"
fi
GPTFAST=${GPTFAST:-.peers/gpt-fast}
LLAMA_BENCH=${LLAMA_BENCH:-.peers/llama.cpp/llama-bench}
LLAMA_BATCHED=${LLAMA_BATCHED:-.peers/llama.cpp/llama-batched-bench}
peer_timeout=${PEER_TIMEOUT:-600}
gg=${GGUF_DIR:-${TMPDIR:-/tmp}/mpillm-peer-gguf}
if [ -f "$GPTFAST/model.py" ] || [ -x "$LLAMA_BENCH" ] || [ -x "$LLAMA_BATCHED" ]; then
    echo "== peers"
    # Ours at the configurations the peers are set against that the rounds did not run.
    if [ -f "$GPTFAST/model.py" ] && [ "$gpus" -lt 2 ]; then $PY $B; fi
    [ -x "$LLAMA_BENCH" ] && $PY $B --quantize int8 --group-size 32 --quantize-lm-head
    if [ -f "$GPTFAST/model.py" ]; then
        G="scripts/peers/gptfast_bench.py --gptfast $GPTFAST --steps 64 --json $out/targets.jsonl"
        for m in bf16 int8 int4; do timeout "$peer_timeout" $PY $G --mode $m; done
        for n in 2 4; do
            if [ "$gpus" -ge $n ]; then
                timeout "$peer_timeout" $PY -m torch.distributed.run --standalone --nproc-per-node $n $G
            fi
        done
    fi
    if [ -x "$LLAMA_BENCH" ]; then
        mkdir -p "$gg"
        $PY scripts/peers/random_gguf.py --type q4_0 --lm-head f16 "$gg/q4_0-f16head.gguf"
        $PY scripts/peers/random_gguf.py --type q4_0 "$gg/q4_0.gguf"
        $PY scripts/peers/random_gguf.py --type q8_0 "$gg/q8_0.gguf"
        for f in q4_0-f16head q4_0 q8_0; do
            timeout "$peer_timeout" "$LLAMA_BENCH" -m "$gg/$f.gguf" -p 0 -n 64 -d 128 -ngl 99 -fa 1 -r 3 -o jsonl \
                >> "$out/targets.jsonl"
        done
    fi
    if [ -x "$LLAMA_BATCHED" ]; then
        # Each of 8 or 32 sequences gets a 128-token prompt, then 64 tokens are generated for all of them together
        # (the contexts grow 128 -> 192, as in ours with --steps 64).
        mkdir -p "$gg"
        f="$gg/q4_0-f16head.gguf"
        [ -f "$f" ] || $PY scripts/peers/random_gguf.py --type q4_0 --lm-head f16 "$f"
        $PY scripts/bench.py --prefill= --model dummy:llama3-8b --steps 64 --batch 8,32 --quantize q4 \
            --json "$out/targets.jsonl"
        gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
        timeout "$peer_timeout" "$LLAMA_BATCHED" -m "$f" -c 6400 -b 2048 -ub 512 -npp 128 -ntg 64 -npl 8,32 -ngl 99 \
            -fa on -kvu --output-format jsonl | $PY scripts/peers/batched_records.py --model "$f" --gpu "$gpu_name" \
            >> "$out/targets.jsonl"
    fi
fi 2>&1 | tee -a "$out/targets.log"
$PY scripts/bench.py --summarize "$out/targets.jsonl" | tee "$out/summary.txt"
