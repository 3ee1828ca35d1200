"""Sparsity methods: one file each, registered with `register_method(name, config_cls, method_cls)`."""

from __future__ import annotations

from . import gradual, grasp, imp, nm, oneshot, rigl, snip, synflow  # noqa: F401  (register every built-in method)
from .base import BatchSource, SparsityMethod, available_methods, build_method, get_method, register_method
from .gradual import GradualConfig
from .grasp import GraSPConfig
from .imp import IMPConfig
from .nm import NMConfig, SRSTEConfig
from .rigl import RigLConfig, SETConfig, StaticConfig
from .snip import SNIPConfig
from .synflow import SynFlowConfig

__all__ = [
    "BatchSource",
    "GradualConfig",
    "GraSPConfig",
    "IMPConfig",
    "NMConfig",
    "RigLConfig",
    "SETConfig",
    "SRSTEConfig",
    "SNIPConfig",
    "StaticConfig",
    "SynFlowConfig",
    "SparsityMethod",
    "available_methods",
    "build_method",
    "get_method",
    "register_method",
]
