"""`SparsityConfig`: what to prune, how much, and how; validated before any training starts."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import ClassVar, Literal, Optional, Union

from transformers.utils import PushToHubMixin

from .files import SPARSITY_CONFIG_NAME, read_json, resolve_file, write_text_atomic

logger = logging.getLogger(__name__)

CONFIG_NAME = SPARSITY_CONFIG_NAME  # the table of file names is files.py

PATTERNS_HELP = '"unstructured", or "N:M" such as "2:4" (N kept weights in every group of M)'
SCOPES = ("global", "layerwise")
# The sanity-check controls of Frankle et al. 2021 ("Pruning Neural Networks at Initialization: Why are We Missing
# the Mark?"): shuffle each tensor's mask, re-initialise the weights, or keep the lowest-scoring weights instead.
SANITY_CHECKS = ("shuffle", "reinit", "invert")

# method name -> its config class (SparsityConfig or a subclass with the method's own fields). Filled by
# `hf_tickets.methods.register_method`; kept here so that config stays a leaf that imports no method.
_CONFIG_CLASSES: dict[str, type["SparsityConfig"]] = {}
# method name -> the sanity checks it supports (its method class's `sanity_checks`), same origin.
_SANITY_SUPPORT: dict[str, tuple[str, ...]] = {}


def register_config_class(name: str, config_cls: type["SparsityConfig"], sanity_checks: tuple[str, ...] = ()) -> None:
    """Make `SparsityConfig(method=name, ...)` and `from_pretrained` build `config_cls`; `sanity_checks` are the
    values of `SparsityConfig.sanity_check` the method accepts."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, SparsityConfig)):
        raise TypeError(f"the config class of method {name!r} must subclass SparsityConfig, got {config_cls!r}.")
    unknown = sorted(set(sanity_checks) - set(SANITY_CHECKS))
    if unknown:
        raise ValueError(
            f"method {name!r} declares unknown sanity checks {unknown}: use some of {list(SANITY_CHECKS)}."
        )
    _CONFIG_CLASSES[name] = config_cls
    _SANITY_SUPPORT[name] = tuple(sanity_checks)


def _known_methods() -> tuple[str, ...]:
    return tuple(sorted(_CONFIG_CLASSES))


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
        max_layer_sparsity: a cap on every targeted tensor's sparsity, in (0, 1]. With a shared ("global")
            threshold, a tensor that would be pruned beyond it keeps its highest-scoring weights up to the cap and
            the other tensors of the pool are pruned more, so the overall sparsity stays exact (layer collapse
            cannot happen); RigL/SET/static give it as a floor on each layer's density. A target that no
            allocation can meet under the cap (e.g. `sparsity` above it) is an error before training.
        sanity_check: a control of Frankle et al. 2021 for masks chosen at initialization (methods whose class
            lists it in `sanity_checks`: magnitude, snip, grasp, synflow): `"shuffle"` permutes each tensor's
            mask at random (per-tensor counts kept), `"reinit"` keeps the masks and re-initialises the weights
            with the model's own init scheme, `"invert"` keeps the lowest-scoring weights instead of the highest.
            Seeded by `seed`.

    Method-specific fields live on the method's own config class (e.g. `IMPConfig` for `"imp"`: `prune_fraction`,
    `levels`, `rewind`, `rewind_step`). `SparsityConfig(method="imp", levels=5)` builds that class, so one call
    works for every registered method.
    """

    method: str = field(default="magnitude", metadata={"help": "Mask selection method (see available_methods())."})
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
    max_layer_sparsity: Optional[float] = field(
        default=None,
        metadata={
            "help": "Cap on each targeted tensor's sparsity, in (0, 1]; the excess goes to the other tensors so the "
            "overall sparsity stays exact (guards against layer collapse)."
        },
    )
    sanity_check: Optional[Literal["shuffle", "reinit", "invert"]] = field(
        default=None,
        metadata={
            "help": "Control of Frankle et al. 2021 for masks chosen at init: shuffle (each tensor's mask permuted), "
            "reinit (fresh weights, same masks) or invert (keep the lowest scores)."
        },
    )

    # A method whose masks need no `sparsity` (IMP's levels, N:M's pattern) sets this to False on its config class.
    sparsity_required: ClassVar[bool] = True

    def __new__(cls, *args, **kwargs):
        """`SparsityConfig(method=m, ...)` builds the config class registered for `m`, with its own fields."""
        method = kwargs.get("method", args[0] if args else None)
        target = _CONFIG_CLASSES.get(method) if method is not None else None
        if cls is SparsityConfig and target is not None and target is not cls:
            cls = target
        own = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - own)
        if unknown and isinstance(method, str) and _CONFIG_CLASSES and method not in _CONFIG_CLASSES:
            # the method is the mistake (a typo such as 'imq'), not the fields that belong to the intended one
            raise ValueError(f"SparsityConfig.method={method!r} is unknown: choose one of {list(_known_methods())}.")
        if unknown:
            owners = {
                name: [m for m, c in sorted(_CONFIG_CLASSES.items()) if name in _field_names(c)] for name in unknown
            }
            hints = "; ".join(
                f"{n} belongs to method={' or '.join(repr(m) for m in ms)}" for n, ms in owners.items() if ms
            )
            raise TypeError(
                f"SparsityConfig(method={method or cls.method!r}) has no field(s) {unknown}"
                + (f" ({hints})" if hints else "")
                + f": its fields are {sorted(own)}."
            )
        return super().__new__(cls)

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
        own = type(self).method_default()
        if type(self) is not SparsityConfig and self.method != own:
            raise ValueError(
                f"{type(self).__name__} is the config of method={own!r}, got method={self.method!r}: use "
                f"SparsityConfig(method={self.method!r}, ...)."
            )
        if not isinstance(self, _CONFIG_CLASSES.get(self.method, SparsityConfig)):
            raise ValueError(
                f"SparsityConfig.method={self.method!r} has its own config class "
                f"{_CONFIG_CLASSES[self.method].__name__}: build it with SparsityConfig(method={self.method!r}, ...)."
            )
        if self.sparsity is None and self.sparsity_required and self.pattern == "unstructured":
            raise ValueError(
                f"SparsityConfig.sparsity is required for method={self.method!r}: give the fraction of weights to "
                "zero, e.g. sparsity=0.9."
            )
        if not isinstance(self.pattern, str):
            raise TypeError(
                f"SparsityConfig.pattern must be a string such as 'unstructured' or '2:4', got {self.pattern!r} "
                f'({type(self.pattern).__name__}); in YAML quote it: pattern: "2:4" (unquoted, 2:4 reads as 124).'
            )
        if self.sparsity is not None and (
            isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float))
        ):
            raise TypeError(
                f"SparsityConfig.sparsity must be a number in [0, 1), got {self.sparsity!r} "
                f"({type(self.sparsity).__name__}): e.g. sparsity=0.9."
            )
        if self.sparsity is not None:
            if math.isnan(self.sparsity) or not (0.0 <= float(self.sparsity) < 1.0):
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
        if self.scope not in SCOPES:
            raise ValueError(f"SparsityConfig.scope={self.scope!r} is unknown: choose one of {list(SCOPES)}.")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list, tuple, set)):
                raise ValueError(f"SparsityConfig.{name} must be a regex string or a list of names, got {value!r}.")
            if isinstance(value, (tuple, set)):
                setattr(self, name, sorted(value))
            for regex in [value] if isinstance(value, str) else list(value or ()):
                _check_regex(f"SparsityConfig.{name}", regex)
        if self.layer_rates is not None:
            if not isinstance(self.layer_rates, dict):
                raise ValueError(
                    f"SparsityConfig.layer_rates must be a dict or JSON object, got {self.layer_rates!r}."
                )
            for pattern, rate in self.layer_rates.items():
                _check_regex("SparsityConfig.layer_rates key", pattern)
                if isinstance(rate, bool) or not isinstance(rate, (int, float)):
                    raise TypeError(f"SparsityConfig.layer_rates[{pattern!r}] must be a number, got {rate!r}.")
                if math.isnan(rate) or rate < 0 or float(rate) * self.max_rate() >= 1.0:
                    raise ValueError(
                        f"SparsityConfig.layer_rates[{pattern!r}]={rate!r} gives a rate outside [0, 1): use a factor "
                        f">= 0 with factor * {self.max_rate()} < 1."
                    )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"SparsityConfig.seed must be an int, got {self.seed!r} ({type(self.seed).__name__}).")
        self._validate_sanity_check()
        self.validate_method()
        if self.max_layer_sparsity is not None:
            cap = self.max_layer_sparsity
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not (0.0 < float(cap) <= 1.0):
                raise ValueError(
                    f"SparsityConfig.max_layer_sparsity={cap!r} is outside (0, 1]: give the highest sparsity any one "
                    "targeted tensor may reach, e.g. 0.99."
                )
            self.max_layer_sparsity = float(cap)
            self.check_layer_cap()

    def _validate_sanity_check(self) -> None:
        value = self.sanity_check
        if value is None:
            return
        if value not in SANITY_CHECKS:
            raise ValueError(
                f"SparsityConfig.sanity_check={value!r} is unknown: choose one of {list(SANITY_CHECKS)} (or leave it "
                "unset)."
            )
        if value == "shuffle" and self.pattern != "unstructured":
            raise ValueError(
                f"SparsityConfig.sanity_check='shuffle' permutes whole masks, which breaks pattern={self.pattern!r}'s "
                "groups: use it with unstructured masks."
            )
        if value not in _SANITY_SUPPORT.get(self.method, ()):
            supported = [m for m, checks in sorted(_SANITY_SUPPORT.items()) if value in checks]
            raise ValueError(
                f"SparsityConfig.sanity_check={value!r} is not supported by method={self.method!r}: it is a control "
                "for masks chosen once at initialization, supported by method="
                + " / ".join(repr(m) for m in supported)
                + "."
            )

    def check_layer_cap(self) -> None:
        """Raise when no allocation meets the target with every tensor at most `max_layer_sparsity` sparse.

        Every pool of tensors sharing a threshold ends at `sparsity` (pools of `layer_rates` at `sparsity` times
        their factor), so a pool rate above the cap cannot be met; IMP overrides this with its per-level rates."""
        cap = self.max_layer_sparsity
        nm = self.nm
        final = 1.0 - nm[0] / nm[1] if nm is not None else self.sparsity
        if final is not None and final > cap + 1e-12:
            raise ValueError(
                f"SparsityConfig.sparsity={final:.6g} cannot be met with max_layer_sparsity={cap}: if no tensor is "
                "sparser than the cap, neither is the whole model. Raise max_layer_sparsity or lower the sparsity."
            )
        for pattern, factor in (self.layer_rates or {}).items():
            if final is not None and final * float(factor) > cap + 1e-12:
                raise ValueError(
                    f"SparsityConfig.layer_rates[{pattern!r}]={factor} prunes its layers to "
                    f"{final * float(factor):.6g}, above max_layer_sparsity={cap}: lower the factor or raise the cap."
                )

    def validate_method(self) -> None:
        """Checks of a method's own fields: config classes of methods override this (called by `validate`)."""

    @classmethod
    def method_default(cls) -> str:
        return next(f.default for f in fields(cls) if f.name == "method")

    def max_rate(self) -> float:
        """The base rate that `layer_rates` factors multiply (IMP overrides it with its per-level fraction)."""
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
            if f.name == "method":  # a method's config class defaults to its own name: hashes must still differ
                default = _field_default(SparsityConfig, "method")
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
        from .version import __version__

        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory={save_directory!r} is a file: pass a directory.")
        os.makedirs(save_directory, exist_ok=True)
        payload = dict(self.to_dict(), hf_tickets_version=__version__)
        path = os.path.join(save_directory, CONFIG_NAME)
        write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
        if push_to_hub:  # this one file; a whole sparse checkpoint goes up with hf_tickets.hub.push_checkpoint
            from huggingface_hub import HfApi

            repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(str(save_directory)))
            api = HfApi(token=kwargs.get("token"))
            repo_id = api.create_repo(repo_id, private=kwargs.get("private"), exist_ok=True).repo_id
            api.upload_file(
                path_or_fileobj=path,
                path_in_repo=CONFIG_NAME,
                repo_id=repo_id,
                revision=kwargs.get("revision"),
                commit_message=kwargs.pop("commit_message", None) or f"Upload {CONFIG_NAME}",
            )

    @classmethod
    def from_dict(cls, data: dict) -> "SparsityConfig":
        """Build the config of `data["method"]`; unknown keys are dropped with a warning (forward compatibility).

        Keys of another method's config holding that method's default (files of older versions held every field)
        are dropped silently.
        """
        method = data.get("method", cls.method_default())
        target = _CONFIG_CLASSES.get(method, cls)
        known = _field_names(target)
        foreign = {
            k
            for k, v in data.items()
            if k not in known
            and any(k in _field_names(c) and _field_default(c, k) == v for c in _CONFIG_CLASSES.values())
        }
        from .version import __version__

        newer = _newer_writer(data.get("hf_tickets_version"))
        unknown = sorted(set(data) - known - foreign - {"hf_tickets_version"})
        written = f"written by hf_tickets {newer}, newer than this {__version__}" if newer else None
        if unknown:
            logger.warning(
                "Ignoring unknown SparsityConfig keys %s (%s).", unknown, written or "written by a newer hf_tickets?"
            )
        elif written:
            logger.warning(
                "sparsity_config.json was %s: upgrade if it uses settings this version does not know.", written
            )
        return target(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Union[str, os.PathLike], revision: Optional[str] = None, **hub_kwargs
    ) -> "SparsityConfig":
        """Load from a local folder or a Hub repo id holding `sparsity_config.json` (read as JSON, through the Hub
        cache at `revision`; `hub_kwargs`: cache_dir, token, local_files_only, force_download, subfolder)."""
        path = resolve_file(pretrained_model_name_or_path, CONFIG_NAME, revision=revision, **hub_kwargs)
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds {type(data).__name__}, not a JSON object: it is not a SparsityConfig.")
        return cls.from_dict(data)


def _check_regex(what: str, pattern: object) -> None:
    if not isinstance(pattern, str):
        raise TypeError(f"{what} entries must be strings (names or regexes), got {pattern!r}.")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{what} {pattern!r} is not a valid regex ({err}): escape special characters.") from err


def _newer_writer(stamp: object) -> Optional[str]:
    """The version that wrote a config, when it is newer than this hf_tickets (its settings may mean more)."""
    from .version import __version__

    if stamp is None:
        return None
    if not isinstance(stamp, str) or not re.match(r"^\d+\.\d+", stamp):
        raise ValueError(f"sparsity_config.json has an invalid hf_tickets_version {stamp!r}.")

    def major_minor(version: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", version)[:2])

    return stamp if major_minor(stamp) > major_minor(__version__) else None


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _field_default(cls: type, name: str) -> object:
    f = next(f for f in fields(cls) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
