"""A sparsity method registered from outside the package, using every hook (tests/test_plugin.py, the resume
worker). Registering it is the whole integration: one call."""

from __future__ import annotations

import base64
import dataclasses

import torch

from hf_tickets import MaskSet, SparsityConfig, SparsityMethod, register_method


@dataclasses.dataclass
class ToyConfig(SparsityConfig):
    """A method with its own field: every `every` optimizer steps, prune one more random weight per tensor."""

    method: str = "toy_grow_prune"
    every: int = 2
    sparsity_required = False

    def validate_method(self) -> None:
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"ToyConfig.every={self.every!r} must be an int >= 1.")


class ToyMethod(SparsityMethod):
    """Uses every hook: batches at init, dense gradients, mask changes after steps, RNG + counter state."""

    needs_data = True

    def __init__(self, config):
        super().__init__(config)
        self.steps_seen = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.batches_seen = 0
        self.dense_grad_nonzero_in_pruned = []

    def initial_masks(self, model, targets, batches):
        for batch in batches():  # data-driven scores would use these; the toy only checks it gets real batches
            assert "pixel_values" in batch
            self.batches_seen += 1
            break
        return MaskSet({n: torch.ones_like(p, dtype=torch.bool) for n, p in targets.items()}, self.mask_metadata())

    def on_dense_grads(self, model, masks, step):
        params = dict(model.named_parameters())
        self.dense_grad_nonzero_in_pruned.append(
            sum(int((params[n].grad[~m] != 0).sum()) for n, m in masks.items() if params[n].grad is not None)
        )

    def after_optimizer_step(self, model, masks, step):
        self.steps_seen += 1
        if step % self.config.every:
            return None
        new = {}
        for name, mask in masks.items():
            alive = mask.reshape(-1).nonzero().squeeze(1)
            pick = alive[torch.randint(len(alive), (1,), generator=self.generator)]
            new[name] = mask.clone().reshape(-1).index_fill_(0, pick, False).view_as(mask)
        return MaskSet(new, masks.metadata)

    def state_dict(self):
        rng = base64.b64encode(self.generator.get_state().numpy().tobytes()).decode()
        return {"steps_seen": self.steps_seen, "rng": rng}

    def load_state_dict(self, state):
        self.steps_seen = state["steps_seen"]
        raw = base64.b64decode(state["rng"])
        self.generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


register_method("toy_grow_prune", ToyConfig, ToyMethod)
