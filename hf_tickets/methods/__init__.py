"""Method registry: one class per method, looked up by `SparsityConfig.method`."""

from __future__ import annotations

from .base import SparsityMethod, available_methods, get_method, register_method
from . import oneshot  # noqa: F401  (registers "magnitude" and "random")

__all__ = ["SparsityMethod", "available_methods", "get_method", "register_method"]
