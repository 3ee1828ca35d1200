"""Registrations that `import hf_tickets` used to do eagerly, done when they are first needed instead.

`import hf_tickets` must stay cheap (`hf-tickets --help` should not wait seconds for torch and transformers), yet
two things must hold as soon as the package is imported:

- `AutoConfig` / `AutoModelForImageClassification.from_pretrained("<a LeNet ticket>")` load the reference CNNs
  with no `trust_remote_code`: when transformers' Auto machinery (`...auto.configuration_auto`,
  `...auto.modeling_auto`) or `transformers.modeling_utils` finishes loading, `hf_tickets.models` is imported,
  which registers them;
- `SparsityConfig(method="imp")` knows every built-in method however the config module was reached (`from
  hf_tickets.config import SparsityConfig` too): when `hf_tickets.config` finishes loading, `hf_tickets.methods`
  is imported, which registers them (config itself imports no method: a layering rule).

Importing the package installs one import hook that does this (and removes itself when both are done); what is
already loaded when hf_tickets is imported is handled at once. An action waits while a module it depends on is still
half-loaded (transformers' Auto modules; for the methods, any hf_tickets module): it runs when the outermost one
finishes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Optional

# module to import -> (the modules whose loading calls for it, the package none of whose modules may be half-loaded)
_ACTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    # hf_tickets.models imports nothing of hf_tickets: only transformers' Auto modules must be whole
    "hf_tickets.models": (
        (
            "transformers.models.auto.configuration_auto",
            "transformers.models.auto.modeling_auto",
            "transformers.modeling_utils",
        ),
        "transformers.models.auto.",
    ),
    # the methods import most of hf_tickets: wait until no hf_tickets module is half-loaded
    "hf_tickets.methods": (("hf_tickets.config",), "hf_tickets."),
}


def _loading(name: str) -> bool:
    """Whether module `name` is in sys.modules but has not finished executing."""
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _pending() -> list[str]:
    return [target for target in _ACTIONS if target not in sys.modules]


def _ready(target: str, just_loaded: Optional[str]) -> bool:
    """A trigger of `target` is loaded, and nothing it depends on is half-loaded (`just_loaded` has finished)."""
    triggers, package = _ACTIONS[target]
    if not any(t in sys.modules and (t == just_loaded or not _loading(t)) for t in triggers):
        return False
    busy = [n for n in list(sys.modules) if n != just_loaded and (n in triggers or n.startswith(package))]
    return not any(_loading(n) for n in busy)


def _run_ready(just_loaded: Optional[str] = None) -> None:
    for target in _pending():
        if _ready(target, just_loaded):
            importlib.import_module(target)
    if not _pending():
        _uninstall()


def _watched(name: str) -> bool:
    return any(name in triggers or name.startswith(package) for triggers, package in _ACTIONS.values())


class _AfterImportHook(importlib.abc.MetaPathFinder):
    """Wraps the loader of each watched module so that the actions are tried right after the module executes."""

    def find_spec(self, fullname, path, target=None):
        if not _watched(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_run(module):
            exec_module(module)
            _run_ready(just_loaded=fullname)

        loader.exec_module = exec_then_run  # this module's own loader instance only
        return spec


_HOOK = _AfterImportHook()


def _uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Run the actions whose triggers are loaded already; hook the rest."""
    _run_ready()
    if _pending() and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
