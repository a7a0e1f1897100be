#!/usr/bin/env bash
# Run HERE (not on the GPU box): fills the git-ignored .gpu/ folder that the device tool carries
# (docs/gpu_runbook.md lists, per call, which of these paths travel; the limit is 64 MiB a call).
#   .gpu/wheels_core       hydra, omegaconf, antlr4, clean-fid (0.4 MB: every recipe and metric needs them)
#   .gpu/wheels_diffusers  diffusers + importlib_metadata (6.2 MB; only the diffusers interop imports it)
#   .gpu/wheels_x          xformers + the CUDA 12 runtime it links against (carry only for attention benchmarks)
#   .gpu/data              CIFAR-10 train/test npz (46.5 + 9.3 MB), Tiny Shakespeare (1.1 MB, text/)
#   .gpu/ref_dit           facebookresearch/DiT models.py + diffusion/ (76 KB) for bench_train --reference, read
#                          and timed beside ours, never committed: REF_DIT_GIT=<a clone's git dir> takes them
#                          from its commit ed81ce2 (the one docs/benchmarks.md timed)
#   .gpu/setup.sh          scripts/gpu_setup.sh, sourced first by every command on the GPU box
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${SHARED:-../shared}"
mkdir -p .gpu/wheels_core .gpu/wheels_diffusers .gpu/wheels_x .gpu/data/cifar10 .gpu/data/text
for w in "$shared"/wheels/*.whl; do
    name=$(basename "$w")
    case "$name" in
        xformers*|nvidia_cuda_runtime*) cp -n "$w" .gpu/wheels_x/ ;;
        # an earlier version of this script put diffusers into wheels_core: move it out of the light set
        diffusers*|importlib_metadata*) rm -f ".gpu/wheels_core/$name"; cp -n "$w" .gpu/wheels_diffusers/ ;;
        *) cp -n "$w" .gpu/wheels_core/ ;;
    esac
done
cp -n "$shared"/data/cifar10/cifar10_jpeg_{train,test}.npz .gpu/data/cifar10/
cp -n "$shared"/data/text/tinyshakespeare.txt .gpu/data/text/
# WITH_VAE=1: also the TAEF2 weights (5.4 MB) for the alignment experiment; carry .gpu/data/vae and
# only the CIFAR-10 train npz then, to stay under the 64 MiB limit.
if [ "${WITH_VAE:-0}" = 1 ]; then mkdir -p .gpu/data/vae && cp -n "$shared"/data/vae/taef2_*.pth .gpu/data/vae/; fi
if [ -n "${REF_DIT_GIT:-}" ]; then
    mkdir -p .gpu/ref_dit && git --git-dir="$REF_DIT_GIT" archive ed81ce2 models.py diffusion | tar -x -C .gpu/ref_dit
fi
cp scripts/gpu_setup.sh .gpu/setup.sh
du -sh .gpu/*
