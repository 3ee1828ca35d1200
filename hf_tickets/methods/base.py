"""The method interface and its registry (a plain dict, like peft's and open_lth's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

if TYPE_CHECKING:
    from ..config import SparsityConfig
    from ..masks import MaskSet

_REGISTRY: dict[str, type["SparsityMethod"]] = {}


class SparsityMethod:
    """What a method does, and when. Subclasses compute masks from a model; training-time methods add hooks.

    Methods are pure with respect to the model: `compute_masks` reads weights (or gradients) and returns a new
    `MaskSet`; zeroing and enforcement are done by one shared path (`MaskSet.apply_` / the trainer callback).
    """

    name: ClassVar[str] = ""

    def __init__(self, config: "SparsityConfig") -> None:
        self.config = config

    def compute_masks(self, model: nn.Module, targets: dict[str, nn.Parameter]) -> "MaskSet":
        raise NotImplementedError


def register_method(name: str, cls: type[SparsityMethod]) -> type[SparsityMethod]:
    """Register `cls` under `name`; a name can be registered once."""
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"sparsity method {name!r} is already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    cls.name = name
    return cls


def get_method(name: str) -> type[SparsityMethod]:
    if name not in _REGISTRY:
        raise ValueError(f"SparsityConfig.method={name!r} is unknown: choose one of {available_methods()}.")
    return _REGISTRY[name]


def available_methods() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))
