"""Evaluation metrics the lottery runs compute, shared by both engines."""

from __future__ import annotations

import numpy as np


def accuracy(eval_pred) -> dict[str, float]:
    """Top-1 accuracy, computed directly (evaluate.load would fetch its script from the Hub).

    The batched engine computes the same number itself, so it accepts this `compute_metrics` and refuses others.
    """
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}
