"""Which Trainer checkpoint to resume from."""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Optional

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)


def last_complete_checkpoint(folder: str) -> Optional[str]:
    """The newest `checkpoint-N` in `folder` that Trainer finished writing, or None.

    Trainer writes `trainer_state.json` last and in place, so a process killed while saving leaves a newest folder
    without it (or with a torn one); `transformers.trainer_utils.get_last_checkpoint` would pick that folder and
    resuming would fail. This skips it and resumes from the one before."""
    if not os.path.isdir(folder):
        return None
    steps = []
    for name in os.listdir(folder):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and os.path.isdir(os.path.join(folder, name)):
            steps.append(int(match.group(1)))
    for step in sorted(steps, reverse=True):
        path = os.path.join(folder, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        try:
            with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as fh:
                json.load(fh)
        except (OSError, ValueError):
            logger.warning("Skipping %s: Trainer did not finish writing it (interrupted save)", path)
            continue
        return path
    return None
