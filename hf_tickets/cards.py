"""Model cards: a sparsity section rendered from a Jinja template, added to (never replacing) an existing card."""

from __future__ import annotations

import os
from importlib import resources
from typing import Optional

from jinja2 import Template
from torch import nn

from .config import SparsityConfig
from .masks import MaskSet
from .targets import input_dims

README_NAME = "README.md"
SECTION_START = "<!-- hf_tickets:start -->"
SECTION_END = "<!-- hf_tickets:end -->"
CARD_TAGS = ["hf-tickets", "sparse", "pruning"]


def render_sparsity_section(
    masks: MaskSet, config: SparsityConfig, model: Optional[nn.Module] = None, metrics: Optional[dict] = None
) -> str:
    """The card's sparsity section, between markers so that later saves replace it in place."""
    from .version import __version__

    report = masks.report()
    model_params = sum(p.numel() for p in model.parameters()) if model is not None else report["numel"]
    pruned = report["numel"] - report["kept"]
    template = Template(resources.files("hf_tickets").joinpath("templates/sparsity_section.md").read_text())
    body = template.render(
        version=__version__,
        config=config,
        sparsity=report["sparsity"],
        kept=report["kept"],
        numel=report["numel"],
        model_sparsity=pruned / max(model_params, 1),
        model_params=model_params,
        metrics=metrics or {},
        layers=report["layers"],
        collapsed=masks.collapsed(input_dims=input_dims(model, masks) if model is not None else None),
        model_class=type(model).__name__ if model is not None else "AutoModel",
        model_module="hf_tickets.models"
        if model is not None and type(model).__module__.startswith("hf_tickets.")
        else "transformers",
    )
    return f"{SECTION_START}\n{body.strip()}\n{SECTION_END}\n"


def write_model_card(
    output_dir: str,
    masks: MaskSet,
    config: SparsityConfig,
    model: Optional[nn.Module] = None,
    metrics: Optional[dict] = None,
) -> str:
    """Create README.md, or update the hf_tickets section of an existing one; return its path."""
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(output_dir, README_NAME)
    section = render_sparsity_section(masks, config, model, metrics)
    if os.path.isfile(path):
        card = ModelCard.load(path)
        text = card.text
        if SECTION_START in text and SECTION_END in text:
            head, rest = text.split(SECTION_START, 1)
            text = head + section + rest.split(SECTION_END, 1)[1].lstrip("\n")
        else:
            text = text.rstrip() + "\n\n" + section
        card.text = text
        card.data.tags = sorted(set(card.data.tags or []) | set(CARD_TAGS))
        card.data.library_name = card.data.library_name or "transformers"
    else:
        data = ModelCardData(library_name="transformers", tags=CARD_TAGS)
        name = type(model).__name__ if model is not None else "model"
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# Sparse {name}\n\n{section}")
    tmp = path + ".tmp"
    card.save(tmp)
    os.replace(tmp, path)
    return path


def upsert_card_section(output_dir: str, key: str, markdown: str) -> str:
    """Insert or replace a named section (between `<!-- hf_tickets:KEY:start/end -->` markers) in README.md."""
    path = os.path.join(output_dir, README_NAME)
    start, end = f"<!-- hf_tickets:{key}:start -->", f"<!-- hf_tickets:{key}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}\n"
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip() + "\n\n" + block
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


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
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, [e["dst/churn"] for e in updates], marker="o", label="mask churn (active weights replaced)")
    ax.plot(steps, [e.get("dst/ever_active", float("nan")) for e in updates], marker=".", label="ever active")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("fraction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "mask_churn.png"), dpi=120)
    plt.close(fig)
    rows = "\n".join(
        f"| {e['step']} | {e['dst/churn']:.4f} | {e.get('dst/ever_active', float('nan')):.4f} | "
        f"{e.get('dst/drop_fraction', float('nan')):.4f} |"
        for e in updates
    )
    markdown = (
        "### Mask updates during training\n\n![mask churn](mask_churn.png)\n\n"
        "| step | churn | ever active | drop fraction |\n|---|---|---|---|\n" + rows
    )
    return upsert_card_section(output_dir, "mask_updates", markdown)
