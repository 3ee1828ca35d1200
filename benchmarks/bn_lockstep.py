"""BatchNorm networks in lockstep: one IMP level of N ResNet-20 (or VGG-16) arms, together vs one Trainer.train each.

Before issue 19 the lockstep backend refused BatchNorm, so a ResNet-20 / VGG-16 lottery sweep trained one network
at a time. This script times one pruned level of N arms (think trunk, controls and replicates: each its own
initialisation and its own masks, 20% of the conv and output weights pruned, every arm the same number of steps)
both ways, with the same `TrainingArguments` (SGD momentum 0.9, lr 0.1, weight decay 1e-4, cosine schedule, batch
128: the recipes/resnet20_cifar10.yaml settings):

  trainer    for each arm: TicketTrainer(model, masks=...).train() and .evaluate() on the validation split
             (what backend="trainer" runs per arm; data on the device, as recipes' data.on_device)
  lockstep   train_lockstep(...) with all N arms in one pass (what backend="lockstep" runs per level): stacked
             weights, per-arm BatchNorm running statistics, on CUDA one captured CUDA graph replayed per step,
             evaluation at the last step

Wall time is host clock around each whole arm (building the trainer / the stacked engine and the CUDA-graph
capture count), after a device synchronize. Both paths first run a short warm-up (cuDNN and CUDA start-up are not
charged to either). The data are random tensors of CIFAR-10's shape (`--train-examples` images, 10 classes): only
time is measured here; `tests/test_bn_lockstep.py` checks that both paths compute the same training.

    python benchmarks/bn_lockstep.py --device cuda --arms 4 --steps 300 --json $OUT/bn_lockstep.json
    python benchmarks/bn_lockstep.py --device cuda --model vgg16 --arms 4 --steps 200 --json $OUT/bn_vgg16.json

CPU smoke run (numbers meaningless): `python benchmarks/bn_lockstep.py --device cpu --tiny`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from hf_tickets import MaskSet, SparsityConfig, TicketTrainer, apply_sparsity  # noqa: E402
from hf_tickets.allocation import random_masks_like  # noqa: E402
from hf_tickets.data import TensorImageDataset  # noqa: E402
from hf_tickets.lottery.lockstep import (  # noqa: E402
    ArmStart,
    SplitTensors,
    batch_tables,
    plan_from_training_args,
    train_lockstep,
)
from hf_tickets.models import build_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["resnet20", "vgg16"], default="resnet20")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arms", type=int, default=4, help="networks in the level (trunk, controls, replicates)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per arm")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--train-examples", type=int, default=10_000)
    parser.add_argument("--eval-examples", type=int, default=2_000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=16, help="ResNet first-stage channels (16 = ResNet-20)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps of each path first")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke sizes: width 4, 8x8 images, 6 steps, 2 arms")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.width, args.image_size, args.steps, args.arms = 4, 8, 6, 2
        args.batch, args.train_examples, args.eval_examples, args.warmup_steps = 16, 256, 64, 1
        if args.model == "vgg16":
            args.image_size = 16
    if args.arms < 1 or args.steps < 1:
        raise SystemExit("--arms and --steps must be >= 1")
    return args


def make_model(opts, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    extra = {"width": opts.width, "batchnorm_init": "uniform"} if opts.model == "resnet20" else {}
    return build_model(opts.model, image_size=opts.image_size, num_channels=3, num_labels=10, **extra)


def make_data(opts, device) -> dict[str, TensorImageDataset]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for split, n in (("train", opts.train_examples), ("validation", opts.eval_examples)):
        x = torch.randn(n, 3, opts.image_size, opts.image_size, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        out[split] = TensorImageDataset(x.to(device), y.to(device))
    return out


def training_args(opts, output_dir: str, steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=opts.batch,
        per_device_eval_batch_size=1000,
        optim="sgd",
        optim_args="momentum=0.9",
        learning_rate=0.1,
        weight_decay=1e-4,
        lr_scheduler_type="cosine",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,  # the data already live on the device
        dataloader_drop_last=True,
        use_cpu=str(opts.device) == "cpu",
        seed=0,
    )


def make_arms(opts) -> list[tuple[dict, MaskSet]]:
    """Arm i: its own initialisation (seed i) and masks; arm 0 magnitude-pruned, the others random with its counts."""
    arms = []
    for i in range(opts.arms):
        model = make_model(opts, seed=i)
        if i == 0:
            masks = apply_sparsity(model, SparsityConfig(method="magnitude", sparsity=0.2, scope="global"))
            trunk = masks
        else:
            masks = MaskSet(random_masks_like(trunk, seed=i))
        arms.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, masks))
    return arms


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_trainer(opts, arms, data, steps: int, tmp: str) -> float:
    """One TicketTrainer per arm, trained and evaluated in turn; returns seconds."""
    sync(opts.device)
    started = time.perf_counter()
    for i, (weights, masks) in enumerate(arms):
        model = make_model(opts, seed=0)
        model.load_state_dict(weights)
        trainer = TicketTrainer(
            model=model,
            args=training_args(opts, os.path.join(tmp, f"arm{i}"), steps),
            train_dataset=data["train"],
            eval_dataset=data["validation"],
            data_collator=TensorImageDataset.collate,
            masks=copy.deepcopy(masks),
        )
        trainer.remove_callback(PrinterCallback)  # a printed dict per log line is noise here
        trainer.train()
        trainer.evaluate()
    sync(opts.device)
    return time.perf_counter() - started


def run_lockstep(opts, arms, data, steps: int, tmp: str) -> tuple[float, list]:
    """All arms in one lockstep pass (plan from the same TrainingArguments); returns seconds and the results."""
    device = torch.device(opts.device)
    sync(device)
    started = time.perf_counter()
    template = make_model(opts, seed=0)
    plan = plan_from_training_args(training_args(opts, tmp, steps), template, len(data["train"]), None)
    train = SplitTensors(data["train"].pixel_values, data["train"].labels)
    evals = {"validation": SplitTensors(data["validation"].pixel_values, data["validation"].labels)}
    tables = batch_tables(plan, len(train.y), 1, device)
    starts = [ArmStart(weights, dict(masks)) for weights, masks in arms]
    results = train_lockstep(template, starts, plan, train, evals, tables)
    sync(device)
    return time.perf_counter() - started, results


def main(argv=None) -> dict:
    opts = parse_args(argv)
    device = torch.device(opts.device)
    data = make_data(opts, device)
    arms = make_arms(opts)
    with tempfile.TemporaryDirectory() as tmp:
        if opts.warmup_steps:
            run_trainer(opts, arms[:1], data, opts.warmup_steps, tmp)
            run_lockstep(opts, arms[:2], data, opts.warmup_steps + 1, tmp)
        lockstep_s, results = run_lockstep(opts, arms, data, opts.steps, tmp)
        trainer_s = run_trainer(opts, arms, data, opts.steps, tmp)
    network_steps = opts.arms * opts.steps
    out = {
        "model": opts.model,
        "width": opts.width if opts.model == "resnet20" else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "arms": opts.arms,
        "steps": opts.steps,
        "batch": opts.batch,
        "image_size": opts.image_size,
        "trainer_seconds": trainer_s,
        "lockstep_seconds": lockstep_s,
        "trainer_network_steps_per_s": network_steps / trainer_s,
        "lockstep_network_steps_per_s": network_steps / lockstep_s,
        "speedup": trainer_s / lockstep_s,
        "lockstep_final_validation_loss": [r.history[-1]["validation"]["loss"] for r in results],
        "torch": torch.__version__,
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
    }
    print(
        f"{opts.model} x {opts.arms} arms, {opts.steps} steps, batch {opts.batch}, {out['device']}: "
        f"trainer {trainer_s:.1f} s ({out['trainer_network_steps_per_s']:.1f} network-steps/s), "
        f"lockstep {lockstep_s:.1f} s ({out['lockstep_network_steps_per_s']:.1f} network-steps/s), "
        f"ratio {out['speedup']:.2f}x"
    )
    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
