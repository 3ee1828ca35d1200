"""Where a lottery run's pieces live on disk: the trunk's level folders and the controls' folders beside it."""

from __future__ import annotations

import os

from .levels import is_complete

CONTROL_KINDS = ("reinit", "random_prune")


def control_dir(trunk_dir: str, kind: str) -> str:
    return os.path.normpath(trunk_dir) + f".{kind}"


def trunk_levels(trunk_dir: str) -> list[int]:
    """Finished pruned levels (>= 1) of a trunk."""
    found = []
    for name in os.listdir(trunk_dir):
        if name.startswith("level_") and name[6:].isdigit() and is_complete(os.path.join(trunk_dir, name)):
            found.append(int(name[6:]))
    return sorted(level for level in found if level >= 1)
