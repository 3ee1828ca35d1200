"""Method registry: one class per method, looked up by `SparsityConfig.method`."""

from __future__ import annotations

from .base import SparsityMethod, available_methods, get_method, register_method
from . import imp, oneshot  # noqa: F401  (register "imp", "magnitude" and "random")

__all__ = ["SparsityMethod", "available_methods", "get_method", "register_method"]
