#!/usr/bin/env bash
# The GPU check: on one CUDA machine, in under 8 minutes, what the CPU suite cannot show.
#
#   bash tests/gpu_check.sh                 # logs in $LOG_DIR (default /tmp/gpu_check), one table at the end
#
#   1  kernel tests natively (no TRITON_INTERPRET): tests/test_kernels_*.py, incl. the large GPU cases
#   2  tests/bench.py attention             packed attention: Triton vs SDPA / flex / torch varlen / FA2 (ratios)
#   3  tests/bench.py moe                   MoE expert layer: Triton vs the HF loop / grouped_mm (ratios)
#   4  tests/bench.py packing --real        stream packs vs pad-to-longest, useful tokens/s on the GPU
#   5  a 2b-shaped model, random weights, through the real training loop: bf16, FSDP2 on 1 GPU,
#      one step checkpoint and a resume
#   6  a few RL updates (rl.py, tiny, random start) on the GPU
#
# Each step has its own time limit; a failing step is reported and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${LOG_DIR:-/tmp/gpu_check}"
WORK="$LOG_DIR/work"
rm -rf "$WORK" && mkdir -p "$WORK"
unset TRITON_INTERPRET
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: no CUDA device (torch.cuda.is_available() is False)" >&2; exit 2; }

ROWS=()
FAILED=0
# step NAME LIMIT_S FIGURE_REGEX COMMAND...: run with a time limit, keep the log, one summary row
# (status, seconds, and the last log line matching FIGURE_REGEX: the step's headline number)
step() {
    local name=$1 limit=$2 figure=$3; shift 3
    local t0=$SECONDS rc
    echo "== $name: $*" >&2
    timeout "$limit" "$@" > "$LOG_DIR/$name.log" 2>&1
    rc=$?
    local status="ok"
    if [ $rc -ne 0 ]; then status="FAIL ($rc)"; FAILED=1; fi
    local line
    line="$(grep -E "$figure" "$LOG_DIR/$name.log" | tail -n 1 | sed 's/^ *//' | cut -c1-110)"
    ROWS+=("$(printf '%-16s %-9s %5ss  %s' "$name" "$status" $((SECONDS - t0)) "$line")")
}

step kernel-tests 150 "passed|failed" \
    python -m pytest -q -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_moe.py \
    tests/test_kernels_gpu.py
step bench-attn 90 "triton" python tests/bench.py attention
step bench-moe 90 "triton|skewed" python tests/bench.py moe
step bench-packing 75 "packed / padded" python tests/bench.py packing --real --device=cuda --synth-dir="$WORK/synth"
# 2b shape (Qwen3-1.7B LLM + the 300M SAIL-ViT), random weights, bf16 under FSDP2's mixed precision
TWO_B=(--stage=sft1 --preset=2b --init-from=random --fsdp=true --data_dir="$WORK/synth" --out_dir="$WORK/out"
       --eval_every=0 --save_every=2 --steps=4 --packing.max_tokens=4096 --warmup_steps=1 --lr=1e-5)
step 2b-fsdp2 150 "^step " torchrun --standalone --nproc_per_node=1 train_stage.py "${TWO_B[@]}"
# again from its step-2 checkpoint: steps 3 and 4 replayed, the same losses expected
step 2b-resume 120 "^step " torchrun --standalone --nproc_per_node=1 train_stage.py "${TWO_B[@]}" --resume
step rl-updates 90 "reward|episode" python rl.py --stage=rl-verifiable --init_from=random --data_dir="$WORK/synth" \
    --out_dir="$WORK/out" --episodes=3 --prompts_per_episode=4 --group_size=4 --max_new_tokens=32 --eval_prompts=8 \
    --filter_k=0 --temperature=1.5

echo
echo "GPU check on $(python -c 'import torch; print(torch.cuda.get_device_name(), "| torch", torch.__version__)') | triton $(python -c 'import triton; print(triton.__version__)' 2>/dev/null)"
printf '%-16s %-9s %6s  %s\n' step status time "figure (last matching log line; full logs in $LOG_DIR)"
for r in "${ROWS[@]}"; do echo "$r"; done
exit $FAILED
