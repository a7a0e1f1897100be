#!/usr/bin/env bash
# accelerate launch with NVLink multicast off in every process it starts.
#
#   scripts/launch.sh --config_file conf/accelerate/ddp_8gpu.yaml train/dit.py model=dit_xl2 trainer=gpu
#   scripts/launch.sh --config_file conf/accelerate/fsdp_8gpu.yaml train/dit.py model=dit_xl2 trainer=gpu
#   scripts/launch.sh --config_file conf/accelerate/ddp_4gpu.yaml scripts/sample.py ckpt=runs/dit/<run> num_samples=50000
#   scripts/launch.sh --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
#       train/dit.py ...            # 2 processes on a CPU-only host (gloo); `--cpu` would start only one
#
# Every argument goes to `accelerate launch` unchanged (run as `$PYTHON -m accelerate.commands.launch`,
# $PYTHON defaulting to python3 on PATH). NVLink multicast (NVLS) is switched off in
# NCCL, PyTorch's symmetric memory and NVSHMEM: on GPU hosts shared with others a program that uses
# it can put the host's GPUs out of service. accelerate config files cannot set environment
# variables, so they are exported here and reach every child: torchrun's workers, DataLoader
# workers and compile workers inherit the environment. (difftools' trainer and scripts/sample.py
# also set them, where unset, for launches that do not come through this script.)
set -euo pipefail

export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_DISABLE_NVLS=1

# `accelerate launch` of the python that runs difftools ($PYTHON, default: python3 on PATH)
exec "${PYTHON:-python3}" -m accelerate.commands.launch "$@"
