"""Sparsity methods: one file each, registered with `register_method(name, config_cls, method_cls)`."""

from __future__ import annotations

from . import imp, oneshot  # noqa: F401  (register "imp", "magnitude" and "random")
from .base import BatchSource, SparsityMethod, available_methods, build_method, get_method, register_method
from .imp import IMPConfig

__all__ = [
    "BatchSource",
    "IMPConfig",
    "SparsityMethod",
    "available_methods",
    "build_method",
    "get_method",
    "register_method",
]
