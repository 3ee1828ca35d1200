"""Every file and folder of a lottery run, in one place, and the atomic publish of a finished level.

    <output_dir>/run_identity.json          what the run is (identity.py); a restart must match it
    <root>/init_weights.safetensors         theta_0 of the replicate: rewind target of rewind="init" and controls
    <root>/rewind_point/                    step k of level 0 (rewind="step"/"lr"), a Trainer checkpoint folder that
                                            both backends write and read (rewind.py)
    <root>/level_NN/                        trunk level: model.safetensors, masks.safetensors, metrics.json, card
    <root>.reinit/level_NN/                 the controls, beside their trunk
    <root>.random_prune/level_NN/
    <root>.reinit/reinit_weights.safetensors
    <root>/imp_report.json, imp_accuracy.png, imp_early_stop.png
    <output_dir>/imp_report.json, ...       with replicates: the replicates' mean and spread

with `<root>` = `output_dir` for one replicate and `output_dir/replicate_R` for several. A level is trained in
`level_NN.partial/` and renamed to `level_NN/` when complete (`publish_level`), so a crash never leaves a
half-written level and `is_complete` tells a restart where to go on.

A peft (LoRA) model's level folders and rewind point hold what peft saves (`adapter_model.safetensors`,
`adapter_config.json`) instead of `model.safetensors`; its frozen base is theta_0's, pruned by the level's masks.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..files import (
    METRICS_NAME,  # a checkpoint folder's file: the one table of those is files.py
    write_json_atomic,  # noqa: F401 (the lottery writes JSON through the one atomic writer)
)

CONTROL_KINDS = ("reinit", "random_prune")
ARM_KINDS = ("trunk", *CONTROL_KINDS)

INIT_WEIGHTS_NAME = "init_weights.safetensors"
REINIT_WEIGHTS_NAME = "reinit_weights.safetensors"
REWIND_DIR = "rewind_point"
RUN_REPORT_NAME = "imp_report.json"
ACCURACY_PLOT = "imp_accuracy.png"
EARLY_STOP_PLOT = "imp_early_stop.png"
REPLICATE_PREFIX = "replicate_"
PARTIAL_SUFFIX = ".partial"
PICKLED_ARGS_NAME = "training_args.bin"  # Trainer's pickle of TrainingArguments: never kept in a level folder
LEVEL_START_NAME = "level_start.json"  # in a .partial folder: where the level's own log entries begin


def replicate_root(output_dir: str, replicate: int, replicates: int) -> str:
    """Folder of one replicate's trunk: `output_dir` itself when there is only one."""
    return output_dir if replicates == 1 else os.path.join(output_dir, f"{REPLICATE_PREFIX}{replicate}")


def replicate_roots(output_dir: str) -> list[str]:
    """The replicate folders a run holds (`replicate_0`, ...), or `[output_dir]` for a run of one."""
    if not os.path.isdir(output_dir):
        return [output_dir]
    found = sorted(
        (int(name[len(REPLICATE_PREFIX) :]), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if name.startswith(REPLICATE_PREFIX) and name[len(REPLICATE_PREFIX) :].isdigit()
    )
    return [path for _, path in found] or [output_dir]


def control_dir(trunk_dir: str, kind: str) -> str:
    return os.path.normpath(trunk_dir) + f".{kind}"


def arm_root(trunk_dir: str, kind: str) -> str:
    """Where arm `kind` ("trunk" or a control) of a trunk writes its level folders."""
    return trunk_dir if kind == "trunk" else control_dir(trunk_dir, kind)


def level_dir(root: str, level: int) -> str:
    return os.path.join(root, f"level_{level:02d}")


def init_weights_path(root: str) -> str:
    return os.path.join(root, INIT_WEIGHTS_NAME)


def reinit_weights_path(trunk_dir: str) -> str:
    return os.path.join(control_dir(trunk_dir, "reinit"), REINIT_WEIGHTS_NAME)


def rewind_point_dir(root: str) -> str:
    return os.path.join(root, REWIND_DIR)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METRICS_NAME))


def level_number(folder: str) -> int:
    return int(os.path.basename(os.path.normpath(folder))[len("level_") :])


def finished_levels(root: str) -> list[int]:
    """Every finished level (0 included) of one arm's folder."""
    if not os.path.isdir(root):
        return []
    found = [
        int(name[6:])
        for name in os.listdir(root)
        if name.startswith("level_") and name[6:].isdigit() and is_complete(os.path.join(root, name))
    ]
    return sorted(found)


def has_finished_levels(output_dir: str) -> bool:
    """True when `output_dir` is a run with a finished level in its trunk (in every replicate's, with several)."""
    return all(finished_levels(root) for root in replicate_roots(output_dir))


def trunk_levels(trunk_dir: str) -> list[int]:
    """Finished pruned levels (>= 1) of a trunk."""
    return [level for level in finished_levels(trunk_dir) if level >= 1]


def read_metrics(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, METRICS_NAME), encoding="utf-8") as fh:
        return json.load(fh)


def publish_level(partial: str, final_dir: str, metrics: dict) -> None:
    """metrics.json (written last into the level, so a `.partial` folder holding it is finished), then
    `finish_publish`."""
    write_json_atomic(os.path.join(partial, METRICS_NAME), metrics)
    finish_publish(partial, final_dir)


def finish_publish(partial: str, final_dir: str) -> None:
    """Drop the level's Trainer checkpoints and pickled training arguments (the level keeps
    `training_args.json`), then publish the folder with one rename. Safe to repeat after a crash at any point."""
    for name in os.listdir(partial):
        if name.startswith(PREFIX_CHECKPOINT_DIR):
            shutil.rmtree(os.path.join(partial, name))
    for name in (PICKLED_ARGS_NAME, LEVEL_START_NAME):
        if os.path.isfile(os.path.join(partial, name)):
            os.remove(os.path.join(partial, name))
    if os.path.isdir(final_dir):
        shutil.rmtree(final_dir)
    os.replace(partial, final_dir)
