#!/usr/bin/env bash
# QLoRA under FSDP2 on 1 and 2 GPUs, in one command on a 2-GPU machine (nvidia-h200-x2):
# build nf4 (CUDA extension for sm_90a), then bench/bench_fsdp.py (tiny-model loss curves 1 vs 2
# GPUs, Llama-3-8B-shaped tokens/s 1 vs 2 GPUs) writes the "fsdp" section of bench/RESULTS.md
# (and $OUT/results_fsdp.md). Everything fits in ~540 s: the runs get what the build leaves.
set -euo pipefail
cd "$(dirname "$0")/.."
# NVLink multicast (NVLS) stays off on the lent machines: NCCL, torch symmetric memory, NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
start=$SECONDS
NF4_CUDA_ARCHS=90a python3 -m pip install --no-build-isolation --no-deps -e . >/dev/null  # python3 -m: the bare pip there is the system Python's
echo "build: $((SECONDS - start)) s"
nvidia-smi -L
budget=$((540 - (SECONDS - start)))
python -m bench.bench_fsdp --budget-s "$budget" "$@"
