"""`SparsityConfig`: what to prune, how much, and how; validated before any training starts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Optional, Union

from transformers.utils import PushToHubMixin

logger = logging.getLogger(__name__)

CONFIG_NAME = "sparsity_config.json"

PATTERNS_HELP = '"unstructured", or "N:M" such as "2:4" (N kept weights in every group of M)'
SCOPES = ("global", "layerwise")


def _known_methods() -> tuple[str, ...]:
    # Imported lazily: the method registry imports this module.
    from .methods import available_methods

    return available_methods()


def parse_nm_pattern(pattern: str) -> Optional[tuple[int, int]]:
    """Return (N, M) for an "N:M" pattern, None for "unstructured"; raise on anything else."""
    if pattern == "unstructured":
        return None
    parts = pattern.split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return n, m
    raise ValueError(f"SparsityConfig.pattern={pattern!r} is not valid: use {PATTERNS_HELP}, with 0 < N < M.")


@dataclass
class SparsityConfig(PushToHubMixin):
    """How to sparsify a model.

    Args:
        method: how masks are chosen: `"magnitude"` (keep the largest |w|) or `"random"` (seeded).
        sparsity: fraction of the targeted weights set to zero, in [0, 1).
        pattern: `"unstructured"` or `"N:M"` (e.g. `"2:4"`).
        scope: `"global"` ranks all targeted weights together; `"layerwise"` prunes each tensor to `sparsity`.
        target_modules: module names to prune. A string is a regex that must fully match a module name; a list
            matches a name exactly or as a `.`-separated suffix (as in peft). `None` targets the weights of every
            `nn.Linear`, `nn.Conv1d/2d/3d` and transformers `Conv1D`, output heads included, except weights tied to
            an input embedding.
        exclude_modules: module names never pruned (same matching rules as `target_modules`).
        layer_rates: per-layer pruning-rate multipliers, a dict or a JSON string mapping a module-name regex to a
            factor. Matching layers are pruned on their own at `sparsity * factor`; 0.5 is the LTH papers' "output
            layer at half rate"; 0 leaves the layer dense.
        seed: seed of every random choice (random masks, random re-initialisation), shared by all ranks.
    """

    method: str = field(default="magnitude", metadata={"help": "Mask selection method: magnitude or random."})
    sparsity: float = field(default=0.5, metadata={"help": "Fraction of targeted weights set to zero, in [0, 1)."})
    pattern: str = field(default="unstructured", metadata={"help": f"Sparsity pattern: {PATTERNS_HELP}."})
    scope: str = field(default="global", metadata={"help": "global (one threshold) or layerwise (per tensor)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Modules to prune: a full-match regex, or a list of names/suffixes. None = all Linear/Conv."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules never pruned: a full-match regex, or a list of names/suffixes."}
    )
    layer_rates: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": 'Per-layer rate multipliers as JSON, e.g. {"classifier": 0.5} prunes the head at half rate.'},
    )
    seed: int = field(default=0, metadata={"help": "Seed for every random choice; identical on all ranks."})

    def __post_init__(self) -> None:
        if isinstance(self.layer_rates, str):
            try:
                self.layer_rates = json.loads(self.layer_rates)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"SparsityConfig.layer_rates={self.layer_rates!r} is not valid JSON: pass a dict such as "
                    '{"classifier": 0.5}.'
                ) from err
        self.validate()

    # ---- validation -------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise a ValueError naming the field and the fix for a config that cannot work."""
        methods = _known_methods()
        if self.method not in methods:
            raise ValueError(f"SparsityConfig.method={self.method!r} is unknown: choose one of {list(methods)}.")
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(
                f"SparsityConfig.sparsity={self.sparsity!r} is outside [0, 1): give the fraction of weights to zero, "
                "e.g. 0.9."
            )
        self.sparsity = float(self.sparsity)
        parse_nm_pattern(self.pattern)
        if self.scope not in SCOPES:
            raise ValueError(f"SparsityConfig.scope={self.scope!r} is unknown: choose one of {list(SCOPES)}.")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list, tuple, set)):
                raise ValueError(f"SparsityConfig.{name} must be a regex string or a list of names, got {value!r}.")
            if isinstance(value, (tuple, set)):
                setattr(self, name, sorted(value))
        if self.layer_rates is not None:
            if not isinstance(self.layer_rates, dict):
                raise ValueError(f"SparsityConfig.layer_rates must be a dict or JSON object, got {self.layer_rates!r}.")
            for pattern, rate in self.layer_rates.items():
                if not isinstance(rate, (int, float)) or rate < 0 or float(rate) * self.max_rate() >= 1.0:
                    raise ValueError(
                        f"SparsityConfig.layer_rates[{pattern!r}]={rate!r} gives a rate outside [0, 1): use a factor "
                        f">= 0 with factor * {self.max_rate()} < 1."
                    )
        if not isinstance(self.seed, int):
            raise ValueError(f"SparsityConfig.seed must be an int, got {self.seed!r}.")

    def max_rate(self) -> float:
        """The base rate that `layer_rates` factors multiply (overridden by iterative methods)."""
        return self.sparsity

    @property
    def nm(self) -> Optional[tuple[int, int]]:
        return parse_nm_pattern(self.pattern)

    # ---- serialisation ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def non_default_fields(self) -> dict:
        """Fields that differ from their defaults: what makes this run different from the default one."""
        out = {}
        for f in fields(self):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            value = getattr(self, f.name)
            if value != default:
                out[f.name] = value
        return out

    def hashname(self, length: int = 10) -> str:
        """A short, stable hash of the non-default fields, for run-directory names.

        Adding a field with a default later keeps old hashes, because defaults are not hashed.
        """
        payload = json.dumps(self.non_default_fields(), sort_keys=True, default=str)
        return hashlib.md5(payload.encode()).hexdigest()[:length]

    def save_pretrained(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs) -> None:
        """Write `sparsity_config.json` (sorted keys, version stamp) into `save_directory`."""
        from . import __version__

        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory={save_directory!r} is a file: pass a directory.")
        os.makedirs(save_directory, exist_ok=True)
        payload = dict(self.to_dict(), hf_tickets_version=__version__)
        path = os.path.join(save_directory, CONFIG_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(str(save_directory)))
            self._upload_modified_files(
                save_directory, repo_id, [path], commit_message=kwargs.pop("commit_message", None), token=kwargs.get("token")
            )

    @classmethod
    def from_dict(cls, data: dict) -> "SparsityConfig":
        """Build a config; keys this version does not know are dropped with a warning (forward compatibility)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"hf_tickets_version"})
        if unknown:
            logger.warning("Ignoring unknown SparsityConfig keys %s (written by a newer hf_tickets?).", unknown)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Union[str, os.PathLike], revision: Optional[str] = None, **hub_kwargs
    ) -> "SparsityConfig":
        """Load from a local folder or a Hub repo id holding `sparsity_config.json`."""
        path = _resolve_file(pretrained_model_name_or_path, CONFIG_NAME, revision=revision, **hub_kwargs)
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: re-save it with SparsityConfig.save_pretrained.") from err
        return cls.from_dict(data)


def _resolve_file(name_or_path: Union[str, os.PathLike], filename: str, revision: Optional[str] = None, **hub_kwargs) -> str:
    """A file from a local folder, else from the Hub (honours HF_ENDPOINT and the local cache)."""
    local = os.path.join(str(name_or_path), filename)
    if os.path.isdir(str(name_or_path)):
        if not os.path.isfile(local):
            raise ValueError(f"{name_or_path!r} has no {filename}: is it a folder written by hf_tickets?")
        return local
    from huggingface_hub import hf_hub_download

    return hf_hub_download(str(name_or_path), filename, revision=revision, **hub_kwargs)
