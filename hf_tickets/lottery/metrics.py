"""Level metrics, computed the same way for both backends from an evaluation history.

An evaluation history is a list of rows `{"step": s, "validation": {...}, "test": {...}}` (metric names without
prefixes). The lockstep backend produces it directly; the Trainer backend's `log_history` is turned into it by
`rows_from_log_history`.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..masks import MaskSet


def accuracy(eval_pred) -> dict[str, float]:
    """Top-1 accuracy, computed directly (evaluate.load would fetch its script from the Hub).

    The lockstep backend computes the same number itself, so it accepts this `compute_metrics` and refuses others.
    """
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def split_prefixes(eval_dataset: Any) -> tuple[str, Optional[str]]:
    """Metric-key prefixes of the validation and test sets: eval_dataset={"validation": ..., "test": ...}."""
    if isinstance(eval_dataset, dict):
        names = list(eval_dataset)
        val = "validation" if "validation" in names else names[0]
        test = "test" if "test" in names and val != "test" else None
        return f"eval_{val}_", (f"eval_{test}_" if test else None)
    return "eval_", None


def rows_from_log_history(entries: list[dict], eval_dataset: Any) -> list[dict]:
    """Trainer log entries -> evaluation history rows (one per evaluated step, validation and test merged)."""
    val, test = split_prefixes(eval_dataset)
    skip = ("runtime", "per_second", "epoch")

    def pick(entry: dict, prefix: str) -> dict:
        return {
            k[len(prefix) :]: v
            for k, v in entry.items()
            if k.startswith(prefix) and not any(s in k for s in skip) and isinstance(v, (int, float))
        }

    rows: dict[int, dict] = {}
    for entry in entries:
        for split, prefix in (("validation", val), ("test", test)):
            if prefix and f"{prefix}loss" in entry:
                rows.setdefault(entry["step"], {"step": entry["step"]})[split] = pick(entry, prefix)
    return [rows[step] for step in sorted(rows)]


def level_metrics(masks: MaskSet, history: list[dict], train_loss: float, steps: int) -> dict[str, Any]:
    """Sparsity, final/best validation metrics, early-stop step (min validation loss) and test metrics there."""
    report = masks.report()
    metrics: dict[str, Any] = {
        "level": masks.metadata.get("level"),
        "sparsity": report["sparsity"],
        "remaining_weights_pct": 100.0 * report["kept"] / max(report["numel"], 1),
        "kept": report["kept"],
        "numel": report["numel"],
        "train_loss": train_loss,
        "steps": steps,
        "layer_sparsity": {name: row["sparsity"] for name, row in report.get("layers", {}).items()},
    }
    evaluated = [row for row in history if "loss" in row.get("validation", {})]
    if evaluated:
        best = min(evaluated, key=lambda row: row["validation"]["loss"])
        metrics["final_eval"] = dict(evaluated[-1]["validation"])
        metrics["best_eval"] = dict(best["validation"])
        metrics["early_stop_step"] = best["step"]
        tested = [row for row in history if "test" in row]
        if tested:
            metrics["test_at_early_stop"] = dict(best.get("test", {}))
            metrics["final_test"] = dict(tested[-1]["test"])
    return metrics


def data_record(source: Any, train_dataset: Any, eval_dataset: Any) -> dict[str, Any]:
    """The data set as every level's metrics record it (`"data"`): name, source, which local copy, how the splits
    were made (from `source`, a `hf_tickets.datasets_source.DataSource` or its dict; `load_splits` makes it and
    `build_trainer` puts it on the trainer as `data_source`) and the split sizes, counted on the data sets the
    levels actually train and evaluate on (after `max_train_samples` / `max_eval_samples` cuts)."""
    if source is None:
        record: dict[str, Any] = {"name": None, "source": "not recorded (data sets given to the trainer directly)"}
    else:
        record = dict(source.to_dict() if hasattr(source, "to_dict") else source)
    sizes: dict[str, int] = {}
    for split, dataset in [("train", train_dataset)] + (
        list(eval_dataset.items()) if isinstance(eval_dataset, dict) else [("validation", eval_dataset)]
    ):
        try:
            sizes[split] = len(dataset)
        except TypeError:  # None, or an iterable data set without a length
            continue
    record["splits"] = sizes
    return record
