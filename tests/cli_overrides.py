"""Overrides that shrink the quickstart recipe to a seconds-long CLI run, shared by the CLI tests."""

from __future__ import annotations


def tiny(output_dir, levels: int = 2) -> list[str]:
    """A run of `levels` pruned levels of 4 steps, late rewinding to step 1, and the reinit control at level 2."""
    return [
        f"training.output_dir={output_dir}",
        "training.max_steps=4",
        "training.eval_steps=2",
        "training.logging_steps=1",
        f"sparsity.levels={levels}",
        "sparsity.rewind_step=1",
        "controls=[reinit]",
        "control_levels=[2]",
    ]
