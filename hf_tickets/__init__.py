"""Lottery tickets and sparse training for any transformers PreTrainedModel."""

__version__ = "0.1.0"

from .config import SparsityConfig
from .masks import MaskSet, load_masks
from .sparsify import apply_sparsity
from .trainer import SparsityCallback, TicketTrainer

__all__ = ["MaskSet", "SparsityCallback", "SparsityConfig", "TicketTrainer", "apply_sparsity", "load_masks"]
