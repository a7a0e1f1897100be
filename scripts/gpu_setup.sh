# Sourced at the start of every command on the GPU box (`source .gpu/setup.sh`; scripts/gpu_prepare.sh
# copies it there): installs the carried wheels (whichever of .gpu/wheels_core, wheels_diffusers and
# wheels_x the call carries) and sets the paths the recipes read.
# (GPU_SITE: where they go; scripts/gpu_dryrun.sh gives each CPU rehearsal its own)
GPU_SITE=${GPU_SITE:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$GPU_SITE" \
    $(ls .gpu/wheels_*/*.whl 2>/dev/null)
export PYTHONPATH=$GPU_SITE:$PWD LD_LIBRARY_PATH=$GPU_SITE/nvidia/cuda_runtime/lib:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1 DIFFTOOLS_DATA=$PWD/.gpu/data DIFFTOOLS_CACHE=$PWD/.gpu/cache HF_HUB_OFFLINE=1
export TQDM_MININTERVAL=20
mkdir -p .gpu/cache
# The CIFAR-10 DiT-S/2 used by docs/benchmarks.md, samplers.md and guidance.md:
RUN=runs/cifar_s2
TRAIN_ARGS="model=dit_s2 data=cifar10 process=flow trainer=gpu trainer.batch_size=256 trainer.lr=3e-4 \
trainer.warmup_steps=500 trainer.ema_decay=0.999 trainer.log_every=250 trainer.ckpt_every=2500 \
trainer.sample_every=2500 trainer.sample_steps=20 trainer.progress=false eval.enabled=false \
hydra.run.dir=$RUN trainer.compile=true"
# Seconds left until second $1 of this command, at least 10 (`timeout 0` would mean no limit at all):
# `timeout $(left 560) python3 ...` stops a step in time for the packing of $OUT after it, however long
# the steps before it took (docs/gpu_runbook.md).
left() { local s=$(( $1 - SECONDS )); echo $(( s > 10 ? s : 10 )); }
