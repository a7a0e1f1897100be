#!/usr/bin/env bash
# The second GPU call of docs/benchmarks.md (issue 18), ~8.5 minutes at most on one H100 / H200:
#   1. the cuda-marked tests of the speed paths (fused kernels, whole-step CUDA graph, graphed sampling)
#   2. scripts/bench_trainer.py: DiT-T/2 and S/2 in the engine, loader vs device batches vs CUDA graph
#   3. scripts/bench_sampling.py: eager vs CUDA-graphed sampling, shared DiT-T/2 (+ a 50k-image run),
#      DiT-B/2 and DiT-XL/2 shapes
# Each part has its own time bound and writes its results as it goes, so a part that fails or runs
# out of time costs only itself. Everything lands under $OUT; the tables are printed last.
# Needs (carry): .gpu/models/cifar10_dit_t2_flow and .gpu/data/cifar10/cifar10_jpeg_test.npz.
# BENCH_TRAINER_ARGS / BENCH_SAMPLING_ARGS are appended to the two benchmarks' arguments (a CPU rehearsal
# with scripts/gpu_dryrun.sh shrinks them there; docs/gpu_runbook.md).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_speed}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DIFFTOOLS_DATA=$PWD/.gpu/data
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton',
      triton.__version__)" | tee "$OUT/device.txt"

timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_fused.py tests/test_speed_engine.py \
    tests/test_graphed_sampling.py > "$OUT/cuda_tests.txt" 2>&1
echo "cuda tests: exit $?; $(tail -1 "$OUT/cuda_tests.txt")"

timeout 190 python3 scripts/bench_trainer.py --steps 300 --time-limit-s 175 --out "$OUT/bench_trainer" \
    ${BENCH_TRAINER_ARGS:-} > "$OUT/bench_trainer.log" 2>&1
echo "bench_trainer: exit $?"

timeout 200 python3 scripts/bench_sampling.py --ckpt .gpu/models/cifar10_dit_t2_flow --time-limit-s 185 \
    --out "$OUT/bench_sampling" ${BENCH_SAMPLING_ARGS:-} > "$OUT/bench_sampling.log" 2>&1
echo "bench_sampling: exit $?"

for f in "$OUT/bench_trainer/bench_trainer.md" "$OUT/bench_sampling/bench_sampling.md"; do
    if [ -f "$f" ]; then cat "$f"; else echo "missing: $f"; fi
done
grep -E "^(FAILED|ERROR)" "$OUT/cuda_tests.txt" | head -20
