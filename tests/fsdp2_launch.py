"""Test-only launcher: run `python -m MODULE ARGS` in a CPU process under accelerate's own FSDP2 preparation.

accelerate enters FSDP mode only for GPU processes: `AcceleratorState` takes its FSDP branch when the process is
MULTI_GPU (MULTI_NPU, ...), and a CPU process is MULTI_CPU. FSDP2 itself runs on CPU with gloo (torch 2.13), so this
launcher sets up the process as accelerate would for CPU (gloo, MULTI_CPU), names it MULTI_GPU for the one moment
`AcceleratorState` is built with an FSDP2 plugin, and then gets out of the way: the Trainer's `Accelerator` finds
the state (distributed_type FSDP, the plugin) and runs accelerate's own `fsdp2_prepare_model`, state-dict, save and
load helpers. The TrainingArguments must keep that state: `accelerator_config={"use_configured_state": True}`
(transformers otherwise resets it). Nothing of hf_tickets, transformers or accelerate is patched; only with
FSDP2_OPTIMIZER_PROBE=DIR (and FSDP2_PROBE_STEP=k) is `TicketTrainer.__init__` wrapped to add one recording callback
(`OptimizerProbe`).

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_launch.py hf_tickets.cli run RECIPE \
        'training.accelerator_config={"use_configured_state": true}' ...
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Optional


def enter_fsdp2(state_dict_type: str = "FULL_STATE_DICT", layer_cls: Optional[list[str]] = None) -> None:
    """Build accelerate's process state as FSDP2 on this CPU process (gloo); a no-op outside torchrun.

    `layer_cls`: the classes wrapped as FSDP2 groups (`--fsdp_transformer_layer_cls_to_wrap`); default: the
    model's `_no_split_modules`. For BERT name `BertLayer`, as scripts/gpu_accelerate_configs.sh does: accelerate
    1.16 also shards the input embedding on its own, which fails inside a `BertEmbeddings` group."""
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
        transformer_cls_names_to_wrap=layer_cls,
        cpu_ram_efficient_loading=False,
    )
    Accelerator(cpu=True, fsdp_plugin=plugin)  # builds the shared AcceleratorState the Trainer's Accelerator reuses
    assert AcceleratorState().distributed_type == DistributedType.FSDP


class OptimizerProbe:
    """Adam's moments of this rank's shards at step k of level 0, against every later arm's at its first step (after
    resuming from the rewind point and `enforce_now`): equal to the step-k state with the arm's pruned entries
    zeroed, and 0 non-zero entries under the arm's masks. Writes probe_rank<r>.json into `out` after each check."""

    BUFFERS = ("exp_avg", "exp_avg_sq")

    def __init__(self, trainer, out: str, step: int) -> None:
        self.trainer, self.out, self.step = trainer, out, step
        self.at_k: dict = {}
        self.results: dict = {}

    def _state(self, model, optimizer) -> dict:
        from hf_tickets.distributed import local

        inner = getattr(optimizer, "optimizer", optimizer)
        out = {}
        for name, param in model.named_parameters():
            state = inner.state.get(param, {})
            out[name] = {b: local(state[b]).detach().clone() for b in self.BUFFERS if b in state}
            out[name]["step"] = float(state["step"]) if "step" in state else None
        return out

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        import json

        import torch

        if state.global_step != self.step:
            return
        arm = os.path.relpath(args.output_dir, os.path.dirname(os.path.dirname(args.output_dir)))
        now = self._state(model, optimizer)
        if not self.at_k:  # level 0 reaches step k first
            self.at_k = now
            return
        callback = self.trainer.sparsity_callback
        keep = dict(zip(callback.masks, callback.enforcer().local_masks()))
        equal, pruned_nonzero, pruned_entries, sharded = True, 0, 0, 0
        for name, buffers in now.items():
            sharded += int("exp_avg" in buffers and buffers["exp_avg"].shape != model.get_parameter(name).shape)
            equal &= buffers["step"] == self.at_k[name]["step"] == float(self.step)
            for b in self.BUFFERS:
                expected = self.at_k[name][b]
                if name in keep:
                    expected = expected.masked_fill(~keep[name], 0)
                    pruned_nonzero += int((buffers[b][~keep[name]] != 0).sum())
                    pruned_entries += int((~keep[name]).sum())
                equal &= torch.equal(buffers[b], expected)
        self.results[arm] = dict(
            equal=bool(equal), pruned_nonzero=pruned_nonzero, pruned_entries=pruned_entries, sharded=sharded
        )
        with open(os.path.join(self.out, f"probe_rank{args.process_index}.json"), "w") as fh:
            json.dump(self.results, fh)


def install_probe(out: str, step: int) -> None:
    """Every TicketTrainer gets an `OptimizerProbe` (test-only: the CLI builds the trainer)."""
    from transformers import TrainerCallback

    from hf_tickets.trainer import TicketTrainer

    probe_cls = type("OptimizerProbeCallback", (OptimizerProbe, TrainerCallback), {})
    init = TicketTrainer.__init__

    def with_probe(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(probe_cls(self, out, step))

    TicketTrainer.__init__ = with_probe


if __name__ == "__main__":
    enter_fsdp2(os.environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT"))
    if os.environ.get("FSDP2_OPTIMIZER_PROBE"):
        install_probe(os.environ["FSDP2_OPTIMIZER_PROBE"], int(os.environ["FSDP2_PROBE_STEP"]))
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
