"""pytest plugin: run transformers' own Trainer tests with `Trainer` replaced by `hf_tickets.TicketTrainer`.

Loaded with `-p upstream_trainer_plugin` (this folder on PYTHONPATH) by `scripts/upstream_trainer_tests.py`.
The mode comes from the environment variable HF_TICKETS_UPSTREAM_MODE:

    stock     plain transformers.Trainer (nothing is replaced)
    ticket    TicketTrainer built exactly like Trainer (no sparsity argument)
    ticket0   TicketTrainer with sparsity_config=SparsityConfig(sparsity=0.0) unless the test passes one
    ticket50  TicketTrainer with sparsity_config=SparsityConfig(sparsity=0.5) unless the test passes one

The replacement is done when pytest imports this plugin, i.e. before any conftest or test module runs
`from transformers import Trainer`: `transformers.Trainer` and `transformers.trainer.Trainer` are rebound to a
subclass of `TicketTrainer` that adds the mode's default keyword arguments. `TicketTrainer` itself was created
from the original class (hf_tickets is imported first), so its `super()` calls still reach the real Trainer.
"""

from __future__ import annotations

import os

MODE_ENV = "HF_TICKETS_UPSTREAM_MODE"
MODES = {"stock": None, "ticket": None, "ticket0": 0.0, "ticket50": 0.5}

MODE = os.environ.get(MODE_ENV, "stock")
if MODE not in MODES:
    raise RuntimeError(f"{MODE_ENV}={MODE!r} is not one of {sorted(MODES)}")

# Import the installed transformers before anything else can put another copy (a checkout's src/) on sys.path.
import transformers  # noqa: E402
import transformers.trainer  # noqa: E402

ORIGINAL_TRAINER = transformers.trainer.Trainer
REPLACEMENT = None


def _install() -> None:
    global REPLACEMENT
    if MODE == "stock":
        return
    import hf_tickets
    from hf_tickets import SparsityConfig, TicketTrainer

    sparsity = MODES[MODE]

    class UpstreamTicketTrainer(TicketTrainer):
        """TicketTrainer with this run's default keyword arguments (see the module docstring)."""

        def __init__(self, *args, **kwargs):
            if sparsity is not None and "sparsity_config" not in kwargs and "masks" not in kwargs:
                kwargs["sparsity_config"] = SparsityConfig(sparsity=sparsity)
            super().__init__(*args, **kwargs)

    UpstreamTicketTrainer.__module__ = TicketTrainer.__module__
    REPLACEMENT = UpstreamTicketTrainer
    # `from transformers import Trainer` reads the package attribute (the lazy module's __getattr__ is only
    # consulted for missing names); `from transformers.trainer import Trainer` reads the module's.
    transformers.Trainer = UpstreamTicketTrainer
    transformers.trainer.Trainer = UpstreamTicketTrainer
    _install.hf_tickets_file = hf_tickets.__file__


_install.hf_tickets_file = None
_install()


def pytest_report_header(config):
    lines = [
        f"upstream_trainer_plugin: mode={MODE}, transformers {transformers.__version__} ({transformers.__file__})"
    ]
    if REPLACEMENT is not None:
        lines.append(
            f"upstream_trainer_plugin: transformers.Trainer -> {REPLACEMENT.__module__}.{REPLACEMENT.__qualname__}"
            f" (hf_tickets from {_install.hf_tickets_file})"
        )
    return lines


def pytest_configure(config):
    # Markers that transformers' own conftest/pyproject register; declared here so that a bare export of
    # tests/trainer runs without PytestUnknownMarkWarning noise.
    for marker in ("torch_compile_test", "torch_export_test", "flash_attn_test", "generate", "is_training_test"):
        config.addinivalue_line("markers", f"{marker}: marker of transformers' test suite")


def pytest_sessionstart(session):
    # Guard against a test module that was imported before the plugin (e.g. by a conftest that imports it).
    if REPLACEMENT is not None:
        assert transformers.Trainer is REPLACEMENT and transformers.trainer.Trainer is REPLACEMENT
