"""Test-only launcher: run `python -m MODULE ARGS` in a CPU process under accelerate's own FSDP2 preparation.

accelerate enters FSDP mode only for GPU processes: `AcceleratorState` takes its FSDP branch when the process is
MULTI_GPU (MULTI_NPU, ...), and a CPU process is MULTI_CPU. FSDP2 itself runs on CPU with gloo (torch 2.13), so this
launcher sets up the process as accelerate would for CPU (gloo, MULTI_CPU), names it MULTI_GPU for the one moment
`AcceleratorState` is built with an FSDP2 plugin, and then gets out of the way: the Trainer's `Accelerator` finds
the state (distributed_type FSDP, the plugin) and runs accelerate's own `fsdp2_prepare_model`, state-dict, save and
load helpers. Nothing of hf_tickets or transformers is patched.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_launch.py hf_tickets.cli run RECIPE ...
"""

from __future__ import annotations

import os
import runpy
import sys


def enter_fsdp2(state_dict_type: str = "FULL_STATE_DICT") -> None:
    """Build accelerate's process state as FSDP2 on this CPU process (gloo); a no-op outside torchrun."""
    if "LOCAL_RANK" not in os.environ:
        return
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    PartialState(cpu=True)  # gloo; accelerate calls this process MULTI_CPU
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # where the FSDP branch lives
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        state_dict_type=state_dict_type,
        auto_wrap_policy="transformer_based_wrap",
        cpu_ram_efficient_loading=False,
    )
    Accelerator(cpu=True, fsdp_plugin=plugin)  # builds the shared AcceleratorState the Trainer's Accelerator reuses
    assert AcceleratorState().distributed_type == DistributedType.FSDP


if __name__ == "__main__":
    enter_fsdp2(os.environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT"))
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
