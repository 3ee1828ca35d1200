"""Shared fixtures: tiny models built from configs (no downloads), random data, and Trainer helpers.

Everything here runs on CPU in well under a second per model; `tests/test_gpu.py` reuses the same builders.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_tickets.enforce import count_violations

# Keep the suite quiet and offline: nothing here may reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The models are tiny: intra-op threads only add synchronisation, and on a busy 2-core machine they made a 200-step
# run take minutes instead of seconds. One thread keeps CPU timings stable; CUDA work is unaffected.
torch.set_num_threads(1)

SEQ_LEN = 8
IMAGE_SIZE = 8
NUM_LABELS = 3


# ---- a small CNN, as a user's own PreTrainedModel -----------------------------------------------------------------


class TinyCNNConfig(PretrainedConfig):
    model_type = "hf-tickets-test-cnn"

    def __init__(
        self,
        num_channels: int = 3,
        hidden_channels: int = 8,
        image_size: int = IMAGE_SIZE,
        num_labels: int = NUM_LABELS,
        **kwargs,
    ):
        self.num_channels = num_channels
        self.hidden_channels = hidden_channels
        self.image_size = image_size
        super().__init__(num_labels=num_labels, **kwargs)


class TinyCNN(PreTrainedModel):
    """Conv2d -> Conv2d -> pool -> Linear; no hf_tickets-specific code."""

    config_class = TinyCNNConfig
    main_input_name = "pixel_values"

    def __init__(self, config: TinyCNNConfig):
        super().__init__(config)
        c = config.hidden_channels
        self.conv1 = nn.Conv2d(config.num_channels, c, 3, padding=1)
        self.norm = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.classifier = nn.Linear(c * (config.image_size // 2) ** 2, config.num_labels)
        self.post_init()

    def forward(self, pixel_values, labels=None, **kwargs):
        x = torch.relu(self.norm(self.conv1(pixel_values)))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        logits = self.classifier(x.flatten(1))
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


# ---- model builders -----------------------------------------------------------------------------------------------


def make_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=NUM_LABELS,
    )
    return BertForSequenceClassification(cfg)


def make_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=NUM_LABELS,
    )
    return ViTForImageClassification(cfg)


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def make_cnn(seed: int = 0, **kwargs) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(TinyCNNConfig(**kwargs))


MODEL_BUILDERS = {"bert": make_bert, "vit": make_vit, "gpt2": make_gpt2, "cnn": make_cnn}

# Prunable weights each model has by default (Linear / Conv / Conv1D), written out by hand from the architectures.
EXPECTED_DEFAULT_TARGETS = {
    "bert": [
        *(
            f"bert.encoder.layer.{i}.{m}.weight"
            for i in range(2)
            for m in (
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            )
        ),
        "bert.pooler.dense.weight",
        "classifier.weight",
    ],
    "vit": [
        "vit.embeddings.patch_embeddings.projection.weight",
        *(
            f"vit.layers.{i}.{m}.weight"
            for i in range(2)
            for m in (
                "attention.q_proj",
                "attention.k_proj",
                "attention.v_proj",
                "attention.o_proj",
                "mlp.fc1",
                "mlp.fc2",
            )
        ),
        "classifier.weight",
    ],
    "gpt2": [
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ],
    "cnn": ["conv1.weight", "conv2.weight", "classifier.weight"],
}


# ---- random data --------------------------------------------------------------------------------------------------


class DictDataset(torch.utils.data.Dataset):
    """A list of feature dicts (no `datasets` dependency, so the GPU machine needs nothing extra)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def make_dataset(kind: str, n: int = 32, seed: int = 0) -> DictDataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        if kind in ("bert", "gpt2"):
            ids = torch.randint(0, 100, (SEQ_LEN,), generator=g)
            row = {"input_ids": ids, "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long)}
            row["labels"] = ids.clone() if kind == "gpt2" else torch.randint(0, NUM_LABELS, (), generator=g)
        else:
            row = {
                "pixel_values": torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
                "labels": torch.randint(0, NUM_LABELS, (), generator=g),
            }
        rows.append(row)
    return DictDataset(rows)


# ---- Trainer helpers ----------------------------------------------------------------------------------------------


def training_args(output_dir, **overrides) -> TrainingArguments:
    """Fast, quiet, CPU-only TrainingArguments; `overrides` win."""
    kwargs = {
        "output_dir": str(output_dir),
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": True,
        "save_strategy": "no",
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "max_steps": 4,
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def count_violations_of(trainer) -> int:
    """Pruned weights of a TicketTrainer's model that are not exactly zero."""
    return count_violations(trainer.model, trainer.masks)


class StopAt(TrainerCallback):
    """Ends training after optimizer step `step` without saving there: a run interrupted mid-way."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
            control.should_save = False


class ViolationCounter(TrainerCallback):
    """After every optimizer step, count masked weights that are not exactly zero.

    Register it *after* the enforcing callback (`Trainer.add_callback` appends), so it sees the weights as the next
    forward pass will.
    """

    def __init__(self, masks, model):
        self.masks = masks
        self.model = model
        self.per_step: list[int] = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.per_step.append(count_violations(self.model, self.masks))

    @property
    def total(self) -> int:
        return sum(self.per_step)


class EventRecorder(TrainerCallback):
    """Records hook names in order (as transformers' tests/trainer/test_trainer_callback.py does)."""

    def __init__(self):
        self.events: list[str] = []


def _recorder(event):
    def record(self, args, state, control, **kwargs):
        self.events.append(event)

    return record


for _event in [n for n in dir(TrainerCallback) if n.startswith("on_")]:
    setattr(EventRecorder, _event, _recorder(_event))


# ---- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(params=["bert", "vit", "gpt2", "cnn"])
def any_model(request):
    return request.param, MODEL_BUILDERS[request.param]()


@pytest.fixture
def bert():
    return make_bert()


@pytest.fixture
def vit():
    return make_vit()


@pytest.fixture
def gpt2():
    return make_gpt2()


@pytest.fixture
def cnn():
    return make_cnn()
