"""Method registry: one class per method, looked up by `SparsityConfig.method`."""

from __future__ import annotations

from . import imp, oneshot  # noqa: F401  (register "imp", "magnitude" and "random")
from .base import SparsityMethod, available_methods, get_method, register_method

__all__ = ["SparsityMethod", "available_methods", "get_method", "register_method"]
