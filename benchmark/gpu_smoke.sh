#!/usr/bin/env bash
# GPU smoke test, one command for whoever has a GPU:  bash benchmark/gpu_smoke.sh
# Runs every method for a few iterations on SD3.5-M from the local Hugging Face cache (or MODEL=/path), with each
# method page's per-GPU training micro-batch, CFG, T5 and LoRA r32, --mixed-precision bf16; prints seconds per
# iteration and the peak GPU memory (torch.cuda.max_memory_allocated) per method, to compare with the estimate of
# benchmark/gpu_memory.py (docs/gpu.md). Without SD3.5-M in the cache it builds the tiny random SD3 pipeline of
# tests/tiny_sd3.py and runs it at 512 px (checks the code path on CUDA, not the memory).
# Settings: MODEL, ITERS (default 3), RES (default 512), REWARD (default jpeg_compressibility: no reward download; e.g. pickscore),
# METHODS (default all five), OUT (default runs/gpu_smoke). About 10-15 minutes on one H100 with SD3.5-M.
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${ITERS:-3}
RES=${RES:-512}
REWARD=${REWARD:-jpeg_compressibility}
OUT=${OUT:-runs/gpu_smoke}
METHODS=${METHODS:-"advantageflow orw_cfm_w2 acflow fdfo flow_grpo"}
mkdir -p "$OUT"
if [ -z "${MODEL:-}" ]; then
  MODEL=stabilityai/stable-diffusion-3.5-medium
  if ! python -c "from huggingface_hub import try_to_load_from_cache as f; import sys; sys.exit(not isinstance(f('$MODEL', 'model_index.json'), str))"; then
    echo "SD3.5-M is not in the local Hugging Face cache: using the tiny random SD3 pipeline at 512 px"
    MODEL="$OUT/tiny_sd3"
    python -c "import sys; sys.path.insert(0, 'tests'); from tiny_sd3 import build_tiny_sd3; build_tiny_sd3('$MODEL', t5=True, pos_embed_max_size=$RES // 4)"
  fi
fi
cat > "$OUT/prompts.txt" <<'EOF'
a photo of a red bicycle leaning against a blue wall
two cats sleeping on a wooden bench
a bowl of oranges on a kitchen table, morning light
a lighthouse on a cliff at sunset
three yellow balloons above a green field
a dog wearing sunglasses on a beach
a chess board with a single white queen
an astronaut riding a horse in a desert
EOF
COMMON=(--model "$MODEL" --resolution "$RES" --lora-rank 32 --lora-alpha 64 --mixed-precision bf16 --reward "$REWARD"
        --prompts-file "$OUT/prompts.txt" --eval-prompts-file "$OUT/prompts.txt" --eval-samples-per-prompt 1
        --eval-every 1000 --checkpoint-every 1000 --num-iterations "$ITERS" --no-save-model --use-t5)
declare -A FLAGS=(  # per-GPU micro-batches and sampling of each page's command; fewer prompts per iteration
  [advantageflow]="--prompts-per-iter 4 --group-size 4 --train-batch-size 4 --num-steps 10 --eval-num-steps 40"
  [orw_cfm_w2]="--prompts-per-iter 8 --group-size 1 --train-batch-size 4 --num-steps 28 --guidance-scale 4.5"
  [acflow]="--prompts-per-iter 2 --group-size 4 --train-batch-size 4 --num-steps 28 --guidance-scale 4.5 --critic-warmup 1"
  [fdfo]="--prompts-per-iter 9 --group-size 2 --train-batch-size 9 --num-minibatches 2 --num-steps 40 --churn 0.0025 --eps-clip 0.03"
  [flow_grpo]="--prompts-per-iter 3 --group-size 6 --train-batch-size 9 --num-minibatches 2 --num-steps 10 --guidance-scale 4.5 --beta 0 --ema --eval-num-steps 40"  # --beta 0: the zero-KL path (was a CPU tensor among CUDA ones)
)
printf "%-14s %10s %14s %s\n" method s/iter "peak GiB" "run dir"
for m in $METHODS; do
  # shellcheck disable=SC2086
  python - "$m" "$OUT/$m" "${COMMON[@]}" ${FLAGS[$m]} > "$OUT/$m.log" 2>&1 <<'PY' || { echo "$m FAILED, see $OUT/$m.log"; tail -5 "$OUT/$m.log"; continue; }
import json, runpy, sys, torch
method, out = sys.argv[1], sys.argv[2]
sys.argv = [f"{method}.py", "--output-dir", out, *sys.argv[3:]]
try:
    runpy.run_path(f"{method}.py", run_name="__main__")
finally:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(out, size_guidance={"scalars": 0}); acc.Reload()
    ips = sorted(e.value for e in acc.Scalars("charts/images_per_sec"))
    n = json.load(open(f"{out}/summary.json"))["reward_queries"] / len(acc.Scalars("charts/images_per_sec"))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    print(f"SMOKE {n / ips[len(ips) // 2]:.2f} {peak:.1f}")
PY
  read -r s peak < <(grep '^SMOKE' "$OUT/$m.log" | tail -1 | cut -d' ' -f2-)
  printf "%-14s %10s %14s %s\n" "$m" "$s" "$peak" "$OUT/$m"
done
