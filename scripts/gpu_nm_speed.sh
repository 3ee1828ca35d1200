#!/usr/bin/env bash
# Issue 12's speed numbers on one GPU, one benchmark at a time (timings must not share the GPU). Nothing to stage:
# every model is built from a config with random weights.
#
#   OUT=/tmp/out bash scripts/gpu_nm_speed.sh   # $OUT/nm_speed.tar.gz: nm_speed/<step>.{log,json}, after every step
#
#   gpu_tests    the CUDA tests of the tile transpose, the masking kernel and 2:4
#   context      benchmarks/nm_mlp_kernels.py --context: the down projection on its transposed input, as it is and
#                copied to row-major three ways, and the MLP block with each
#   inference    benchmarks/nm_inference.py on the MLP block and BERT-base (dense vs sparse_inference vs all sparse)
#   overhead     benchmarks/enforcement_overhead.py, fixed 2:4 masks vs plain Trainer, 16 rounds
#   sr_ste       benchmarks/sr_ste_parts.py: SR-STE's per-step work, part by part
set -uo pipefail
final=${OUT:-/tmp/out}
out=/tmp/nm_speed
mkdir -p "$out" "$final"
export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
steps=${STEPS:-gpu_tests context inference overhead sr_ste}
deadline=${DEADLINE:-540}
run() { timeout -k 5 $((deadline - SECONDS)) "$@"; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
  python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
  git log -1 --format=%H 2>/dev/null || cat COMMIT 2>/dev/null; } > "$out/env.txt" 2>&1
for step in $steps; do
    echo "== $step at $SECONDS s"
    case $step in
        gpu_tests) run python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_row_major.py tests/test_kernels.py \
                       tests/test_nm.py > "$out/gpu_tests.log" 2>&1 ;;
        context) run python3 benchmarks/nm_mlp_kernels.py --context --skip-layers --json "$out/context.json" \
                     > "$out/context.log" 2>&1 ;;
        inference) run python3 benchmarks/nm_inference.py --models mlp,bert-base --json "$out/inference.json" \
                       > "$out/inference.log" 2>&1 ;;
        overhead) run python3 benchmarks/enforcement_overhead.py --rounds 16 --steps 20 --warmup 3 \
                      --arms dense,ticket_2_4 --kernel-iters 0 --json "$out/overhead.json" > "$out/overhead.log" 2>&1 ;;
        sr_ste) run python3 benchmarks/sr_ste_parts.py --json "$out/sr_ste.json" > "$out/sr_ste.log" 2>&1 ;;
    esac
    echo "   exit $? ($SECONDS s)"; tail -3 "$out/$step.log" 2>/dev/null
    tar -czf "$final/nm_speed.tar.gz" -C /tmp nm_speed
done
