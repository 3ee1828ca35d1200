"""What the lottery package needs from a trainer, so that it does not import the trainer module.

`TicketTrainer` satisfies it; its `train()` hands an iterative method to `LotteryRunner`, so the dependency runs
one way (trainer -> lottery).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from ..callbacks import SparsityCallback
from ..config import SparsityConfig
from ..masks import MaskSet
from ..methods import SparsityMethod


class LotteryTrainer(Protocol):
    """A `transformers.Trainer` with a sparsity method whose masks can be replaced, trained one run at a time."""

    sparsity_config: Optional[SparsityConfig]
    sparsity_method: Optional[SparsityMethod]
    sparsity_callback: Optional[SparsityCallback]

    @property
    def masks(self) -> Optional[MaskSet]: ...

    def set_masks(self, masks: MaskSet) -> None: ...

    def train_once(
        self, resume_from_checkpoint: Any = None, *args: Any, restore_masks: bool = True, **kwargs: Any
    ): ...
