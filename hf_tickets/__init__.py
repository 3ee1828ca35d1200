"""Lottery tickets and sparse training for any transformers PreTrainedModel."""

from .callbacks import SparsityCallback
from .config import SparsityConfig
from .masks import MaskSet, load_masks
from .methods import IMPConfig, SparsityMethod, register_method
from .sparsify import apply_sparsity
from .trainer import TicketTrainer
from .version import __version__

__all__ = [
    "IMPConfig",
    "MaskSet",
    "SparsityCallback",
    "SparsityConfig",
    "SparsityMethod",
    "TicketTrainer",
    "__version__",
    "apply_sparsity",
    "load_masks",
    "register_method",
]
