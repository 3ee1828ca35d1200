"""Sparsity methods: one file each, registered with `register_method(name, config_cls, method_cls)`."""

from __future__ import annotations

from . import gradual, imp, oneshot, rigl  # noqa: F401  (register "gradual", "imp", "magnitude", "random", "rigl", "set", "static")
from .base import BatchSource, SparsityMethod, available_methods, build_method, get_method, register_method
from .gradual import GradualConfig
from .imp import IMPConfig
from .rigl import RigLConfig, SETConfig, StaticConfig

__all__ = [
    "BatchSource",
    "GradualConfig",
    "IMPConfig",
    "RigLConfig",
    "SETConfig",
    "StaticConfig",
    "SparsityMethod",
    "available_methods",
    "build_method",
    "get_method",
    "register_method",
]
