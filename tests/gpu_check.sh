#!/usr/bin/env bash
# The GPU check: on one CUDA machine, in about 10 minutes, what the CPU suite cannot show.
#
#   bash tests/gpu_check.sh                 # logs in $LOG_DIR (default /tmp/gpu_check), one table at the end
#   REHEARSE=1 bash tests/gpu_check.sh      # the same steps on the CPU, tiny width (~4 min; 7 with a cold inductor cache): the script,
#                                           # its flags and paths, before a GPU's minutes are spent on them
#
#   In this order, checks before benchmarks (so a short BUDGET covers the checks), what has never run on a GPU:
#   1  tests/test_generate.py's CUDA tests: CUDA graphs give the eager tokens, MoE too
#   2  lm0 under FSDP2's bf16 policy: text-only packs (every sharded rank runs the ViT on a blank tile)
#   3  rl.py (tiny, random start) on the GPU: rollouts, rewards, evaluation on CUDA (a random start
#      keeps no group: no update); then one episode with random rewards (tests/bench.py rl-episode):
#      rollouts and rl.update_episode on CUDA, and again with the generation copy freed during the
#      update (--update_memory=lean), and with no copy (--generate_on=model; the figure shows each
#      one's peak GPU memory). With 2 or more GPUs also under torchrun on 2 processes (each rank its
#      share of the groups; the episode in both update memories: lean gathers FSDP units per
#      micro-batch; generating on the sharded model, its units gathered per decode step; and, for
#      tiny-moe, on copies holding each rank's half of the experts, tokens gathered per MoE layer)
#   4  sample.py --eval on the GPU (the recipe's per-stage evaluation path); the soup of two of those
#      checkpoints, evaluated on the GPU, and a sharded stage from one of them (its shards read a tensor
#      at a time); both on 2 processes with 2 GPUs
#   5  a 2b-wide model (4 layers), random weights, through the real training loop: bf16, FSDP2 on
#      1 GPU, --ac=block, 8k packs, a sharded step checkpoint and a resume whose losses must match
#   6  kernel tests natively (no TRITON_INTERPRET): tests/test_kernels_*.py, incl. the large GPU cases
#      (a fresh machine compiles and autotunes every tile first: minutes)
#   7  tests/bench.py rollout --device=cuda: eager, compiled and CUDA graphs vs HF generate, in bf16 as
#      RL generates on a GPU (ours: bf16 matrices under autocast; HF: its model in bf16)
#   8  tests/bench.py packing --real        stream packs vs pad-to-longest, useful tokens/s on the GPU
#   9  tests/bench.py attention             packed attention: Triton vs SDPA / flex / torch varlen / FA2 (ratios)
#   10 tests/bench.py moe                   MoE expert layer: Triton vs the HF loop / grouped_mm (ratios)
#   11 tests/bench.py checkpoint --device=cuda   host memory of writing a step checkpoint from the GPU:
#                                           one tensor at a time vs torch.distributed.checkpoint's own writer
#
# Each step has its own time limit; a failing step is reported and the others still run. Each step's
# row is printed when it ends (a run cut short still shows what it did), the whole table at the end.
#   STEPS="graphs-test bench-rollout"   only these steps (names as in the table)
#   BUDGET=540                          seconds for the whole run: a step gets at most what is left (and reads "cut" if stopped by it),
#                                       none starts with under 20 s left (the device tool: 600 s a call)
#   LOG_DIR=/tmp/gc                     the step logs (default /tmp/gpu_check); checkpoints go to WORK
#                                       (default /tmp/gpu_check_work), so LOG_DIR stays small to copy
# A machine whose Python lacks a package (the device tool's GPU image has no PyAV) takes wheels from
# .whl/ in the repository root, installed into /tmp/site first (README, GPU check).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${LOG_DIR:-/tmp/gpu_check}"
WORK="${WORK:-/tmp/gpu_check_work}"
rm -rf "$WORK" && mkdir -p "$WORK" "$LOG_DIR"
unset TRITON_INTERPRET
PY="${PY:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
missing="$("$PY" -c 'import importlib.util as u; print(" ".join(m for m in ("torch", "numpy", "tiktoken", "safetensors",
    "triton", "PIL", "av", "tqdm", "pytest", "transformers") if u.find_spec(m) is None))')"
[ -z "$missing" ] || { echo "gpu_check: missing Python packages: $missing (carry them as wheels in .whl/)" >&2; exit 2; }
# REHEARSE=1: every step on the CPU; the kernel steps (native Triton) are skipped, the 2b model is tiny,
# RL's rollouts compiled as on CUDA
DEV=cuda PRESET=2b NGPU=0 RL_COMPILE=--compile=auto
if [ "${REHEARSE:-0}" = 1 ]; then
    DEV=cpu PRESET=tiny NGPU=2                          # the 2-GPU steps as 2 gloo processes
    RL_COMPILE=--compile=true                           # the compiled rollouts CUDA runs by default
else
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_check: no CUDA device (torch.cuda.is_available() is False)" >&2; exit 2; }
    NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
fi

ROWS=()
FAILED=0
BUDGET="${BUDGET:-0}"                                   # 0: no limit on the whole run
# row NAME STATUS SECONDS FIGURE: one summary row, printed now and kept for the table
row() {
    ROWS+=("$(printf '%-20s %-9s %5ss  %s' "$1" "$2" "$3" "$4")")
    echo "${ROWS[-1]}"
}
# step NAME LIMIT_S FIGURE_REGEX COMMAND...: run with a time limit, keep the log, one summary row
# (status, seconds, and the last log line matching FIGURE_REGEX: the step's headline number)
step() {
    local name=$1 limit=$2 figure=$3; shift 3
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
        return
    fi
    if [ "$DEV" = cpu ] && [[ " kernel-tests bench-attn bench-moe " == *" $name "* ]]; then
        row "$name" skipped 0 "rehearsal: native Triton needs the GPU"
        return
    fi
    [ "$DEV" = cpu ] && limit=$((limit * 4))          # the CPU is slower; the rehearsal checks that it runs
    local cut=0
    if [ "$BUDGET" -gt 0 ]; then
        local left=$((BUDGET - SECONDS))
        if [ "$left" -lt 20 ]; then row "$name" skipped 0 "BUDGET=$BUDGET s spent"; return; fi
        [ "$left" -lt "$limit" ] && limit=$left && cut=1
    fi
    local t0=$SECONDS rc
    echo "== $name: $*" >&2
    timeout "$limit" "$@" > "$LOG_DIR/$name.log" 2>&1
    rc=$?
    local status="ok"
    if [ $rc -eq 124 ] && [ $cut = 1 ]; then status="cut"           # stopped by BUDGET, not its own limit
    elif [ $rc -ne 0 ]; then status="FAIL ($rc)"; FAILED=1; fi
    local line
    line="$(grep -E "$figure" "$LOG_DIR/$name.log" | tail -n 1 | sed 's/^ *//' | cut -c1-110)"
    row "$name" "$status" $((SECONDS - t0)) "$line"
}

step graphs-test 150 "passed|failed|skipped" "$PY" -m pytest -q -p no:cacheprovider tests/test_generate.py -k cuda
# text-only packs under FSDP2's bf16 policy: every sharded rank runs the ViT on a blank tile (its dtype)
step lm0-fsdp 90 "^step " "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_stage.py --stage=lm0 \
    --fsdp=true --steps=2 --eval_every=0 --data_dir="$WORK/synth" --out_dir="$WORK/out-lm0"

step rl-updates 180 "reward|episode" "$PY" rl.py --stage=rl-verifiable --init_from=random --data_dir="$WORK/synth" \
    --out_dir="$WORK/out" --episodes=3 --prompts_per_episode=4 --group_size=4 --max_new_tokens=32 --eval_prompts=8 \
    --filter_k=0 --temperature=1.5 $RL_COMPILE
step rl-episode 90 "generation" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 tests/bench.py rl-episode --prompts 8 --group 4 \
    --synth-dir "$WORK/synth"
# the same, its bf16 generation copy freed during the update (rl.py --update_memory=lean)
step rl-episode-lean 90 "generation" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 tests/bench.py rl-episode \
    --prompts 8 --group 4 --synth-dir "$WORK/synth" --update-memory lean
# and with no copy at all: one process generates on the fp32 model itself under autocast (--generate_on=model)
step rl-episode-model 90 "generation" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 tests/bench.py rl-episode \
    --prompts 8 --group 4 --synth-dir "$WORK/synth" --generate-on model
if [ "$NGPU" -ge 2 ]; then
    step rl-2-gpus 240 "reward|episode" "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 rl.py --stage=rl-verifiable \
        --init_from=random --data_dir="$WORK/synth" --out_dir="$WORK/out2" --episodes=3 --prompts_per_episode=4 \
        --group_size=4 --max_new_tokens=32 --eval_prompts=8 --filter_k=0 --temperature=1.5 $RL_COMPILE
    step rl-episode-2 90 "generation" "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 tests/bench.py rl-episode --prompts 8 --group 4 \
        --synth-dir "$WORK/synth"
    step rl-episode-2-lean 90 "generation" "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 tests/bench.py \
        rl-episode --prompts 8 --group 4 --synth-dir "$WORK/synth" --update-memory lean     # FSDP units per micro-batch
    # generation on the sharded model: each unit gathered per decode step, the ranks in step
    step rl-episode-2-model 90 "generation" "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 tests/bench.py \
        rl-episode --prompts 8 --group 4 --synth-dir "$WORK/synth" --update-memory lean --generate-on model
    # an MoE model's experts spread over the ranks' generation copies (NCCL all-gather and all-reduce per layer)
    step rl-episode-2-experts 90 "generation" "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 tests/bench.py \
        rl-episode --preset tiny-moe --prompts 8 --group 4 --synth-dir "$WORK/synth" --generate-on experts
fi
step eval-cuda 90 "accuracy|ocr" "$PY" sample.py --ckpt "$WORK/out/rl-verifiable" --eval "$WORK/synth" --limit 8 \
    --device "$DEV" --out "$WORK/eval.json"
# the soup: the mean on the host, each model in turn evaluated on the device with bf16-held matrices; with 2
# GPUs on 2 processes (rank 0's mean sent to rank 1 over NCCL)
SOUP_PROCS=1; [ "$NGPU" -ge 2 ] && SOUP_PROCS=2
step soup 90 "soup eval" "$PY" -m torch.distributed.run --standalone --nproc_per_node=$SOUP_PROCS train_stage.py \
    --stage=soup --ckpts "$WORK/out/rl-verifiable" "$WORK/out-lm0/lm0" --data_dir="$WORK/synth" \
    --out_dir="$WORK/out-soup" --eval_packs=2
# a sharded stage from one checkpoint: each rank's shards read a tensor at a time (NCCL scatters from rank 0)
step from-ckpt-fsdp 90 "^step " "$PY" -m torch.distributed.run --standalone --nproc_per_node=$SOUP_PROCS train_stage.py \
    --stage=sft1 --init-from="$WORK/out/rl-verifiable" --fsdp=true --steps=2 --eval_every=0 --save_every=0 \
    --data_dir="$WORK/synth" --out_dir="$WORK/out-from-ckpt"
# 2b width (Qwen3-1.7B's hidden size, heads and 151,936-row vocabulary; SAIL-ViT-Huge's width at 448 px),
# 4 LLM and 4 ViT layers so it builds and checkpoints in seconds; random weights, bf16 under FSDP2's
# mixed precision, block activation checkpointing and the chunked loss as --scale=paper runs them
TWO_B=(--stage=sft1 --preset="$PRESET" --init-from=random --fsdp=true --data_dir="$WORK/synth" --out_dir="$WORK/out"
       --model.llm_config.num_hidden_layers=4 --model.vision_config.num_hidden_layers=4 --ac=block
       --eval_every=0 --save_every=2 --steps=4 --packing.max_tokens=8192 --warmup_steps=1 --lr=1e-5)
step 2b-fsdp2 150 "^step " "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_stage.py "${TWO_B[@]}"
cp "$WORK/out/sft1.run/metrics.jsonl" "$WORK/first_run.jsonl" 2>/dev/null
# again from its step-2 checkpoint: steps 3 and 4 replayed; their losses must equal the first run's
step 2b-resume 120 "^step " "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_stage.py "${TWO_B[@]}" --resume
step resume-equal 30 "identical|close|differ" "$PY" - "$WORK/first_run.jsonl" "$WORK/out/sft1.run/metrics.jsonl" \
    "$LOG_DIR/2b-resume.log" <<'PY'
import json, sys
first, again = ({r["step"]: r["loss"] for r in map(json.loads, open(p)) if "loss" in r} for p in sys.argv[1:3])
resumed = open(sys.argv[3]).read()          # the resume must have run steps 3 and 4 itself (else "again" is the first run's)
steps = sorted(set(first) & set(again) & {s for s in (3, 4) if f"step {s:05d}/" in resumed})
same = bool(steps) and all(first[s] == again[s] for s in steps)
# each process autotunes the Triton tiles afresh: another tile sums in another order (last bits)
close = bool(steps) and all(abs(first[s] - again[s]) <= 1e-3 * abs(first[s]) for s in steps)
word = "identical" if same else "close (within 1e-3 relative: other autotuned tiles)" if close else "differ"
print(f"resumed steps {steps}: losses {word}", [(first.get(s), again.get(s)) for s in (3, 4)])
sys.exit(0 if close else 1)
PY
# checks before benchmarks: the kernels' own tests, compiled for this GPU (every tile autotuned afresh)
step kernel-tests 330 "passed|failed" \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_moe.py \
    tests/test_kernels_gpu.py
step bench-rollout 200 "graphs |compiled " "$PY" tests/bench.py rollout --device="$DEV" --episode-procs=0 --synth-dir "$WORK/synth"
step bench-packing 75 "packed / padded" "$PY" tests/bench.py packing --real --device="$DEV" --synth-dir="$WORK/synth"
step bench-attn 90 "flex_attention doc mask|sdpa dense" "$PY" tests/bench.py attention   # their time / Triton's
step bench-moe 90 "triton|skewed" "$PY" tests/bench.py moe
step bench-ckpt 150 "ours |dcp " "$PY" tests/bench.py checkpoint --device="$DEV" --preset="$PRESET"

echo
echo "GPU check on $("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "the CPU (rehearsal)", "| torch", torch.__version__)') | triton $("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null)"
printf '%-20s %-9s %6s  %s\n' step status time "figure (last matching log line; full logs in $LOG_DIR)"
for r in "${ROWS[@]}"; do echo "$r"; done
exit $FAILED
