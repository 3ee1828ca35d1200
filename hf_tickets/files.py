"""The files of a sparse checkpoint folder, in one table, and how they are read and written.

A checkpoint folder (what `TicketTrainer.save_model`, a lottery level or a ticket holds, and what a Hub repo holds):

    model.safetensors            dense weights with exact zeros (transformers' own file; shards + index allowed)
    config.json                  transformers' model config
    masks.safetensors            bit-packed masks, JSON metadata in the header (masks.py)
    sparsity_report.json         the masks' counts in plain JSON
    sparsity_config.json         the SparsityConfig (config.py)
    sparsity_state.safetensors   a method's tensor state (RigL's ever-active history, ...), checkpoints only
    metrics.json                 a lottery level's metrics (lottery/layout.py owns the rest of a run's layout)
    README.md                    the model card, with plots next to it (cards.py)

Reading goes through `resolve_file`: a local folder, else `transformers.utils.cached_file` (the Hub cache,
`revision`, `HF_HUB_OFFLINE` / `local_files_only`, `HF_ENDPOINT`). Writing goes through `atomic_write`: a temporary
name, then one rename, so a crash never leaves a torn file. This module is a leaf: it imports nothing of hf_tickets.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional, Union

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MODEL_CONFIG_NAME = "config.json"
MASKS_NAME = "masks.safetensors"
SPARSITY_REPORT_NAME = "sparsity_report.json"
SPARSITY_CONFIG_NAME = "sparsity_config.json"
STATE_TENSORS_NAME = "sparsity_state.safetensors"
METRICS_NAME = "metrics.json"
TRAINING_ARGS_NAME = "training_args.json"  # TrainingArguments as JSON (Trainer's training_args.bin is a pickle)
STEP_LOG_NAME = "train_log.jsonl"  # a lottery run's per-step Trainer logs, one JSON object a line (run_log.py)
CARD_NAME = "README.md"
# plots a card shows, written next to it
SPARSITY_PLOT = "sparsity_per_layer.png"
CHURN_PLOT = "mask_churn.png"

# What a checkpoint folder may publish: safetensors, JSON, text and images. Pickles (training_args.bin, *.pt,
# *.pth, optimizer/scheduler state) are never uploaded by hf_tickets, and nothing it reads from a repo is a pickle.
PUBLISH_PATTERNS = ("*.safetensors", "*.json", "*.md", "*.png", "*.txt", "*.model", "*.jinja")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[str], Any]) -> None:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it to `path` (atomic on one file system)."""
    path = str(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def write_json_atomic(path: PathLike, data: Any) -> None:
    """JSON with sorted keys and a final newline, written atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: PathLike) -> Any:
    """A JSON file, with a ValueError naming it when it is not JSON (files from a repo are never unpickled)."""
    with open(path, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}): re-save it with hf_tickets.") from err


def is_local(name_or_path: PathLike) -> bool:
    return os.path.isdir(str(name_or_path))


def resolve_file(
    name_or_path: PathLike,
    filename: str,
    revision: Optional[str] = None,
    *,
    required: bool = True,
    cache_dir: Optional[PathLike] = None,
    token: Optional[Union[str, bool]] = None,
    local_files_only: bool = False,
    force_download: bool = False,
    subfolder: str = "",
) -> Optional[str]:
    """Local path of `filename` in a folder or a Hub repo (downloaded into the Hub cache at `revision`).

    Offline mode (`HF_HUB_OFFLINE=1` or `local_files_only=True`) answers from the cache. With `required=False` a
    file the folder or repo does not have gives None; a repo or revision that does not exist, or a file that is
    neither reachable nor cached, is always a ValueError.
    """
    path = str(name_or_path)
    if os.path.isdir(path):
        local = os.path.join(path, subfolder, filename)
        if os.path.isfile(local):
            return local
        if required:
            raise ValueError(f"{path!r} has no {filename}: is it a folder written by hf_tickets?")
        return None
    if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") > 1:
        raise ValueError(f"{path!r} is neither a folder nor a Hub repo id (such as 'org/name').")
    from transformers.utils import cached_file

    try:
        resolved = cached_file(
            path,
            filename,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            force_download=force_download,
            subfolder=subfolder,
            _raise_exceptions_for_missing_entries=False,
        )
    except OSError as err:  # no such repo or revision, not authorised, or offline and not in the cache
        where = f"{path!r}" + (f" at revision {revision!r}" if revision else "")
        raise ValueError(f"cannot get {filename} of {where}: {err}") from err
    if resolved is None and not _known_missing(path, filename, revision, cache_dir, subfolder):
        # cached_file answers None both for "the repo has no such file" and for "offline / unreachable and not
        # cached"; only the first one (the Hub said 404, recorded in the cache) is a missing file
        where = f"{path!r}" + (f" at revision {revision!r}" if revision else "")
        raise ValueError(
            f"cannot get {filename} of {where}: it is not in the local Hub cache and the Hub could not be asked "
            "(offline mode, local_files_only, or no connection)."
        )
    if resolved is None and required:
        where = f"{path!r}" + (f" at revision {revision!r}" if revision else "")
        raise ValueError(f"{where} has no {filename}: is it a checkpoint written by hf_tickets?")
    return resolved


def _known_missing(repo_id: str, filename: str, revision: Optional[str], cache_dir, subfolder: str) -> bool:
    """Whether the Hub cache records that the repo has no such file at that revision (a 404 it was told)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.file_download import _CACHED_NO_EXIST

    name = f"{subfolder}/{filename}" if subfolder else filename
    return try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision) is _CACHED_NO_EXIST


def weight_files(folder: str) -> list[str]:
    """The model weight files of a folder (`model.safetensors`, or the shards its index names)."""
    index = os.path.join(folder, WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, WEIGHTS_NAME)
    return [single] if os.path.isfile(single) else []


def publishable(name: str) -> bool:
    """Whether a file of a checkpoint folder is uploaded: safetensors, JSON, text, images; never a pickle."""
    import fnmatch

    base = os.path.basename(name)
    if base.endswith(PICKLE_SUFFIXES) or base.startswith("."):
        return False
    return any(fnmatch.fnmatch(base, p) for p in PUBLISH_PATTERNS)
