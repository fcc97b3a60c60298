#!/usr/bin/env bash
# GPU acceptance test of the SD3.5-M and FLUX.1-dev paths, one command for whoever has a GPU:  bash benchmark/gpu_smoke.sh
# About 10 minutes on one H100 (--budget 600 s; checks that would start past it are reported as SKIPPED), up to 15 more
# for FLUX.1-dev when it is cached.
# Every method's docs command (docs/<method>.md) at its per-GPU micro-batch, real reward models where the local
# Hugging Face cache has them (else a named fallback), a few iterations each; prints peak reserved / allocated GPU
# memory beside the estimate of benchmark/gpu_memory.py (docs/gpu.md) with a PASS / FAIL threshold (reserved <=
# 1.15 x estimate), dtypes, s / iteration, Flow-GRPO's on-policy ratio; fp16, resume after kill -9,
# --gradient-checkpointing, save -> `python -m common.tools.evaluate --checkpoint`, and a 2-GPU torchrun (nccl) run when
# 2 GPUs are present; then, when black-forest-labs/FLUX.1-dev is in the local cache (or FLUX_MODEL=/path), each page's
# FLUX.1-dev command the same way and its saved LoRA evaluated back (FLUX_BUDGET, 900 s more; a SKIPPED line when
# FLUX is absent; `--only flux` for the FLUX checks alone); ends with a one-screen PASS / FAIL / SKIPPED table (exit 1
# on any FAIL).
#   bash benchmark/gpu_smoke.sh --dry-run [--estimates]     # no GPU: the planned commands (and memory estimates)
#   MODEL=/path/to/sd3.5-medium GENEVAL_URL=http://host:port bash benchmark/gpu_smoke.sh --full-batch
# Settings (flags or environment): MODEL, FLUX_MODEL, REWARD (one spec for every method), OUT (runs/gpu_smoke),
# BUDGET (600), FLUX_BUDGET (900).
# Details and the list of checks: benchmark/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python benchmark/gpu_check.py "$@"
