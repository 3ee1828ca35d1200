"""Model cards: sections rendered from Jinja templates, added to (never replacing) an existing card.

A card (README.md) is YAML metadata plus markdown. Each writer owns named sections between markers
(`<!-- hf_tickets:start/end -->` for the sparsity section, `<!-- hf_tickets:KEY:start/end -->` for the others:
`evaluation`, `data`, `command`, `nm_check`, `lottery`, `mask_updates`, `sparse_inference`, `hub`) and replaces
only its own, so rewriting a card keeps everything else: text a person wrote, other writers' sections and every
metadata field. Metadata follows the Hub's model-card spec (library_name, tags, pipeline_tag, base_model, datasets,
license, model-index) and is written through `huggingface_hub.ModelCard`, so the Hub renders and indexes it.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from importlib import resources
from typing import Any, Mapping, Optional, Sequence

from jinja2 import Template
from torch import nn

from .config import SparsityConfig
from .files import (
    CARD_NAME,
    CHURN_PLOT,
    METRICS_NAME,
    MODEL_CONFIG_NAME,
    SPARSITY_PLOT,
    atomic_write,
    read_json,
    weight_files,
    write_text_atomic,
)
from .masks import MaskSet
from .targets import input_dims

README_NAME = CARD_NAME  # kept for callers of earlier versions
SECTION_START = "<!-- hf_tickets:start -->"
SECTION_END = "<!-- hf_tickets:end -->"
CARD_TAGS = ["hf-tickets", "sparse", "pruning"]
REPO_PLACEHOLDER = "<this folder or repo id>"  # the usage snippet's path; push_checkpoint writes the repo id there
DEFAULT_LICENSE = "apache-2.0"
# Dynamic methods, whose cards get the churn plot; IMP cards get the lottery tag.
DYNAMIC_METHODS = ("rigl", "set")
TASKS = {"ForImageClassification": "image-classification", "ForSequenceClassification": "text-classification"}


# ---- sections ---------------------------------------------------------------------------------------------------


def section_markers(key: Optional[str]) -> tuple[str, str]:
    """Start and end markers of section `key` (None: the main sparsity section)."""
    if key is None:
        return SECTION_START, SECTION_END
    return f"<!-- hf_tickets:{key}:start -->", f"<!-- hf_tickets:{key}:end -->"


def get_section(text: str, key: Optional[str]) -> Optional[str]:
    """The markdown inside section `key` of a card's text, or None when the card has no such section."""
    start, end = section_markers(key)
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def set_section(text: str, key: Optional[str], markdown: str) -> str:
    """`text` with section `key` replaced in place, or appended when it is not there yet."""
    start, end = section_markers(key)
    block = f"{start}\n{markdown.strip()}\n{end}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1].lstrip("\n")
    return text.rstrip() + "\n\n" + block


def section_keys(text: str) -> list[str]:
    """Every hf_tickets section of a card, in order ("main" for the sparsity section)."""
    keys = []
    for match in re.finditer(r"<!-- hf_tickets:(?:([\w-]+):)?start -->", text):
        keys.append(match.group(1) or "main")
    return keys


def upsert_card_section(output_dir: str, key: str, markdown: str) -> str:
    """Insert or replace a named section in `output_dir`'s README.md (metadata and other sections kept)."""
    path = os.path.join(output_dir, CARD_NAME)
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else ""
    write_text_atomic(path, set_section(text, key, markdown))
    return path


# ---- facts about the model ----------------------------------------------------------------------------------------


def model_facts(model: Optional[nn.Module], folder: Optional[str] = None) -> dict[str, Any]:
    """Class, module, parameter count, task and base model, from the model (or, without one, the folder's files)."""
    facts: dict[str, Any] = {"class": None, "module": "transformers", "params": None, "task": None, "base": None}
    arch = None
    if model is not None:
        arch = type(model).__name__
        facts["module"] = "hf_tickets.models" if type(model).__module__.startswith("hf_tickets.") else "transformers"
        facts["params"] = sum(p.numel() for p in model.parameters())
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or ""
        if base and not os.path.exists(base) and re.fullmatch(r"[\w.-]+/[\w.-]+", base):
            facts["base"] = base
    elif folder is not None and os.path.isfile(os.path.join(folder, MODEL_CONFIG_NAME)):
        arch = (read_json(os.path.join(folder, MODEL_CONFIG_NAME)).get("architectures") or [None])[0]
        facts["params"] = _count_params(folder)
    if arch:
        facts["class"] = arch
        import transformers

        if getattr(transformers, arch, None) is None:
            facts["module"] = "hf_tickets.models"
        facts["task"] = next((task for suffix, task in TASKS.items() if arch.endswith(suffix)), None)
    return facts


def _count_params(folder: str) -> Optional[int]:
    """Entries of every tensor in the folder's weight files, from their safetensors headers (nothing loaded)."""
    from safetensors import safe_open

    files = weight_files(folder)
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as fh:
            for name in fh.keys():
                numel = 1
                for d in fh.get_slice(name).get_shape():
                    numel *= d
                total += numel
    return total


def card_tags(config: SparsityConfig) -> list[str]:
    """Tags a sparse checkpoint gets: the library's, the method's, `lottery-ticket` for IMP, the N:M pattern."""
    tags = list(CARD_TAGS) + [config.method]
    if config.method == "imp":
        tags.append("lottery-ticket")
    if config.method in DYNAMIC_METHODS:
        tags.append("dynamic-sparse-training")
    if config.pattern != "unstructured":
        tags.append(config.pattern)
    return tags


def current_command() -> str:
    """The command line of this process, as a user would retype it."""
    argv = list(sys.argv)
    prog = os.path.basename(argv[0]) if argv else "python"
    if prog in ("hf-tickets",):
        return " ".join(shlex.quote(a) for a in ["hf-tickets", *argv[1:]])
    return " ".join(shlex.quote(a) for a in ["python", *argv]) if argv and argv[0] else "python"


# ---- rendering ----------------------------------------------------------------------------------------------------


def _template(name: str) -> Template:
    return Template(resources.files("hf_tickets").joinpath(f"templates/{name}").read_text(encoding="utf-8"))


def render_sparsity_section(
    masks: MaskSet,
    config: SparsityConfig,
    model: Optional[nn.Module] = None,
    metrics: Optional[dict] = None,
    facts: Optional[dict] = None,
    plot: Optional[str] = None,
) -> str:
    """The card's sparsity section (config, overall and per-layer sparsity, chart, usage), between markers so that
    later saves replace it in place. `metrics` are written by `write_model_card` into their own section."""
    return f"{SECTION_START}\n{_sparsity_body(masks, config, model, facts, plot)}\n{SECTION_END}\n"


def _sparsity_body(
    masks: MaskSet, config: SparsityConfig, model: Optional[nn.Module], facts: Optional[dict], plot: Optional[str]
) -> str:
    from .version import __version__

    facts = facts or model_facts(model)
    report = masks.report()
    model_params = facts["params"] or report["numel"]
    pruned = report["numel"] - report["kept"]
    body = _template("sparsity_section.md").render(
        version=__version__,
        config=config,
        sparsity=report["sparsity"],
        kept=report["kept"],
        numel=report["numel"],
        model_sparsity=pruned / max(model_params, 1),
        model_params=model_params,
        params_known=facts["params"] is not None,
        layers=report["layers"],
        collapsed=masks.collapsed(input_dims=input_dims(model, masks) if model is not None else None),
        model_class=facts["class"],
        model_module=facts["module"],
        repo=REPO_PLACEHOLDER,
        plot=plot,
        derived=masks.metadata.get("derived_from") == "zeros",
    )
    return body.strip()


def evaluation_markdown(metrics: Mapping[str, float], source: str = "") -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float)))
    note = f"\n\n{source}" if source else ""
    return f"### Evaluation\n\n| metric | value |\n|---|---|\n{rows}{note}"


def data_markdown(record: Mapping[str, Any]) -> str:
    """The card's data section: what the checkpoint was trained on (from its metrics' `"data"` record), with a
    warning first when that was a smoke-test copy, so nobody reads the numbers above it as the real set's."""
    from .datasets_source import SMOKE_COPY, data_line

    line = data_line(record)
    out = ["### Data", ""]
    if record.get("copy") == SMOKE_COPY:
        name = record.get("name")
        out += [
            f"> **Warning: not the real data set.** The numbers on this card come from a few images of a smoke-test "
            f"copy; they say nothing about {name}.",
            "",
        ]
    out.append(line[0].upper() + line[1:] + ".")
    rules = record.get("split_rule") or {}
    sizes = record.get("splits") or {}
    if rules or sizes:
        out += ["", "| split | examples | made from |", "|---|---|---|"]
        for split in dict.fromkeys(["train", "validation", "test", *sizes, *rules]):
            if split not in sizes and split not in rules:
                continue
            count = f"{sizes[split]:,}" if split in sizes else ""
            out.append(f"| {split} | {count} | {rules.get(split, '')} |")
    if record.get("note"):
        out += ["", str(record["note"])]
    return "\n".join(out)


def command_markdown(command: str) -> str:
    return f"### Reproduce\n\nThis checkpoint was produced by:\n\n```bash\n{command}\n```"


def nm_check_markdown(model: nn.Module, masks: MaskSet, pattern: str) -> str:
    """The N:M validator's verdict on a model's weights and masks (`hf_tickets.validate_nm`), per tensor."""
    from .nm import validate_nm

    report = validate_nm(model, pattern, dict(masks))
    rows = "\n".join(
        f"| `{name}` | {'holds the pattern' if row['ok'] else 'FAILS'} |" for name, row in report.tensors.items()
    )
    skipped = "".join(f"\n| `{name}` | left dense: {why} |" for name, why in report.skipped.items())
    verdict = "✅ every checked tensor holds the pattern" if report.ok else "❌ some tensors do not hold the pattern"
    return (
        f"### N:M check ({pattern})\n\n{verdict} ({report.summary()}), checked when this card was written with "
        f"`hf_tickets.validate_nm`.\n\n| tensor | verdict |\n|---|---|\n{rows}{skipped}"
    )


def plot_layer_sparsity(masks: MaskSet, path: str) -> None:
    """Horizontal bars: each masked tensor's sparsity in percent, with the overall sparsity as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = masks.layer_sparsity()
    names = list(layers)
    values = [100 * layers[n] for n in names]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * max(len(names), 1)))
    ax.barh(range(len(names)), values, color="#4c72b0", label="sparsity of the tensor")
    ax.axvline(
        100 * masks.sparsity(), color="#c44e52", linestyle="--", label=f"overall: {100 * masks.sparsity():.1f}%"
    )
    ax.set_yticks(range(len(names)), [n if len(n) <= 48 else "…" + n[-47:] for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("weights pruned (% of the tensor)")
    ax.set_title("Sparsity per layer")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def accuracy_results(metrics: Mapping[str, float]) -> list[tuple[str, str, float]]:
    """(split, metric name, value) of the accuracy entries of flat metrics, test before validation."""
    out = []
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or not key.endswith("accuracy"):
            continue
        split = "test" if "test" in key else "validation" if ("validation" in key or "eval" in key) else "train"
        out.append((split, key, float(value)))
    return sorted(out, key=lambda r: r[0] != "test")


def write_model_card(
    output_dir: str,
    masks: MaskSet,
    config: SparsityConfig,
    model: Optional[nn.Module] = None,
    metrics: Optional[dict] = None,
    *,
    command: Optional[str] = None,
    datasets: Optional[Sequence[str]] = None,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    metrics_source: str = "",
    chart: bool = True,
    run_data: Optional[Mapping[str, Any]] = None,
) -> str:
    """Create README.md, or update the hf_tickets sections and metadata of an existing one; return its path.

    `chart=False` skips drawing the per-layer sparsity chart (most of a card's cost; the lottery's level folders
    skip it, and the exported ticket draws it).

    Args:
        metrics: flat evaluation metrics (e.g. `eval_test_accuracy`); without them an existing evaluation section
            is kept. Accuracies become the card's `model-index` when `datasets` is known.
        command: the command that produced the checkpoint; without it an existing one is kept.
        datasets, base_model, license: card metadata; fields already in the card are kept unless given.
        run_data: the data record of the run (a level's `metrics.json["data"]`): the card's data section says what
            the checkpoint was trained on (without it an existing data section is kept); a smoke-test copy or a
            stand-in gets no `model-index` results on the named set.
    """
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(output_dir, CARD_NAME)
    facts = model_facts(model, output_dir)
    plot = None
    if len(masks) and chart:
        plot_layer_sparsity(masks, os.path.join(output_dir, SPARSITY_PLOT))
        plot = SPARSITY_PLOT
    if os.path.isfile(path):
        card = ModelCard.load(path)
        text = card.text
        if not re.search(r"^# ", text, re.M):  # a card without a title (Trainer's cards have one)
            text = f"# Sparse {facts['class'] or 'model'}\n\n" + text.lstrip()
    else:
        card = ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n")
        text = f"# Sparse {facts['class'] or 'model'}\n"
    old_main = get_section(text, None)
    text = set_section(text, None, _sparsity_body(masks, config, model, facts, plot))
    if metrics:
        text = set_section(text, "evaluation", evaluation_markdown(metrics, metrics_source))
    elif old_main and "### Evaluation" in old_main and get_section(text, "evaluation") is None:
        # cards of earlier versions kept the evaluation table inside the sparsity section: keep it
        legacy = "### Evaluation" + old_main.split("### Evaluation", 1)[1].split("\n###", 1)[0]
        text = set_section(text, "evaluation", legacy)
    if run_data:
        text = set_section(text, "data", data_markdown(run_data))
    if command:
        text = set_section(text, "command", command_markdown(command))
    if config.nm is not None and model is not None and len(masks):
        text = set_section(text, "nm_check", nm_check_markdown(model, masks, config.pattern))
    card.text = text
    data = card.data
    data.library_name = data.library_name or "transformers"
    data.tags = sorted(set(data.tags or []) | set(card_tags(config)))
    if facts["task"] and not getattr(data, "pipeline_tag", None):
        data.pipeline_tag = facts["task"]
    if base_model or facts["base"]:
        data.base_model = base_model or data.base_model or facts["base"]
    if datasets:
        data.datasets = list(datasets)
    if license or not data.license:
        data.license = license or DEFAULT_LICENSE
    results = accuracy_results(metrics or {})
    if run_data and run_data.get("copy") in ("smoke-test copy", "stand-in"):
        results = []  # the examples were not the named set's: no model-index claims on it
    dataset = (data.datasets or [None])[0]
    if results and dataset:
        from huggingface_hub import EvalResult

        data.model_name = data.model_name or f"sparse-{(facts['class'] or 'model').lower()}"
        data.eval_results = [
            EvalResult(
                task_type=facts["task"] or "other",
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split=split,
                metric_type="accuracy",
                metric_name=key,
                metric_value=value,
            )
            for split, key, value in results
        ]
    atomic_write(path, lambda tmp: card.save(tmp))
    return path


def card_from_folder(
    folder: str,
    *,
    datasets: Optional[Sequence[str]] = None,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
) -> str:
    """Write or update the card of a saved sparse checkpoint from its files alone (`hf-tickets card`).

    Everything it cannot recompute from the folder is kept: text a person wrote, the lottery, churn and inference
    sections, metadata fields, and the evaluation and command sections unless the folder's `metrics.json` has them.
    """
    from .config import SparsityConfig
    from .masks import load_masks, model_from_checkpoint

    try:
        model = model_from_checkpoint(folder)
    except Exception:  # noqa: BLE001 (an architecture this environment cannot build: facts come from the files)
        model = None
    masks = load_masks(folder, model=model)
    config = SparsityConfig.from_pretrained(folder)
    metrics, command, data = None, None, None
    metrics_file = os.path.join(folder, METRICS_NAME)
    if os.path.isfile(metrics_file):
        level = read_json(metrics_file)
        metrics = _flat_level_metrics(level)
        command = level.get("produced_by")
        data = level.get("data")
    return write_model_card(
        folder,
        masks,
        config,
        model,
        metrics,
        command=command,
        datasets=datasets,
        base_model=base_model,
        license=license,
        metrics_source="From this level's `metrics.json`: `test_at_early_stop` is the test set at the step of "
        "minimum validation loss."
        if metrics
        else "",
        run_data=data,
    )


def _flat_level_metrics(level: Mapping[str, Any]) -> dict[str, float]:
    """`metrics.json` of a lottery level as flat `section.metric` numbers."""
    out = {}
    for section in ("test_at_early_stop", "final_test", "best_eval", "final_eval"):
        for key, value in (level.get(section) or {}).items():
            if isinstance(value, (int, float)):
                out[f"{section}.{key}"] = float(value)
    return out


def write_mask_updates_section(output_dir: str, log_history: list[dict]) -> Optional[str]:
    """Mask churn over training for methods that change masks while training (RigL, SET): a plot
    (`mask_churn.png`) and a table, from the `dst/*` entries they log at each update. None when there are none."""
    updates = [e for e in log_history if "dst/churn" in e]
    if not updates:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in updates]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.plot(steps, [100 * e["dst/churn"] for e in updates], marker="o", label="churn: active weights replaced")
    ax.plot(
        steps,
        [100 * e.get("dst/ever_active", float("nan")) for e in updates],
        marker=".",
        label="weights ever active",
    )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("% of weights")
    ax.set_title("Mask updates during training")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    atomic_write(os.path.join(output_dir, CHURN_PLOT), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    rows = "\n".join(
        f"| {e['step']} | {e['dst/churn']:.4f} | {e.get('dst/ever_active', float('nan')):.4f} | "
        f"{e.get('dst/drop_fraction', float('nan')):.4f} |"
        for e in updates
    )
    markdown = (
        f"### Mask updates during training\n\n![mask churn]({CHURN_PLOT})\n\n"
        "| step | churn | ever active | drop fraction |\n|---|---|---|---|\n" + rows
    )
    return upsert_card_section(output_dir, "mask_updates", markdown)


def card_metadata(path: str) -> dict[str, Any]:
    """The YAML metadata of a card, parsed by huggingface_hub (what the Hub indexes)."""
    from huggingface_hub import ModelCard

    return ModelCard.load(path).data.to_dict()
