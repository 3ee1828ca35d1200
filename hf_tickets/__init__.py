"""Lottery tickets and sparse training for any transformers PreTrainedModel.

The public names below load on first use (PEP 562), so `import hf_tickets` and `hf-tickets --help` do not import
torch, transformers or the Trainer. Importing hf_tickets still registers its reference models (LeNet, Conv, ResNet,
VGG) with transformers' Auto classes, so their checkpoints load with AutoModelForImageClassification.from_pretrained
(no trust_remote_code): `_autoregister` does it as soon as transformers' Auto classes load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _autoregister
from .version import __version__

# public name -> the module that defines it
_LAZY = {
    "IMPConfig": ".methods",
    "InferenceReport": ".export",
    "MaskSet": ".masks",
    "NMReport": ".nm",
    "MergeReport": ".peft_merge",
    "SparsityCallback": ".callbacks",
    "SparsityConfig": ".config",
    "SparsityMethod": ".methods",
    "TicketTrainer": ".trainer",
    "apply_sparsity": ".sparsify",
    "enable_masked_lora": ".peft_interop",
    "load_masks": ".masks",
    "load_sparse_adapter": ".peft_merge",
    "merge_adapters": ".peft_merge",
    "register_method": ".methods",
    "sparse_inference": ".export",
    "validate_nm": ".nm",
    "save_sparse_adapter": ".peft_merge",
}

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

_autoregister.install()

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    """A public name (imported from its module on first use, then cached), or a submodule (`hf_tickets.models`)."""
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
