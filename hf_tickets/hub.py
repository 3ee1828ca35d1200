"""Publishing sparse checkpoints on the Hugging Face Hub.

`push_checkpoint(folder, repo_id)` uploads a finished checkpoint folder as one commit: dense weights with exact zeros,
`masks.safetensors`, `sparsity_config.json`, the card (README.md, with the repo id in its usage snippet) and its
images; never a pickle. The commit mirrors the folder: a file the revision had and the folder does not is deleted.

`push_lottery_run(run_dir, repo_id)` publishes an IMP run in one repo: every finished level (and each control's
levels) on its own branch (`level_03`, `reinit-level_03`, `random_prune-level_03`; with replicates
`replicate_1-level_03`), and `main` = the run's ticket, whose card links every revision.

Downloads need nothing from this module: `from_pretrained(repo_id, revision=...)` in transformers,
`hf_tickets.load_masks(repo_id, revision=...)` and `SparsityConfig.from_pretrained(repo_id, revision=...)` go
through the Hub cache (files.resolve_file).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence

import torch

from .cards import REPO_PLACEHOLDER, card_tags, model_facts, set_section
from .config import SparsityConfig
from .files import CARD_NAME, MASKS_NAME, METRICS_NAME, SPARSITY_CONFIG_NAME, publishable, read_json, weight_files
from .masks import MaskSet

logger = logging.getLogger(__name__)

MAIN = "main"


def level_revision(level: int, kind: str = "trunk", replicate: Optional[int] = None) -> str:
    """The branch a level of an IMP run is pushed to: `level_03`, `reinit-level_03`, `replicate_1-level_03`."""
    name = f"level_{level:02d}"
    if kind != "trunk":
        name = f"{kind}-{name}"
    if replicate is not None:
        name = f"replicate_{replicate}-{name}"
    return name


def check_checkpoint(folder: str) -> tuple[MaskSet, SparsityConfig]:
    """Refuse a folder that is not a finished sparse checkpoint, before anything is uploaded.

    It needs safetensors weights, `masks.safetensors` and `sparsity_config.json`, and every pruned weight must be
    exactly zero in the weights file (the masks must fit it: same names and shapes)."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not a folder: push a folder written by TicketTrainer.save_model.")
    files = weight_files(folder)
    if not files:
        raise ValueError(
            f"{folder!r} has no model.safetensors: save it with save_model (safetensors; pickled weights are not "
            "pushed)."
        )
    for name in (MASKS_NAME, SPARSITY_CONFIG_NAME):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"{folder!r} has no {name}: is it a sparse checkpoint written by hf_tickets?")
    masks = MaskSet.load(folder)
    config = SparsityConfig.from_pretrained(folder)
    weights = _weights_by_mask_name(folder, files, masks)
    for name, mask in masks.items():
        weight = weights[name]
        if tuple(weight.shape) != tuple(mask.shape):
            raise ValueError(f"{folder!r}: mask {name!r} has shape {tuple(mask.shape)}, its weight {weight.shape}.")
        alive = int(weight.ne(0).logical_and(~mask).sum())
        if alive:
            raise ValueError(
                f"{folder!r}: {alive} pruned entries of {name!r} are not zero in the weights file: the weights and "
                "masks do not belong together; save them again with TicketTrainer.save_model."
            )
    return masks, config


def _weights_by_mask_name(folder: str, files: list[str], masks: MaskSet) -> dict[str, torch.Tensor]:
    """The weights the masks name. Raw safetensors keys when they match; else the model loaded with
    `from_pretrained` (transformers 5 saves some models, ViT, under other names than `named_parameters()`)."""
    from safetensors import safe_open

    raw: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                if key in masks:
                    raw[key] = fh.get_tensor(key)
    if set(masks) <= set(raw):
        return raw
    from .masks import model_from_checkpoint

    model = model_from_checkpoint(folder)
    params = dict(model.named_parameters())
    missing = [n for n in masks if n not in params]
    if missing:
        raise ValueError(f"{folder!r}: masks name weights the model does not have: {missing[:3]}.")
    return {n: params[n].detach() for n in masks}


def _card_bytes(folder: str, repo_id: str, revision: str, sections: dict[str, str], tags: Sequence[str]) -> bytes:
    """The folder's card as it goes to the Hub: the repo id in the usage snippet (and the revision for a branch),
    extra sections, tags added. The folder's own README.md is left as it is."""
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(folder, CARD_NAME)
    card = ModelCard.load(path) if os.path.isfile(path) else ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n")
    where = repo_id if revision == MAIN else f'{repo_id}", revision="{revision}'
    text = card.text.replace(REPO_PLACEHOLDER, where)
    for key, markdown in sections.items():
        text = set_section(text, key, markdown)
    card.text = text
    card.data.tags = sorted(set(card.data.tags or []) | set(tags))
    card.data.library_name = card.data.library_name or "transformers"
    return str(card).encode("utf-8")


def push_checkpoint(
    folder: str,
    repo_id: str,
    *,
    revision: str = MAIN,
    commit_message: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    tags: Sequence[str] = (),
    sections: Optional[dict[str, str]] = None,
    create_repo: bool = True,
) -> Any:
    """Upload a finished sparse checkpoint folder to `repo_id` at branch `revision` (created when missing) as one
    commit; return its `CommitInfo`.

    What goes up: the folder's safetensors, JSON, markdown, text and image files (weights with exact zeros, masks,
    sparsity config, tokenizer, card and plots); pickles such as `training_args.bin` stay local. The folder is
    checked first (`check_checkpoint`): weights whose pruned entries are not zero are refused. Tags: the method's
    (`card_tags`: `sparse`, `lottery-ticket` for IMP, `2:4`, ...) plus `tags`. `sections` are markdown sections
    added to the pushed card by key (the folder's own card is not changed).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    _, config = check_checkpoint(folder)
    api = HfApi(token=token)
    if create_repo:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision != MAIN:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    all_tags = [*card_tags(config), *tags]
    operations: list[Any] = []
    names = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)) and publishable(n))
    for name in names:
        if name == CARD_NAME:
            continue
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name)))
    card = _card_bytes(folder, repo_id, revision, sections or {}, all_tags)
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card))
    keep = {op.path_in_repo for op in operations} | {".gitattributes"}
    remote = api.list_repo_files(repo_id, revision=revision)
    operations += [CommitOperationDelete(path_in_repo=p) for p in remote if p not in keep]
    skipped = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)) and not publishable(n))
    if skipped:
        logger.info("not pushed from %s (pickles or unknown kinds): %s", folder, skipped)
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or f"Upload sparse checkpoint ({config.method}) with hf_tickets",
        revision=revision,
    )


def _level_row(folder: str) -> dict[str, Any]:
    from .lottery.report import score

    metrics = read_json(os.path.join(folder, METRICS_NAME))
    return {"remaining": metrics.get("remaining_weights_pct"), "accuracy": score(metrics)[0]}


def revisions_section(
    repo_id: str, endpoint: str, rows: list[dict[str, Any]], main_level: int, model_class: Optional[str] = None
) -> str:
    """Markdown table of the pushed revisions with links and the line that loads each one."""
    lines = [
        "## Revisions of this repo",
        "",
        f"`main` holds the ticket (level {main_level}). Every level of the run, and each control's levels, is a "
        "branch of this repo:",
        "",
        "| revision | arm | level | remaining weights | accuracy |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        link = f"[`{row['revision']}`]({endpoint}/{repo_id}/tree/{row['revision']})"
        acc = "n/a" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}%"
        rem = "n/a" if row["remaining"] is None else f"{row['remaining']:.2f}%"
        lines.append(f"| {link} | {row['kind']} | {row['level']} | {rem} | {acc} |")
    first = next((row["revision"] for row in rows if row["kind"] == "trunk" and row["level"] > 0), "level_01")
    import transformers

    stock = model_class is not None and getattr(transformers, model_class, None) is not None
    cls = model_class if stock else "AutoModelForImageClassification"
    lines += [
        "",
        "Load a level like `main`, with its revision:",
        "",
        "```python",
        "import hf_tickets" + ("" if stock else "  # registers hf_tickets' reference models with the Auto classes"),
        f"from transformers import {cls}",
        "",
        f'model = {cls}.from_pretrained("{repo_id}", revision="{first}")',
        f'masks = hf_tickets.load_masks("{repo_id}", revision="{first}")',
        "```",
    ]
    return "\n".join(lines)


def push_lottery_run(
    run_dir: str,
    repo_id: str,
    *,
    controls: bool = True,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    tags: Sequence[str] = (),
    commit_message: Optional[str] = None,
) -> dict[str, Any]:
    """Publish an IMP run: each finished level on its own branch, `main` = the ticket, the card linking them.

    Args:
        run_dir: the run's `output_dir` (its `ticket/` is exported first when missing).
        controls: push the controls' levels too (`reinit-level_NN`, `random_prune-level_NN`).

    Returns `{"repo_id", "main": CommitInfo, "revisions": {branch: CommitInfo}}`.
    """
    from huggingface_hub import HfApi

    from .lottery.layout import CONTROL_KINDS, arm_root, finished_levels, level_dir, replicate_roots
    from .lottery.ticket import TICKET_DIR, export_ticket

    roots = replicate_roots(run_dir)
    if not any(finished_levels(root) for root in roots):
        raise ValueError(f"{run_dir!r} is not a lottery run folder (no finished level_NN/): pass a run's output_dir.")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    endpoint = api.endpoint.rstrip("/")
    pushed: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for r, root in enumerate(roots):
        replicate = None if len(roots) == 1 else r
        kinds = ("trunk", *(CONTROL_KINDS if controls else ()))
        for kind in kinds:
            for level in finished_levels(arm_root(root, kind)):
                folder = level_dir(arm_root(root, kind), level)
                revision = level_revision(level, kind, replicate)
                note = (
                    f"## This revision\n\nLevel {level} of the {'IMP' if kind == 'trunk' else kind} arm of a lottery "
                    "run"
                    + (f" (replicate {replicate})" if replicate is not None else "")
                    + f". `main` holds the run's ticket: {endpoint}/{repo_id}"
                )
                pushed[revision] = push_checkpoint(
                    folder,
                    repo_id,
                    revision=revision,
                    token=token,
                    tags=tags,
                    sections={"hub": note},
                    create_repo=False,
                    commit_message=commit_message or f"{revision} of the lottery run",
                )
                rows.append({"revision": revision, "kind": kind, "level": level, **_level_row(folder)})
    ticket = os.path.join(roots[0], TICKET_DIR)
    if not os.path.isdir(ticket):
        ticket = export_ticket(roots[0])
    main_level = int(read_json(os.path.join(ticket, METRICS_NAME)).get("level", -1))
    main = push_checkpoint(
        ticket,
        repo_id,
        revision=MAIN,
        token=token,
        tags=tags,
        sections={"hub": revisions_section(repo_id, endpoint, rows, main_level, model_facts(None, ticket)["class"])},
        create_repo=False,
        commit_message=commit_message or f"Lottery ticket (level {main_level}) with hf_tickets",
    )
    return {"repo_id": repo_id, "main": main, "revisions": pushed}
