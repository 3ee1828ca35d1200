"""2:4 inference that is measured, not assumed: `sparse_inference(model, example_batch)`.

PyTorch runs a 2:4 weight through cuSPARSELt once it is converted with `to_sparse_semi_structured`, but that is not
faster everywhere: on an H200 (torch 2.11, bf16) 2:4 GEMMs ran at 0.22-0.35x of dense at BERT shapes and 1.14-1.44x
only at very large ones (issue 12). So each `nn.Linear` whose weight holds 2:4 is timed on its real input (the
user's batch, captured by one forward pass), dense against sparse, and converted only where sparse is faster by
`min_speedup`; the rest stays dense. cuSPARSELt's algorithm search (`torch._cslt_sparse_mm_search`) is never run:
in float16 it failed with a cuSPARSELt internal error and then an illegal instruction that killed the process
(issue 12), and in bfloat16 (H200, torch 2.11, cuSPARSELt 0.8) the id it returned was refused by a later matmul
("invalid value when calling cusparseLtMatmulAlgSetAttribute", docs/results/nm_inference_search_h200.log). Instead
a few algorithm ids are tried by hand (`alg_ids`, in bfloat16 only): on the H200 id 1 ran the MLP block's
projections 1.58x / 1.49x faster than dense where the default id 0 gave 1.40x / 1.05x
(benchmarks/nm_mlp_kernels.py, docs/nm.md).

Each layer is timed in context: a layer chosen sparse is swapped in during the same probing pass, so the layers after
it are timed on the input they will really get (cuSPARSELt returns its result transposed in memory, which changes the
next layer's kernel).

Checkpoints stay dense (exact zeros + masks.safetensors); this conversion is for serving a loaded model.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .nm import nm_violations
from .row_major import row_major

logger = logging.getLogger(__name__)

# timer(name, dense_fn, sparse_fn) -> (dense_ms, sparse_ms); tests inject a fake one
Timer = Callable[[str, Callable[[], Any], Callable[[], Any]], tuple[float, float]]
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class LayerChoice:
    """One Linear: its weight shape [out, in], the input it saw, the two timings and what was kept."""

    name: str
    shape: list[int]
    input_shape: Optional[list[int]] = None
    dense_ms: Optional[float] = None
    sparse_ms: Optional[float] = None
    chosen: str = "dense"
    reason: str = ""
    kernel: str = ""  # the fastest sparse candidate (e.g. "cuSPARSELt alg 1"), converted or not

    @property
    def speedup(self) -> Optional[float]:
        if not self.dense_ms or not self.sparse_ms:
            return None
        return self.dense_ms / self.sparse_ms


@dataclass
class InferenceReport:
    """What `sparse_inference` measured and did, per layer."""

    device: str
    dtype: str
    message: str = ""
    min_speedup: float = 1.0
    layers: list[LayerChoice] = field(default_factory=list)

    @property
    def converted(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.chosen == "sparse"]

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "dtype": self.dtype,
            "message": self.message,
            "min_speedup": self.min_speedup,
            "converted": self.converted,
            "layers": [dict(asdict(layer), speedup=layer.speedup) for layer in self.layers],
        }

    def to_markdown(self) -> str:
        """A table for a model card: measured on this GPU, at this batch shape."""
        lines = [
            f"2:4 inference on {self.device} ({self.dtype}), measured by `hf_tickets.sparse_inference`: "
            f"{len(self.converted)} of {len(self.layers)} Linear layers run sparse (kept where sparse was at least "
            f"{self.min_speedup:g}x faster at the example batch's shape).",
            "",
            "| layer | weight | input | dense ms | sparse ms | speedup | chosen |",
            "|---|---|---|---|---|---|---|",
        ]
        for layer in self.layers:
            fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
            speed = "" if layer.speedup is None else f"{layer.speedup:.2f}x"
            chosen = layer.chosen if not layer.reason else f"{layer.chosen} ({layer.reason})"
            lines.append(
                f"| {layer.name} | {'x'.join(map(str, layer.shape))} | "
                f"{'x'.join(map(str, layer.input_shape or []))} | {fmt(layer.dense_ms)} | {fmt(layer.sparse_ms)} | "
                f"{speed} | {chosen} |"
            )
        return "\n".join(lines) + "\n"

    def write_to_card(self, folder: str) -> str:
        """Put this report into the model card (README.md) of `folder`, in its own section, replaced on re-runs."""
        from .cards import upsert_card_section

        section = "## 2:4 inference, measured\n\n" + self.to_markdown()
        return upsert_card_section(folder, "sparse_inference", section)


def cuda_event_timer(warmup: int = 3, reps: int = 10, inner: int = 5) -> Timer:
    """Time two callables with CUDA events, interleaved (dense, sparse, sparse, dense, ...), `reps` rounds of
    `inner` back-to-back calls each; returns the median ms per call of each."""

    def timer(name: str, dense_fn, sparse_fn) -> tuple[float, float]:
        fns = {"dense": dense_fn, "sparse": sparse_fn}
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        torch.cuda.synchronize()
        times: dict[str, list[float]] = {"dense": [], "sparse": []}
        for r in range(reps):
            order = ("dense", "sparse") if r % 2 == 0 else ("sparse", "dense")
            for arm in order:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fns[arm]()
                end.record()
                end.synchronize()
                times[arm].append(start.elapsed_time(end) / inner)
        return statistics.median(times["dense"]), statistics.median(times["sparse"])

    return timer


# Tried by hand in bfloat16 (id 0 is the default); float16 keeps the default id: its search path crashed (module doc)
DEFAULT_ALG_IDS = (0, 1)


def cusparselt_converter(alg_id: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """PyTorch's semi-structured form (cuSPARSELt on Hopper) with algorithm `alg_id` set by hand, no search."""

    def convert(weight: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
        from torch.sparse import to_sparse_semi_structured

        sparse = to_sparse_semi_structured(weight.detach().contiguous())
        if alg_id:
            sparse.alg_id_cusparselt = alg_id
        return sparse

    return convert


def _candidates(
    convert: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], alg_ids: Sequence[int], dtype: torch.dtype
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    if convert is not None:
        return {"injected": convert}
    ids = list(dict.fromkeys(alg_ids)) if dtype == torch.bfloat16 else [0]
    return {f"cuSPARSELt alg {a}": cusparselt_converter(a) for a in ids}


def _row_major_input(module: nn.Module, inputs: tuple) -> tuple:
    """Pre-hook of a converted Linear that ran faster on a row-major copy of its input (the copy timed with it):
    cuSPARSELt hands back a transposed result, so the layer after a converted one often gets a transposed input.
    The copy is `row_major`'s tiled transpose (PyTorch's strided copy cost more than it saved, docs/nm.md)."""
    return (row_major(inputs[0]), *inputs[1:])  # a row-major input comes back as it is


def _batch_call(model: nn.Module, example_batch: Any) -> None:
    if isinstance(example_batch, Mapping):
        model(**example_batch)
    elif isinstance(example_batch, (tuple, list)):
        model(*example_batch)
    else:
        model(example_batch)


def sparse_inference(
    model: nn.Module,
    example_batch: Any,
    *,
    min_speedup: float = 1.05,
    alg_ids: Sequence[int] = DEFAULT_ALG_IDS,
    timer: Optional[Timer] = None,
    convert: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
) -> InferenceReport:
    """Convert to 2:4 semi-structured sparse only the Linear layers that run faster that way on this GPU.

    One forward pass over `example_batch` (a dict of model inputs, a tuple, or a tensor, at the batch shape you
    will serve) runs with hooks on every `nn.Linear` whose weight holds 2:4 along its input features: each such
    layer is timed on its own input, dense against each sparse candidate (cuSPARSELt with each of `alg_ids`), and
    replaced by the fastest one only where it took at most dense / `min_speedup`. A layer is replaced at once, so
    the layers after it are timed on the input they will get; where that input is transposed in memory (the output
    of a converted layer), a row-major copy of it (`row_major`'s tiled transpose) is timed too, copy included, and,
    if faster, the layer keeps a pre-hook that makes that copy. Each sparse output is checked against the dense one
    before timing. The model is changed in place (inference only: converted weights take no gradient) and a
    per-layer report is returned (`report.to_markdown()` fits a model card).

    Args:
        model: a model on a CUDA device in float16 or bfloat16 (e.g. `model.to("cuda", torch.bfloat16)`).
        example_batch: inputs at the serving shape.
        min_speedup: a layer is converted when dense_ms / sparse_ms >= this (a margin over timing noise).
        alg_ids: cuSPARSELt algorithm ids to try in bfloat16 (float16 uses the default id 0 only).
        timer, convert: injected by tests (a fake timer and converter make the dispatch testable on a CPU).

    Without a CUDA device (and no injected timer) nothing is changed and the report says why.
    """
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params else torch.float32
    if timer is None:
        if not torch.cuda.is_available() or device.type != "cuda":
            why = "no CUDA GPU" if not torch.cuda.is_available() else f"the model is on {device}, not a CUDA GPU"
            message = f"sparse_inference did nothing: {why}; 2:4 kernels (cuSPARSELt) need one. The model stays dense."
            logger.warning(message)
            return InferenceReport(
                device=str(device), dtype=str(dtype).replace("torch.", ""), message=message, min_speedup=min_speedup
            )
        timer = cuda_event_timer()
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device} (injected timer)"
    candidates = _candidates(convert, alg_ids, dtype)
    report = InferenceReport(device=name, dtype=str(dtype).replace("torch.", ""), min_speedup=min_speedup)
    choices: dict[str, LayerChoice] = {}
    handles = []

    def probe(layer_name: str):
        def hook(module: nn.Linear, inputs: tuple) -> Optional[tuple]:
            choice = choices[layer_name]
            if choice.input_shape is not None:  # a module called twice: timed at its first call
                return
            x = inputs[0]
            choice.input_shape = list(x.shape)
            w, b = module.weight, module.bias
            x2d = x.reshape(-1, x.shape[-1])
            dense_out = nn.functional.linear(x, w, b).float()
            # a transposed input (a converted layer's output) may run faster copied to row-major: both are timed
            copies = [False] if x.is_contiguous() else [False, True]
            best: Optional[tuple[float, float, str, torch.Tensor, bool]] = None  # dense ms, sparse ms, kernel, ...
            failures = []
            for kernel, convert_fn in candidates.items():
                try:
                    sw = convert_fn(w, x2d)
                    sparse_out = nn.functional.linear(x, sw, b).float()
                    err = float((sparse_out - dense_out).norm() / dense_out.norm().clamp_min(1e-12))
                    if err > 2e-2:
                        failures.append(f"{kernel}: sparse output differs from dense (relative error {err:.3g})")
                        continue
                    for copy_first in copies:
                        inp = (lambda: row_major(x)) if copy_first else (lambda: x)
                        dense_ms, sparse_ms = timer(
                            layer_name,
                            lambda: nn.functional.linear(x, w, b),
                            lambda sw=sw, inp=inp: nn.functional.linear(inp(), sw, b),
                        )
                        label = f"{kernel}, input made row-major" if copy_first else kernel
                        if best is None or dense_ms / sparse_ms > best[0] / best[1]:
                            best = (dense_ms, sparse_ms, label, sw, copy_first)
                except (RuntimeError, ValueError, NotImplementedError, TypeError) as err:
                    failures.append(f"{kernel}: not convertible: {str(err).splitlines()[0][:160]}")
            if best is None:
                choice.reason = "; ".join(failures)
                return None
            choice.dense_ms, choice.sparse_ms, choice.kernel, sw, copy_first = best
            if choice.sparse_ms * min_speedup > choice.dense_ms:
                choice.reason = "sparse slower at this shape"
                return None
            choice.chosen = "sparse"
            module.weight = nn.Parameter(sw, requires_grad=False)  # this very call and the layers after see it
            if copy_first:
                module.register_forward_pre_hook(_row_major_input)  # from the next call on
                return (row_major(x), *inputs[1:])  # this call
            return None

        return hook

    for layer_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight
        choice = LayerChoice(name=layer_name, shape=list(w.shape))
        choices[layer_name] = choice
        if w.dtype not in SUPPORTED_DTYPES:
            choice.reason = f"{str(w.dtype).replace('torch.', '')} weights: 2:4 kernels take float16/bfloat16"
        elif w.shape[1] % 4 or nm_violations(w, 2, 4, 1):
            choice.reason = "weight does not hold 2:4 along its input features"
        else:
            handles.append(module.register_forward_pre_hook(probe(layer_name)))
    report.layers = list(choices.values())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _batch_call(model, example_batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for choice in report.layers:
        if choice.input_shape is None and not choice.reason:
            choice.reason = "not called by the example batch"
    report.message = (
        f"{len(report.converted)} of {len(report.layers)} Linear layers converted to 2:4 (faster by >= "
        f"{min_speedup:g}x at this batch shape); the others stay dense."
    )
    logger.info(report.message)
    return report
