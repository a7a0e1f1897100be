#!/usr/bin/env bash
# Run HERE (not on the GPU box): fills the git-ignored .gpu/ folder that the device tool carries.
#   .gpu/wheels_core  diffusers, hydra, omegaconf, antlr4, clean-fid, importlib_metadata (from ../shared/wheels)
#   .gpu/wheels_x     xformers + the CUDA 12 runtime it links against (carry only for attention benchmarks)
#   .gpu/data         CIFAR-10 train/test npz (55 MB: with them, carry little else; limit 64 MiB)
#   .gpu/ref_dit      facebookresearch/DiT models.py + diffusion/ for bench_train --reference (fetch it
#                     yourself; it is read, timed beside ours, and never committed)
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${SHARED:-../shared}"
mkdir -p .gpu/wheels_core .gpu/wheels_x .gpu/data/cifar10
for w in "$shared"/wheels/*.whl; do
    case "$(basename "$w")" in
        xformers*|nvidia_cuda_runtime*) cp -n "$w" .gpu/wheels_x/ ;;
        *) cp -n "$w" .gpu/wheels_core/ ;;
    esac
done
cp -n "$shared"/data/cifar10/cifar10_jpeg_{train,test}.npz .gpu/data/cifar10/
# WITH_VAE=1: also the TAEF2 weights (5.4 MB) for the alignment experiment; carry .gpu/data/vae and
# only the CIFAR-10 train npz then, to stay under the 64 MiB limit.
if [ "${WITH_VAE:-0}" = 1 ]; then mkdir -p .gpu/data/vae && cp -n "$shared"/data/vae/taef2_*.pth .gpu/data/vae/; fi
cp scripts/gpu_setup.sh .gpu/setup.sh
du -sh .gpu/*
