#!/usr/bin/env bash
# Every accelerate config in recipes/accelerate/ launched once on ONE GPU (issue 17): single_gpu, ddp, fsdp2,
# deepspeed_zero2 with one process (--num_processes 1 overrides the configs' 2; DDP and FSDP2 with one process still
# run their code paths: DDP wrapping, DTensor parameters), deepspeed_zero3 (must be refused), cpu_multiprocess (two
# CPU processes, gloo). Each mode trains BERT-base (random init) with plain Trainer and with TicketTrainer
# (magnitude 50%) for a few steps: zero leaks asserted, step-time ratio printed. A failing mode is recorded and the
# script goes on. Everything lands in $OUT (default runs/gpu_accelerate_configs); summary in $OUT/summary.txt.
#
#   bash scripts/gpu_accelerate_configs.sh                 # GPU machine; needs < 8 minutes
#   SIZE=tiny MODES="cpu_multiprocess" bash scripts/gpu_accelerate_configs.sh   # what runs on a CPU machine
#   MODES=fsdp2_imp bash scripts/gpu_accelerate_configs.sh   # IMP under FSDP2 (not in the default MODES; ~1 minute)
#
# fsdp2_imp: the quickstart IMP recipe (2 levels, late rewinding to step 5, random-prune control, 20 steps a level)
# under fsdp2.yaml with FSDP2_IMP_PROCS processes (default 1; the global batch stays 60), against the same run in
# one process without FSDP: masks of every level bitwise equal and weights within 1e-5, or the mode fails.
#
# DeepSpeed: installed from build/whl when missing on a GPU machine (build/whl holds deepspeed 0.19.8, built with
# DS_BUILD_OPS=0, and its dependencies for Python 3.10-3.13: pip install --no-index --find-links build/whl deepspeed).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_accelerate_configs}
SIZE=${SIZE:-base}
STEPS=${STEPS:-30}
MODES=${MODES:-"single_gpu ddp fsdp2 deepspeed_zero2 deepspeed_zero3 cpu_multiprocess"}
PER_MODE_TIMEOUT=${PER_MODE_TIMEOUT:-75}  # 6 modes x 75 s stays under the 8-minute budget
PY=${PYTHON:-python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)

# Only on a GPU machine (the lead's H200 image), never into a CPU development environment.
if [[ "$MODES" == *deepspeed* ]] && ! $PY -c "import deepspeed" 2>/dev/null \
   && $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  if ls build/whl/deepspeed-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 $PY -m pip install -q --no-index --find-links build/whl deepspeed > "$OUT/deepspeed_install.log" 2>&1 \
      || echo "deepspeed install failed: see $OUT/deepspeed_install.log"
  else
    echo "deepspeed is not installed and build/whl has no wheel: the DeepSpeed modes will fail (recorded)"
  fi
fi

: > "$OUT/summary.txt"
fsdp2_imp() {  # IMP under FSDP2 against one device without FSDP (see the header)
  local procs=${FSDP2_IMP_PROCS:-1} dir="$OUT/fsdp2_imp"
  local imp=(training.max_steps=20 training.eval_steps=10 training.logging_steps=10 sparsity.levels=2
             sparsity.rewind_step=5 "controls=[random_prune]" "control_levels=[2]" training.use_cpu=false)
  rm -rf "$dir" "$dir".*; mkdir -p "$dir"
  $PY -m hf_tickets.cli run recipes/quickstart_digits.yaml training.output_dir="$dir/one" "${imp[@]}" \
      training.per_device_train_batch_size=60 > "$OUT/fsdp2_imp_one.log" 2>&1 || return 1
  timeout "$PER_MODE_TIMEOUT" $PY -m accelerate.commands.launch --config_file recipes/accelerate/fsdp2.yaml \
      --num_processes "$procs" -m hf_tickets.cli run recipes/quickstart_digits.yaml training.output_dir="$dir/fsdp2" \
      "${imp[@]}" training.per_device_train_batch_size=$((60 / procs)) > "$OUT/fsdp2_imp.log" 2>&1 || return 1
  $PY - "$dir" "$procs" "$OUT/fsdp2_imp.log" > "$OUT/fsdp2_imp.json" <<'PY'
import json, os, sys
import torch
from safetensors.torch import load_file
from hf_tickets import MaskSet
d, procs, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {"mode": "fsdp2_imp", "world_size": procs, "levels": {}}
# TicketTrainer says, once per rank, how many masked parameters FSDP2 holds as DTensors: proof the model was sharded
out["sharded_lines"] = [line.strip() for line in open(log) if "sharded DTensors" in line]
for f in ("level_00", "level_01", "level_02", "rewind_point"):
    a, b = (os.path.join(d, run, f) for run in ("one", "fsdp2"))
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    out["levels"][f] = {"masks_equal": MaskSet.load(a) == MaskSet.load(b),
                        "max_abs_diff": max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)}
out["control_masks_equal"] = MaskSet.load(f"{d}/one.random_prune/level_02") == MaskSet.load(f"{d}/fsdp2.random_prune/level_02")
out["ok"] = out["control_masks_equal"] and all(v["masks_equal"] and v["max_abs_diff"] <= 1e-5 for v in out["levels"].values())
out["ok"] = out["ok"] and (len(out["sharded_lines"]) == procs or not torch.cuda.is_available())  # CPU: no FSDP
print(json.dumps(out))
sys.exit(0 if out["ok"] else 1)
PY
}

for mode in $MODES; do
  if [[ "$mode" == fsdp2_imp ]]; then
    t0=$(date +%s); fsdp2_imp; rc=$?; t1=$(date +%s)
    line=$(cat "$OUT/fsdp2_imp.json" 2>/dev/null || tail -n 3 "$OUT/fsdp2_imp.log" | tr '\n' ' ' | cut -c1-300)
    echo "fsdp2_imp: $([[ $rc == 0 ]] && echo OK || echo "FAILED rc=$rc") in $((t1 - t0)) s; $line" \
      | tee -a "$OUT/summary.txt"
    continue
  fi
  config="recipes/accelerate/$mode.yaml"
  extra=()
  launch=(--num_processes 1)
  case "$mode" in
    deepspeed_zero3) extra=(--expect-refusal) ;;
    fsdp2) launch+=(--fsdp_transformer_layer_cls_to_wrap BertLayer) ;;
    cpu_multiprocess) launch=(--num_processes 2) ;;  # CPU processes: the test config's own two
  esac
  env_prefix=()
  [[ "$mode" == cpu_multiprocess ]] && env_prefix=(env CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=4)
  size=$SIZE; [[ "$mode" == cpu_multiprocess ]] && size=tiny  # BERT-base on CPU processes would not fit the budget
  echo "== $mode ($config, ${launch[*]}, size $size)"
  t0=$(date +%s)
  "${env_prefix[@]}" timeout "$PER_MODE_TIMEOUT" $PY -m accelerate.commands.launch --config_file "$config" "${launch[@]}" \
      scripts/accelerate_mode_check.py --mode "$mode" --out "$OUT" --size "$size" --steps "$STEPS" "${extra[@]}" \
      > "$OUT/$mode.log" 2>&1
  rc=$?
  t1=$(date +%s)
  if [[ -f "$OUT/$mode.json" ]]; then
    line=$($PY - "$OUT/$mode.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
if "refused" in r:
    print(f"refused: {r['refused'][:140]}")
else:
    t = r["ticket"]
    print(f"ranks {r['world_size']}  leaks {t['leaks']}  master_leaks {t['master_leaks']}  "
          f"ticket {t['step_s_median']*1e3:.1f} ms/step  trainer {r['trainer']['step_s_median']*1e3:.1f} ms/step  "
          f"ratio {r['ratio_ticket_vs_trainer']:.3f}")
PY
)
  else
    line="no result (see $OUT/$mode.log): $(tail -n 3 "$OUT/$mode.log" | tr '\n' ' ' | cut -c1-300)"
  fi
  status=$([[ $rc == 0 ]] && echo OK || echo "FAILED rc=$rc")
  echo "$mode: $status in $((t1 - t0)) s; $line" | tee -a "$OUT/summary.txt"
done
echo "total $(( $(date +%s) - START )) s" | tee -a "$OUT/summary.txt"
