"""Lottery tickets and sparse training for any transformers PreTrainedModel."""

# Importing hf_tickets registers its reference models (LeNet, Conv, ResNet, VGG) with transformers' Auto classes,
# so their checkpoints load with AutoModelForImageClassification.from_pretrained (no trust_remote_code).
from . import models  # noqa: F401
from .callbacks import SparsityCallback
from .config import SparsityConfig
from .export import InferenceReport, sparse_inference
from .masks import MaskSet, load_masks
from .methods import IMPConfig, SparsityMethod, register_method
from .nm import NMReport, validate_nm
from .peft_interop import enable_masked_lora
from .peft_merge import MergeReport, load_sparse_adapter, merge_adapters, save_sparse_adapter
from .sparsify import apply_sparsity
from .trainer import TicketTrainer
from .version import __version__

__all__ = [
    "IMPConfig",
    "InferenceReport",
    "MaskSet",
    "NMReport",
    "MergeReport",
    "SparsityCallback",
    "SparsityConfig",
    "SparsityMethod",
    "TicketTrainer",
    "__version__",
    "apply_sparsity",
    "enable_masked_lora",
    "load_masks",
    "load_sparse_adapter",
    "merge_adapters",
    "register_method",
    "sparse_inference",
    "validate_nm",
    "save_sparse_adapter",
]
