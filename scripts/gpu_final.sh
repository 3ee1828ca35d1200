#!/usr/bin/env bash
# One GPU call (scripts/gpu_batched_lth.sh's set-up): engine parity over seeds, then the full LeNet-300-100/MNIST
# recipe (50k iterations x 20 levels, both controls at every level, 2 replicates) with the batched engine, alone.
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out" runs results
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=".:/tmp/site"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
timeout 170 python3 benchmarks/imp_engines.py --rounds 0 --parity-seeds 6 --steps 2000 --json "$out/parity_seeds.json" \
    2>&1 | grep -v -E "Writing model|^\{'" > "$out/parity_seeds.log"
left=$((575 - SECONDS))
start=$SECONDS
timeout "$left" python3 -m hf_tickets.cli run recipes/lenet300_mnist.yaml training.output_dir=runs/lenet300_mnist \
    engine=batched replicates=2 > runs/lenet300.log 2>&1
echo "lenet300_mnist exit $? after $((SECONDS - start)) s (limit $left s)" >> runs/lenet300.log
for r in 0 1; do
    root=runs/lenet300_mnist/replicate_$r; [ -d "$root" ] || continue
    python3 -m hf_tickets.cli report "$root" > /dev/null 2>&1
    mkdir -p results/replicate_$r && cp "$root"/imp_report.json "$root"/imp_*.png results/replicate_$r/ 2>/dev/null
done
grep -v -E "Writing model|Warning|warn\(|super\(\)|^\{'" runs/lenet300.log > "$out/lenet300_mnist.log"
tar -czf "$out/lenet300_full.tar.gz" results
