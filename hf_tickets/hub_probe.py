"""Local path or Hub id, and is the Hub there: decided once, quickly, before anything is downloaded or trained.

`from_pretrained` and `hf_hub_download` retry an unreachable endpoint for about 30 s and then raise a long
traceback that never mentions a recipe's `offline_fallback`; a mistyped local path (`runs/nope`) is taken for a Hub
repo id and ends the same way. So the CLI asks here first:

- `looks_like_local_path`: a name with a path separator, or starting with `.` or `~`, or whose parent folder
  exists, is a local path; when it does not exist, `require_folder` raises `MissingPathError` ("missing folder",
  CLI exit 2) and nothing is sent to the Hub;
- `hub_unreachable_reason`: one HEAD request to the endpoint (`HF_ENDPOINT`) with a short timeout, through
  huggingface_hub's own session (same proxies and CA bundle as a real download);
- `require_hub_model`: a Hub id that is neither cached nor reachable fails at once, naming the fixes.

This module is a leaf (it imports nothing of hf_tickets), so data loading can share the probe.
"""

from __future__ import annotations

import os
from typing import Optional

HUB_PROBE_TIMEOUT = 3.0  # seconds for the one probe; a Hub that answers at all answers well within this
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


class MissingPathError(FileNotFoundError, ValueError):
    """A local path that does not exist. A ValueError too, so the CLI reports it as bad input (exit 2)."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class HubUnreachableError(ConnectionError):
    """The Hub cannot be reached and what was asked for is not in the local cache."""


def offline_mode() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE set: the Hub is not to be asked at all."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(n, "").strip().upper() in _TRUE_VALUES for n in names)


def hub_unreachable_reason(timeout: float = HUB_PROBE_TIMEOUT) -> Optional[str]:
    """None if the Hub endpoint answers at all (any HTTP status), else why not, after at most `timeout` seconds."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as err:  # noqa: BLE001 (whatever the transport raises means: not reachable)
        return f"{constants.ENDPOINT} unreachable: {type(err).__name__}: {err}"
    return None


def looks_like_local_path(name: str) -> bool:
    """True for what a person means as a path: `./x`, `~/x`, `/abs/x`, `runs/a/b` (a Hub id has at most one `/`), a
    file name such as `masks.safetensors`, or `runs/nope` when the folder `runs/` exists here. `owner/name` with no
    local `owner/` folder is taken for a Hub id."""
    name = str(name)
    if name.startswith((".", "~", "/", os.sep)) or (os.sep != "/" and os.sep in name):
        return True
    if name.count("/") > 1 or name.endswith((".safetensors", ".json")):
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)


def require_folder(path: str, what: str = "folder") -> str:
    """`path` if it is an existing folder; a missing local path raises `MissingPathError`."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file, not a {what}: pass the {what} itself.")
    raise MissingPathError(2, f"missing folder (not a {what}: nothing is at this path)", path)


def require_local_path(name: str, what: str = "path") -> None:
    """A `name` that looks like a local path (`looks_like_local_path`) but does not exist raises `MissingPathError`;
    a Hub id or an existing path passes. For names that a fallback would otherwise replace without a word."""
    if looks_like_local_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise MissingPathError(2, f"missing folder ({what} looks like a local path; not sent to the Hub)", name)


def in_hub_cache(repo_id: str, filename: str = "config.json", revision: Optional[str] = None) -> bool:
    """Whether `filename` of `repo_id` is in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
    except Exception:  # noqa: BLE001 (not a valid repo id: not cached)
        return False


def require_hub_model(
    repo_id: str, filename: str = "config.json", revision: Optional[str] = None, fix: str = ""
) -> None:
    """Fail at once when `repo_id` is neither a local folder, nor cached, nor reachable on the Hub.

    `fix` is added to the message (what this caller can do instead, e.g. a recipe's `model.offline_fallback`).
    """
    if os.path.isdir(repo_id):
        return
    if looks_like_local_path(repo_id):
        raise MissingPathError(2, "missing folder (no such local path; not sent to the Hub)", repo_id)
    if in_hub_cache(repo_id, filename, revision):
        return
    if offline_mode():
        reason = "HF offline mode is set (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) and it is not in the local cache"
    else:
        reason = hub_unreachable_reason()
        if reason is None:
            return
    raise HubUnreachableError(
        f"cannot load {repo_id!r} from the Hugging Face Hub: {reason}. Fix: "
        + (f"{fix}; or " if fix else "")
        + "pass a local folder that holds it, or download it once while online (it is then read from the cache; "
        "HF_HUB_OFFLINE=1 skips the Hub)."
    )
