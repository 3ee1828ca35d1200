"""`MaskSet`: boolean masks keyed by parameter name, held outside the module tree.

Data only: enforcement lives in `enforce.py`. The model is never changed structurally, so a sparse model's
state_dict keys are exactly the dense model's. On disk, masks are bit-packed uint8 tensors in
`masks.safetensors` with JSON metadata in the safetensors header; nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Iterator, Mapping, Optional, Union

import torch
from torch import nn

from .files import MASKS_NAME, SPARSITY_REPORT_NAME, atomic_write, resolve_file, write_json_atomic

logger = logging.getLogger(__name__)

HEADER_KEY = "hf_tickets_masks"
HEADER_SHA_KEY = "hf_tickets_masks_sha256"  # sha256 of every other header entry: metadata cannot change unseen
# Module types whose weights are masked when masks are derived from zeros: targets.DEFAULT_TARGET_TYPES (not importable
# here, targets -> peft_interop -> masks; tests/test_hub.py checks they agree).
_ZERO_MASK_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flatten a bool tensor into uint8 bytes, 8 entries per byte, most significant bit first."""
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8).contiguous()


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_bits`."""
    numel = 1
    for d in shape:
        numel *= d
    bits = (packed.to(torch.uint8).view(-1, 1) & _BIT_WEIGHTS).ne(0).view(-1)
    if bits.numel() < numel:
        raise ValueError(f"packed mask holds {bits.numel()} bits, fewer than the {numel} its shape {shape} needs")
    return bits[:numel].view(shape).contiguous()


def _output_dim(name: str, input_dims: Optional[Mapping[str, int]]) -> int:
    """A weight's output-unit dim: 0, or 1 for a weight stored [in, out] (transformers' Conv1D)."""
    return 1 if (input_dims or {}).get(name, 1) == 0 else 0


class MaskSet(Mapping[str, torch.Tensor]):
    """Boolean masks (True = weight kept) keyed by the parameter names of `model.named_parameters()`.

    Args:
        masks: name -> bool tensor with the parameter's shape.
        metadata: free-form string-able facts stored with the masks (method, pattern, seed, level, ...).
    """

    def __init__(self, masks: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, object]] = None) -> None:
        self._masks: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask {name!r} must be a torch.Tensor, got {type(mask).__name__}")
            self._masks[name] = mask if mask.dtype == torch.bool else mask.ne(0)
        self.metadata: dict[str, object] = dict(metadata or {})

    # ---- Mapping ---------------------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaskSet) or set(self) != set(other):
            return False
        return all(torch.equal(self[n].cpu(), other[n].cpu()) for n in self)

    def __repr__(self) -> str:
        return f"MaskSet({len(self)} tensors, sparsity={self.sparsity():.4f})"

    # ---- statistics ------------------------------------------------------------------------------------------

    def numel(self) -> int:
        return sum(m.numel() for m in self._masks.values())

    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self._masks.values()))

    def sparsity(self) -> float:
        """Fraction of masked-out entries over all masked tensors."""
        total = self.numel()
        return 0.0 if total == 0 else 1.0 - self.kept() / total

    def density(self) -> float:
        return 1.0 - self.sparsity()

    def layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - float(m.sum()) / max(m.numel(), 1) for n, m in self._masks.items()}

    def report(self) -> dict:
        """Overall and per-tensor counts, as written to sparsity_report.json."""
        layers = {
            n: {
                "shape": list(m.shape),
                "numel": m.numel(),
                "kept": int(m.sum()),
                "sparsity": 1.0 - float(m.sum()) / max(m.numel(), 1),
            }
            for n, m in self._masks.items()
        }
        total = sum(v["numel"] for v in layers.values())
        kept = sum(v["kept"] for v in layers.values())
        return {"sparsity": 1.0 - kept / max(total, 1), "numel": total, "kept": kept, "layers": layers}

    def dead_output_units(self, input_dims: Optional[Mapping[str, int]] = None) -> dict[str, int]:
        """Per weight of two or more dims: how many of its output units (rows, or output channels) keep no weight.
        `input_dims` gives each weight's input-feature dim (`targets.input_dims`: 1 for [out, in, ...], 0 for
        transformers' Conv1D); without it, dim 1 is taken as the input, as for Linear and Conv."""
        out = {}
        for name, mask in self._masks.items():
            if mask.dim() >= 2:
                out_dim = _output_dim(name, input_dims)
                rows = mask.movedim(out_dim, 0).reshape(mask.shape[out_dim], -1)
                out[name] = int((~rows.any(dim=1)).sum())
        return out

    def collapsed(self, min_density: float = 0.01, input_dims: Optional[Mapping[str, int]] = None) -> dict[str, str]:
        """Tensors pruned so far that the network may be cut: name -> why. A tensor keeping fewer than
        `min_density` of its entries, or a weight with an output unit kept nowhere (`dead_output_units`)."""
        dead = self.dead_output_units(input_dims)
        out = {}
        for name, mask in self._masks.items():
            density = float(mask.sum()) / max(mask.numel(), 1)
            if density < min_density:
                out[name] = f"keeps {density:.2%} of its weights"
            elif dead.get(name):
                out[name] = (
                    f"{dead[name]} of its {mask.shape[_output_dim(name, input_dims)]} output units keep no weight"
                )
        return out

    # ---- algebra ---------------------------------------------------------------------------------------------

    def is_subset_of(self, other: "MaskSet") -> bool:
        """True when every weight kept here is also kept in `other` (masks only shrink across IMP levels)."""
        if set(self) != set(other):
            return False
        return all(not bool((self[n].cpu() & ~other[n].cpu()).any()) for n in self)

    def to(self, device: Union[str, torch.device]) -> "MaskSet":
        return MaskSet({n: m.to(device) for n, m in self._masks.items()}, self.metadata)

    def clone(self) -> "MaskSet":
        return MaskSet({n: m.clone() for n, m in self._masks.items()}, dict(self.metadata))

    # ---- model checks and enforcement ------------------------------------------------------------------------

    def validate_for(self, model: nn.Module) -> None:
        """Raise ValueError when a mask names no parameter of `model` or has the wrong shape."""
        params = dict(model.named_parameters())
        missing = [n for n in self if n not in params]
        if missing:
            raise ValueError(
                f"masks name parameters that {type(model).__name__} does not have: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}. Load masks saved for this architecture "
                f"(parameter names come from model.named_parameters())."
            )
        wrong = [(n, tuple(self[n].shape), tuple(params[n].shape)) for n in self if self[n].shape != params[n].shape]
        if wrong:
            n, got, want = wrong[0]
            raise ValueError(
                f"mask {n!r} has shape {got} but the parameter has shape {want} ({len(wrong)} mismatched): the masks "
                "were made for a different model configuration."
            )

    # ---- I/O -------------------------------------------------------------------------------------------------

    def save(
        self, save_directory: Union[str, os.PathLike], extra_metadata: Optional[Mapping[str, object]] = None
    ) -> str:
        """Write `masks.safetensors` (bit-packed) and `sparsity_report.json`, atomically; return the masks path."""
        from safetensors.torch import save_file

        from .version import __version__

        os.makedirs(save_directory, exist_ok=True)
        packed = {n: pack_bits(m) for n, m in self._masks.items()}
        meta = dict(self.metadata)
        meta.update(extra_metadata or {})
        tensors = {
            n: {
                "shape": list(m.shape),
                "sparsity": round(1.0 - float(m.sum()) / max(m.numel(), 1), 8),
                "sha256": _digest(packed[n]),  # verified on load: a damaged file is refused, never applied
            }
            for n, m in self._masks.items()
        }
        header = {
            "format": "pt",
            "hf_tickets_version": __version__,
            # sort_keys reorders "tensors"; "order" keeps named_parameters() order for the round trip.
            HEADER_KEY: json.dumps(
                {"tensors": tensors, "order": list(self._masks), "metadata": meta}, sort_keys=True, default=str
            ),
        }
        header[HEADER_SHA_KEY] = _header_digest(header)  # any change to the header (metadata too) is refused
        path = os.path.join(save_directory, MASKS_NAME)
        atomic_write(path, lambda tmp: save_file(packed, tmp, metadata=header))
        write_json_atomic(os.path.join(save_directory, SPARSITY_REPORT_NAME), dict(self.report(), metadata=meta))
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "MaskSet":
        """Read a `masks.safetensors` file (or a folder holding one).

        The file is read as safetensors only (no pickle). Its header must list exactly the tensors the file holds,
        each a 1-D uint8 tensor of ceil(numel / 8) bytes for its shape, with the checksum written at save time;
        anything else is a ValueError, raised before a single mask is returned (so nothing is ever applied)."""
        from safetensors import SafetensorError, safe_open

        path = str(path)
        if os.path.isdir(path):
            path = os.path.join(path, MASKS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"no masks file at {path!r}: save masks with MaskSet.save or TicketTrainer.save_model.")
        try:
            with safe_open(path, framework="pt") as fh:
                header = fh.metadata() or {}
                if HEADER_KEY not in header:
                    raise ValueError(
                        f"{path} is a safetensors file but not an hf_tickets masks file (no {HEADER_KEY!r} header): "
                        "pass the masks.safetensors written by hf_tickets, not model weights."
                    )
                info = json.loads(header[HEADER_KEY])
                _check_header(header, info, path)
                masks = _read_checked(fh, info, path)
        except SafetensorError as err:
            if not path.endswith(".safetensors"):  # metrics.json, a recipe: a wrong file, not a damaged one
                raise ValueError(
                    f"{path} is not a safetensors file ({err}): pass a masks.safetensors, or the level, ticket or "
                    "checkpoint folder that holds one."
                ) from err
            raise ValueError(f"{path} is corrupted or not a safetensors file ({err}): re-save the masks.") from err
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path} has a damaged hf_tickets header ({err!r}): re-save the masks.") from err
        return cls(masks, info.get("metadata", {}))

    @classmethod
    def from_zeros(cls, model: nn.Module, metadata: Optional[Mapping[str, object]] = None) -> "MaskSet":
        """Masks read off the exact zeros of every Linear / Conv / Conv1D weight of `model` (True = non-zero).

        For checkpoints that came without `masks.safetensors`: a weight that is exactly 0 is taken as pruned."""
        try:
            from transformers.pytorch_utils import Conv1D

            types = _ZERO_MASK_TYPES + (Conv1D,)
        except ImportError:  # pragma: no cover
            types = _ZERO_MASK_TYPES
        masks = {}
        for module_name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, types) and isinstance(weight, nn.Parameter):
                masks[f"{module_name}.weight" if module_name else "weight"] = weight.detach().ne(0).cpu()
        return cls(masks, dict(metadata or {}, derived_from="zeros"))


def _header_digest(header: Mapping[str, str]) -> str:
    rest = {k: v for k, v in header.items() if k != HEADER_SHA_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _check_header(header: Mapping[str, str], info: dict, path: str) -> None:
    """The header's own checksum (files written with per-tensor checksums always carry it)."""
    expected = header.get(HEADER_SHA_KEY)
    with_checksums = any("sha256" in t for t in info["tensors"].values())
    if expected is None and with_checksums:
        raise ValueError(f"{path}: the masks header lost its checksum ({HEADER_SHA_KEY}): the file was altered.")
    if expected is not None and _header_digest(header) != expected:
        raise ValueError(f"{path}: the masks header fails its checksum: the file was altered; re-save the masks.")


def _digest(packed: torch.Tensor) -> str:
    return hashlib.sha256(packed.contiguous().numpy().tobytes()).hexdigest()


def _read_checked(fh, info: dict, path: str) -> dict[str, torch.Tensor]:
    """The masks of an open safetensors file, after checking names, dtypes, sizes and checksums against its header."""
    tensors = info["tensors"]
    order = list(info.get("order", tensors))
    in_file = set(fh.keys())
    if set(order) != set(tensors) or set(order) != in_file or len(order) != len(set(order)):
        missing, extra = sorted(set(order) - in_file), sorted(in_file - set(order))
        raise ValueError(
            f"{path}: the header's tensor names do not match the tensors in the file (listed but absent: "
            f"{missing[:3]}, present but unlisted: {extra[:3]}): the file was altered; re-save the masks."
        )
    masks = {}
    for name in order:
        shape = tensors[name]["shape"]
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(f"{path}: mask {name!r} has an invalid shape {shape!r} in its header.")
        packed = fh.get_tensor(name)
        numel = 1
        for d in shape:
            numel *= d
        need = (numel + 7) // 8
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
            size = "fewer" if packed.numel() < need else "more" if packed.numel() > need else "as many"
            raise ValueError(
                f"{path}: mask {name!r} holds {packed.numel()} {packed.dtype} values ({tuple(packed.shape)}), {size} "
                f"than the {need} packed uint8 bytes its shape {tuple(shape)} needs: the file was altered; re-save "
                "the masks."
            )
        expected = tensors[name].get("sha256")
        if expected is not None and _digest(packed) != expected:
            raise ValueError(f"{path}: mask {name!r} fails its checksum: the file is damaged; re-save the masks.")
        masks[name] = unpack_bits(packed, tuple(shape))
        recorded = tensors[name].get("sparsity")
        actual = 1.0 - float(masks[name].sum()) / max(masks[name].numel(), 1)
        if recorded is not None and abs(float(recorded) - actual) > 1e-7:
            raise ValueError(
                f"{path}: mask {name!r} keeps {1 - actual:.6f} of its weights but its header says {1 - recorded:.6f}: "
                "the file was altered; re-save the masks."
            )
    return masks


def load_masks(
    pretrained_model_name_or_path: Union[str, os.PathLike],
    revision: Optional[str] = None,
    model: Optional[nn.Module] = None,
    **hub_kwargs,
) -> MaskSet:
    """Load the `MaskSet` of a local folder, a masks file, or a Hub repo id (through the Hub cache, at `revision`).

    Args:
        revision: branch, tag or commit of a Hub repo (an IMP run pushed with `push_lottery_run` has one branch per
            level, e.g. "level_03").
        model: when given, the masks are checked against it (names and shapes), and a folder or repo without
            `masks.safetensors` gets masks derived from `model`'s zeros.
        **hub_kwargs: `cache_dir`, `token`, `local_files_only`, `force_download`, `subfolder`.

    A folder or repo without `masks.safetensors` still loads: masks are derived from the exact zeros of its Linear /
    Conv weights (the model is loaded with `from_pretrained` when `model` is not given), with a warning.
    """
    path = str(pretrained_model_name_or_path)
    if os.path.isfile(path):
        masks = MaskSet.load(path)
    else:
        resolved = resolve_file(path, MASKS_NAME, revision=revision, required=False, **hub_kwargs)
        if resolved is not None:
            masks = MaskSet.load(resolved)
        else:
            logger.warning(
                "%s%s has no %s: masks are derived from the exact zeros of its Linear/Conv weights (a weight that is "
                "exactly 0 counts as pruned). Save with TicketTrainer.save_model or MaskSet.save to keep the real "
                "masks.",
                path,
                f" (revision {revision})" if revision else "",
                MASKS_NAME,
            )
            if model is None:
                try:
                    model = model_from_checkpoint(path, revision, **hub_kwargs)
                except (OSError, ValueError, KeyError) as err:
                    raise ValueError(
                        f"{path!r} has no {MASKS_NAME}, and its model could not be loaded to derive masks from its "
                        f"zeros ({err}): pass model= (the loaded model) to load_masks."
                    ) from err
            return MaskSet.from_zeros(model, {"source": path})
    if model is not None:
        masks.validate_for(model)
    return masks


def model_from_checkpoint(path: str, revision: Optional[str] = None, **hub_kwargs) -> nn.Module:
    """The model a folder or repo holds, built from its config.json by the class it names (reference CNNs
    included: importing `hf_tickets.models` registers them)."""
    import transformers
    from transformers import AutoConfig, AutoModel

    from . import models  # noqa: F401  (registers the reference CNNs with the Auto classes)

    kwargs = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "token", "local_files_only", "subfolder")}
    config = AutoConfig.from_pretrained(path, revision=revision, **kwargs)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None and arch:
        cls = getattr(models, arch, None)
    if cls is None:
        cls = AutoModel
    return cls.from_pretrained(path, revision=revision, **kwargs)
