"""CPU threads for `hf-tickets run`: a small model trains fastest on one torch thread, so that is the default.

torch sizes its intra-op thread pool to the machine's cores. For the networks of the lottery-ticket literature
(LeNet, Conv-2/4/6 at small batch sizes) every op is too small to split, and the threads mostly wait on each other
and on whatever else runs: the quickstart took 4-5x longer without OMP_NUM_THREADS=1 (issue 15).
`benchmarks/cpu_threads.py` measures it (numbers in the README). When the user sets neither OMP_NUM_THREADS nor
MKL_NUM_THREADS, `hf-tickets run` sets `torch.set_num_threads(SMALL_MODEL_THREADS)` and says so in one line;
a user's own setting is never changed. Runs on a GPU are left alone.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

SMALL_MODEL_THREADS = 1  # the fastest setting measured by benchmarks/cpu_threads.py (README: "CPU threads")
USER_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def pick_cpu_threads(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Set torch's CPU threads to `SMALL_MODEL_THREADS` unless the user chose a number (or a GPU is used).

    Returns the one line to show the user, or None when nothing was changed.
    """
    environ = os.environ if environ is None else environ
    if any(environ.get(name, "").strip() for name in USER_SETTINGS):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    default = torch.get_num_threads()
    if default == SMALL_MODEL_THREADS:
        return None
    torch.set_num_threads(SMALL_MODEL_THREADS)
    return (
        f"using {SMALL_MODEL_THREADS} CPU thread (torch's default here: {default}; fastest for small models, "
        "see the README's 'CPU threads'); set OMP_NUM_THREADS to choose"
    )
