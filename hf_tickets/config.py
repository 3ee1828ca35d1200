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
REWIND_MODES = ("init", "step", "lr", "none")
ITERATIVE_METHODS = ("imp",)


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
        method: how masks are chosen: `"magnitude"` (keep the largest |w|), `"random"` (seeded), or `"imp"`
            (iterative magnitude pruning: train, prune, rewind, repeat).
        sparsity: fraction of the targeted weights set to zero, in [0, 1). Required for one-shot methods; for
            `"imp"` it is the target that implies `levels` (give one of the two).
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
        prune_fraction: IMP: fraction of the still-alive weights pruned after each level (0.2 in the LTH papers).
        levels: IMP: number of pruning levels after the dense level 0 (level L keeps (1 - prune_fraction)**L).
        rewind: IMP: where each level restarts from. `"init"`: surviving weights back to their values at step 0
            (the pretrained weights for a pretrained model); `"step"`: late rewinding to `rewind_step` (weights,
            optimizer, LR scheduler, RNG and data position as they were at that step of level 0); `"lr"`: keep the
            trained weights and restart the schedule from `rewind_step` (learning-rate rewinding); `"none"`: keep
            the trained weights and fine-tune at the last learning rate of the previous level.
        rewind_step: IMP: the step k of `rewind="step"`/`"lr"`: an integer number of optimizer steps, or a
            fraction in (0, 1) of a level's training steps.
    """

    method: str = field(default="magnitude", metadata={"help": "Mask selection method: magnitude or random."})
    sparsity: Optional[float] = field(
        default=None, metadata={"help": "Fraction of targeted weights set to zero, in [0, 1) (IMP: the target)."}
    )
    pattern: str = field(default="unstructured", metadata={"help": f"Sparsity pattern: {PATTERNS_HELP}."})
    scope: str = field(default="global", metadata={"help": "global (one threshold) or layerwise (per tensor)."})
    # Annotated as lists so that HfArgumentParser can parse them (nargs="+"); in Python a plain string is accepted
    # too and means a full-match regex, as in peft.
    target_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules to prune: names or name suffixes (in Python also a full-match regex string). "
            "None = every Linear/Conv weight."
        },
    )
    exclude_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules never pruned: names or suffixes (in Python also a regex string)."}
    )
    layer_rates: Optional[Union[dict, str]] = field(
        default=None,
        metadata={
            "help": 'Per-layer rate multipliers as JSON, e.g. {"classifier": 0.5} prunes the head at half rate.'
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for every random choice; identical on all ranks."})
    prune_fraction: float = field(
        default=0.2, metadata={"help": "IMP: fraction of the still-alive weights pruned at the end of each level."}
    )
    levels: Optional[int] = field(
        default=None, metadata={"help": "IMP: pruning levels after the dense level 0 (or give a target sparsity)."}
    )
    rewind: str = field(default="init", metadata={"help": "IMP: init, step (late rewinding), lr or none."})
    rewind_step: Optional[float] = field(
        default=None, metadata={"help": "IMP: rewind step k: optimizer steps (int) or a fraction (0, 1) of a level."}
    )

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
        iterative = self.method in ITERATIVE_METHODS
        if self.sparsity is None and not iterative and self.pattern == "unstructured":
            raise ValueError(
                f"SparsityConfig.sparsity is required for method={self.method!r}: give the fraction of weights to "
                "zero, e.g. sparsity=0.9."
            )
        if self.sparsity is not None:
            if (
                isinstance(self.sparsity, bool)
                or not isinstance(self.sparsity, (int, float))
                or not (0.0 <= float(self.sparsity) < 1.0)
            ):
                raise ValueError(
                    f"SparsityConfig.sparsity={self.sparsity!r} is outside [0, 1): give the fraction of weights to "
                    "zero, e.g. 0.9."
                )
            self.sparsity = float(self.sparsity)
        nm = parse_nm_pattern(self.pattern)
        if nm is not None and self.sparsity is not None and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(
                f"SparsityConfig.sparsity={self.sparsity} contradicts pattern={self.pattern!r}, which implies "
                f"{1 - nm[0] / nm[1]}: leave sparsity unset for N:M patterns."
            )
        if iterative:
            self._validate_iterative()
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
                raise ValueError(
                    f"SparsityConfig.layer_rates must be a dict or JSON object, got {self.layer_rates!r}."
                )
            for pattern, rate in self.layer_rates.items():
                if not isinstance(rate, (int, float)) or rate < 0 or float(rate) * self.max_rate() >= 1.0:
                    raise ValueError(
                        f"SparsityConfig.layer_rates[{pattern!r}]={rate!r} gives a rate outside [0, 1): use a factor "
                        f">= 0 with factor * {self.max_rate()} < 1."
                    )
        if not isinstance(self.seed, int):
            raise ValueError(f"SparsityConfig.seed must be an int, got {self.seed!r}.")

    def _validate_iterative(self) -> None:
        if self.pattern != "unstructured":
            raise ValueError(
                f"SparsityConfig.pattern={self.pattern!r} is not supported with method='imp': use unstructured."
            )
        if (
            isinstance(self.prune_fraction, bool)
            or not isinstance(self.prune_fraction, (int, float))
            or not (0.0 < float(self.prune_fraction) < 1.0)
        ):
            raise ValueError(
                f"SparsityConfig.prune_fraction={self.prune_fraction!r} is outside (0, 1): give the fraction of alive "
                "weights pruned per level, e.g. 0.2."
            )
        if self.levels is not None and (
            isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 1
        ):
            raise ValueError(f"SparsityConfig.levels={self.levels!r} must be an integer >= 1.")
        if self.levels is None and self.sparsity is None:
            raise ValueError("method='imp' needs SparsityConfig.levels or a target SparsityConfig.sparsity: give one.")
        if self.levels is not None and self.sparsity is not None and self.levels != self.implied_levels():
            raise ValueError(
                f"SparsityConfig.levels={self.levels} and sparsity={self.sparsity} contradict each other: pruning "
                f"{self.prune_fraction:.0%} per level reaches {self.sparsity} after {self.implied_levels()} levels. "
                "Give only one of them."
            )
        if self.rewind not in REWIND_MODES:
            raise ValueError(f"SparsityConfig.rewind={self.rewind!r} is unknown: choose one of {list(REWIND_MODES)}.")
        if self.rewind == "step" and self.rewind_step is None:
            raise ValueError("SparsityConfig.rewind='step' needs rewind_step: an int step k or a fraction in (0, 1).")
        if self.rewind_step is not None:
            k = self.rewind_step
            if isinstance(k, bool) or not isinstance(k, (int, float)) or k < 0 or (k >= 1 and float(k) != int(k)):
                raise ValueError(
                    f"SparsityConfig.rewind_step={k!r} must be a whole number of steps >= 0 or a fraction in (0, 1)."
                )
            if self.rewind in ("init", "none"):
                raise ValueError(
                    f"SparsityConfig.rewind_step is only used with rewind='step' or 'lr', not rewind={self.rewind!r}: "
                    "drop it or change rewind."
                )

    def implied_levels(self) -> int:
        """Levels of `prune_fraction` needed to reach at least `sparsity`."""
        import math

        if self.sparsity is None or self.sparsity <= 0:
            return 0
        return max(1, math.ceil(math.log(1.0 - self.sparsity) / math.log(1.0 - self.prune_fraction) - 1e-9))

    def num_levels(self) -> int:
        """IMP pruning levels after the dense level 0."""
        return self.levels if self.levels is not None else self.implied_levels()

    def rewind_step_for(self, total_steps: int) -> int:
        """`rewind_step` in optimizer steps for a level of `total_steps` steps (0 for rewinding to init)."""
        if self.rewind_step is None:
            return 0
        k = float(self.rewind_step)
        return int(round(k * total_steps)) if 0 < k < 1 else int(k)

    def max_rate(self) -> float:
        """The base rate that `layer_rates` factors multiply: sparsity, or the per-level fraction for IMP."""
        if self.method in ITERATIVE_METHODS:
            return self.prune_fraction
        if self.sparsity is None:
            return 0.0
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
        fields_ = self.non_default_fields()
        for name in ("target_modules", "exclude_modules"):  # matching ignores list order, so must the hash
            if isinstance(fields_.get(name), list):
                fields_[name] = sorted(fields_[name])
        payload = json.dumps(fields_, sort_keys=True, default=str)
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
                save_directory,
                repo_id,
                [path],
                commit_message=kwargs.pop("commit_message", None),
                token=kwargs.get("token"),
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


def _resolve_file(
    name_or_path: Union[str, os.PathLike], filename: str, revision: Optional[str] = None, **hub_kwargs
) -> str:
    """A file from a local folder, else from the Hub (honours HF_ENDPOINT and the local cache)."""
    local = os.path.join(str(name_or_path), filename)
    if os.path.isdir(str(name_or_path)):
        if not os.path.isfile(local):
            raise ValueError(f"{name_or_path!r} has no {filename}: is it a folder written by hf_tickets?")
        return local
    from huggingface_hub import hf_hub_download

    return hf_hub_download(str(name_or_path), filename, revision=revision, **hub_kwargs)
