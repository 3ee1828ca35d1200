"""scripts/accelerate_mode_check.py under DeepSpeed on CPU processes (DS_ACCELERATOR=cpu, gloo).

DeepSpeed's CPU accelerator compiles a shared-memory all-reduce op with g++ when it starts (minutes on a small
machine); gloo alone does the job, so the op is marked unavailable first. `--no-master-masking` is the negative
control of tests/test_distributed_deepspeed.py: the module weights are masked, DeepSpeed's fp32 master copy is not.

    DS_ACCELERATOR=cpu accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml --num_processes 2 \\
        tests/deepspeed_worker.py --mode deepspeed_zero2 --out OUT --size tiny --steps 8
"""

import os
import runpy
import sys

import deepspeed.ops

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
if "--no-master-masking" in sys.argv:
    sys.argv.remove("--no-master-masking")
    from hf_tickets.enforce import MaskEnforcer

    MaskEnforcer.mask_master_weights_ = lambda self: None
script = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "accelerate_mode_check.py"
)
sys.argv = [script, *sys.argv[1:]]
runpy.run_path(script, run_name="__main__")
