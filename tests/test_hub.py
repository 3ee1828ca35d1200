"""Sparse checkpoints on the Hub, against a real Hub-API server on 127.0.0.1 (tests/hub_server.py).

The client side is the real, unmodified huggingface_hub and transformers code, run in fresh interpreters because
huggingface_hub reads HF_ENDPOINT, HF_HUB_DISABLE_XET and HF_HUB_OFFLINE when it is imported (../shared/HUB.md):
one process trains nothing and pushes (TicketTrainer.push_to_hub of a finished IMP run, a reference CNN with
push_checkpoint, a plain model without masks), another downloads into an empty cache with stock transformers first
and compares bytes, weights and masks with the local folders. Uploads use the LFS "basic" transfer
(HF_HUB_DISABLE_XET=1), not the Xet transfer huggingface.co users get by default. Cards and malformed masks are
checked in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_bert, make_dataset, training_args
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from hf_tickets import MaskSet, SparsityConfig, TicketTrainer, load_masks
from hf_tickets.cards import get_section, section_keys
from hf_tickets.cli import main
from hf_tickets.files import CARD_NAME, MASKS_NAME, SPARSITY_PLOT
from hf_tickets.hub import check_checkpoint, level_revision
from hf_tickets.lottery import run_experiment
from hf_tickets.lottery.metrics import accuracy
from hf_tickets.lottery.ticket import export_ticket

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REPO = "tester/tiny-bert-ticket"
CNN_REPO = "tester/lenet-sparse"
PLAIN_REPO = "tester/plain-bert"
DATASET = "cornell-movie-review-data/rotten_tomatoes"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def imp_trainer(out) -> TicketTrainer:
    """Tiny BERT (stock transformers), IMP with two pruned levels, evaluated on validation and test."""
    config = SparsityConfig(method="imp", levels=2, prune_fraction=0.5, rewind="init")
    args = training_args(out, max_steps=4, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=16)
    return TicketTrainer(
        model=make_bert(),
        args=args,
        train_dataset=make_dataset("bert", 32),
        eval_dataset={"validation": make_dataset("bert", 16, seed=1), "test": make_dataset("bert", 16, seed=2)},
        compute_metrics=accuracy,
        sparsity_config=config,
    )


@pytest.fixture(scope="module")
def imp_run(tmp_path_factory):
    """A finished IMP run (levels 0-2, both controls) and its exported ticket, trained in this process."""
    out = tmp_path_factory.mktemp("imp") / "run"
    run_experiment(imp_trainer(out), controls=("reinit", "random_prune"), command="python train_tiny_bert.py")
    export_ticket(str(out), datasets=[DATASET])
    return out


@pytest.fixture(scope="module")
def hub():
    sys.path.insert(0, HERE)
    from hub_server import HubServer

    server = HubServer().start()
    yield server
    server.stop()


def client(hub, code: str, home, offline: bool = False, timeout: int = 600, args=()) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter pointed at the local Hub, with its own HF_HOME (cache)."""
    env = dict(os.environ)
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_TOKEN="test-token",
        HF_HOME=str(home),
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_TELEMETRY="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")]),
    )
    env.pop("TRANSFORMERS_OFFLINE", None)
    cmd = [sys.executable, "-c", code, *map(str, args)] if code else [*map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


PUSH = r"""
import sys, torch
from conftest import make_bert, make_dataset, training_args
from test_hub import imp_trainer
from transformers import TrainingArguments
from huggingface_hub import HfApi
from hf_tickets import SparsityConfig, TicketTrainer
from hf_tickets.cards import upsert_card_section
from hf_tickets.models import build_model

run_dir, cnn_dir, plain_dir = sys.argv[1:4]
# 1. the finished IMP run, through TicketTrainer.push_to_hub: levels as branches, main = the ticket
trainer = imp_trainer(run_dir)
trainer.args.hub_model_id = "tiny-bert-ticket"
print("pushed", trainer.push_to_hub())
# 2. a reference CNN, one-shot magnitude, through Trainer's own push_to_hub (which rewrites README.md)
torch.manual_seed(0)
cnn = build_model("lenet_300_100", num_channels=1, image_size=8, num_labels=10, hidden_sizes=[16, 8])
args = TrainingArguments(cnn_dir, report_to=[], use_cpu=True, hub_model_id="lenet-sparse")
cnn_trainer = TicketTrainer(model=cnn, args=args, sparsity_config=SparsityConfig(sparsity=0.75))
cnn_trainer.save_model(cnn_dir)
upsert_card_section(cnn_dir, "notes", "## Notes\n\nA section another writer added: kept through push_to_hub.")
cnn_trainer.push_to_hub(tags=["example"])
# 3. a checkpoint without masks (made sparse by hand), with huggingface_hub alone
plain = make_bert(seed=3)
with torch.no_grad():
    plain.classifier.weight[:, ::2] = 0
plain.save_pretrained(plain_dir)
HfApi().create_repo("plain-bert")
HfApi().upload_folder(folder_path=plain_dir, repo_id="tester/plain-bert")
# 4. a config alone: SparsityConfig.save_pretrained(push_to_hub=True)
alone = SparsityConfig(sparsity=0.625, scope="layerwise")
alone.save_pretrained(plain_dir + "-cfg", push_to_hub=True, repo_id="cfg-only")
"""

DOWNLOAD = r"""
import json, logging, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification, BertForSequenceClassification

out = sys.argv[1]
repo, cnn_repo, plain_repo = "tester/tiny-bert-ticket", "tester/lenet-sparse", "tester/plain-bert"
# stock transformers, before hf_tickets is imported
for rev in ("main", "level_01", "reinit-level_02"):
    model = BertForSequenceClassification.from_pretrained(repo, revision=rev)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/weights-{rev}.safetensors")
try:
    AutoModelForImageClassification.from_pretrained(cnn_repo)
    print("CNN LOADED WITHOUT hf_tickets")
except Exception as err:
    print("CNN needs hf_tickets:", type(err).__name__)
import hf_tickets  # registers the reference models
cnn = AutoModelForImageClassification.from_pretrained(cnn_repo)
save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, f"{out}/weights-cnn.safetensors")
from hf_tickets import SparsityConfig, load_masks
for rev in ("main", "level_01", "reinit-level_02"):
    load_masks(repo, revision=rev).save(f"{out}/masks-{rev}")
load_masks(cnn_repo).save(f"{out}/masks-cnn")
json.dump(SparsityConfig.from_pretrained(repo).to_dict(), open(f"{out}/config.json", "w"))
json.dump(SparsityConfig.from_pretrained("tester/cfg-only").to_dict(), open(f"{out}/config-only.json", "w"))
logging.basicConfig()
derived = load_masks(plain_repo)  # no masks.safetensors in this repo: derived from zeros, with a warning
derived.save(f"{out}/masks-plain")
from huggingface_hub import HfApi, ModelCard, hf_hub_download
api = HfApi()
json.dump({"refs": sorted(b.name for b in api.list_repo_refs(repo).branches),
           "main_files": sorted(api.list_repo_files(repo)),
           "level_files": sorted(api.list_repo_files(repo, revision="level_01")),
           "cnn_files": sorted(api.list_repo_files(cnn_repo))}, open(f"{out}/listing.json", "w"))
for rev in ("main", "level_01"):
    open(f"{out}/README-{rev}.md", "w").write(open(hf_hub_download(repo, "README.md", revision=rev)).read())
    weights = hf_hub_download(repo, "model.safetensors", revision=rev)
    open(f"{out}/model-{rev}.safetensors", "wb").write(open(weights, "rb").read())
open(f"{out}/README-cnn.md", "w").write(open(hf_hub_download(cnn_repo, "README.md")).read())
# `hf-tickets inspect REPO_ID --revision level_01`, the console script's own entry point, into a fresh cache
# (online: the branch is resolved by the server even when its files are cached)
import contextlib, io
from hf_tickets.cli import main
with contextlib.redirect_stdout(io.StringIO()) as printed:
    code = main(["inspect", repo, "--revision", "level_01"])
open(f"{out}/inspect.txt", "w").write(f"exit {code}\n" + printed.getvalue())
"""

OFFLINE = r"""
import sys
from hf_tickets import load_masks, SparsityConfig
print(len(load_masks("tester/tiny-bert-ticket", revision="level_01")))  # from the cache, no request
print(SparsityConfig.from_pretrained("tester/tiny-bert-ticket").method)
try:
    load_masks("tester/tiny-bert-ticket", revision="level_02")   # never downloaded
except ValueError as err:
    print("UNCACHED:", err)
"""


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def pushed(hub, imp_run, tmp_path_factory):
    work = tmp_path_factory.mktemp("push")
    cnn_dir, plain_dir = work / "cnn", work / "plain"
    client(hub, PUSH, work / "push-home", args=(imp_run, cnn_dir, plain_dir))
    down = tmp_path_factory.mktemp("download")
    proc = client(hub, DOWNLOAD, down / "empty-home", args=(down,))
    return {"run": imp_run, "cnn": cnn_dir, "plain": plain_dir, "down": down, "stdout": proc.stdout, "work": work}


def test_push_then_download_gives_identical_weights_and_masks(pushed):
    """main = the ticket, `level_01` and a control's level: weights (stock transformers) and masks round-trip."""
    run, down = pushed["run"], pushed["down"]
    local = {
        "main": run / "ticket",
        "level_01": run / "level_01",
        "reinit-level_02": run.parent / "run.reinit" / "level_02",
    }
    for rev, folder in local.items():
        want = load_file(folder / "model.safetensors")
        got = load_file(down / f"weights-{rev}.safetensors")
        assert set(want) <= set(got)
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), (rev, name)
        assert MaskSet.load(down / f"masks-{rev}") == MaskSet.load(folder), rev
    for rev in ("main", "level_01"):  # bytes round-tripped through LFS and the redirect to the "CDN"
        assert _sha(down / f"model-{rev}.safetensors") == _sha(local[rev] / "model.safetensors")
    masks = MaskSet.load(run / "ticket")
    weights = load_file(down / "weights-main.safetensors")
    assert masks.sparsity() > 0.7
    for name, mask in masks.items():  # exact zeros where pruned, in what stock transformers loaded
        assert not weights[name][~mask].any(), name
    assert json.loads((down / "config.json").read_text())["method"] == "imp"
    pushed_alone = json.loads((down / "config-only.json").read_text())  # SparsityConfig.save_pretrained(push_to_hub=)
    assert pushed_alone["sparsity"] == 0.625 and pushed_alone["scope"] == "layerwise"


def test_pushed_run_has_a_branch_per_level_and_no_pickles(pushed):
    listing = json.loads((pushed["down"] / "listing.json").read_text())
    expected = {level_revision(lv) for lv in (0, 1, 2)} | {
        level_revision(lv, kind) for kind in ("reinit", "random_prune") for lv in (1, 2)
    }
    assert expected | {"main"} <= set(listing["refs"])
    required = {"model.safetensors", MASKS_NAME, "sparsity_config.json", CARD_NAME, "config.json"}
    for files in (listing["main_files"], listing["level_files"]):  # push_checkpoint: never a pickle
        assert required <= set(files)
        assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))], files
    assert required | {SPARSITY_PLOT} <= set(listing["cnn_files"])  # Trainer.push_to_hub: the whole output_dir
    assert {"imp_accuracy.png", "imp_early_stop.png", SPARSITY_PLOT} <= set(listing["main_files"])
    assert "imp_accuracy.png" not in listing["level_files"]  # a branch mirrors its level folder


def test_pushed_cards_link_levels_and_name_the_repo(pushed, hub):
    down = pushed["down"]
    main_card = ModelCard.load(down / "README-main.md")
    assert {"sparse", "lottery-ticket", "imp", "hf-tickets"} <= set(main_card.data.tags)
    revisions = get_section(main_card.text, "hub")
    assert f"{hub.endpoint}/{REPO}/tree/level_01" in revisions and "reinit-level_02" in revisions
    assert f'from_pretrained("{REPO}")' in main_card.text and "<this folder or repo id>" not in main_card.text
    level_card = (down / "README-level_01.md").read_text()
    assert f'from_pretrained("{REPO}", revision="level_01")' in level_card
    cnn_card = ModelCard.load(down / "README-cnn.md")
    assert {"sparse", "magnitude", "example"} <= set(cnn_card.data.tags)
    assert "import hf_tickets" in cnn_card.text and "no `trust_remote_code`" in cnn_card.text
    assert "kept through push_to_hub" in get_section(cnn_card.text, "notes")  # Trainer rewrote the card; kept
    assert "| `hidden.0.weight` |" in cnn_card.text and cnn_card.data.library_name == "transformers"


def test_reference_cnn_loads_once_hf_tickets_is_imported(pushed):
    assert "CNN needs hf_tickets" in pushed["stdout"] and "CNN LOADED WITHOUT" not in pushed["stdout"]
    want = load_file(pushed["cnn"] / "model.safetensors")
    got = load_file(pushed["down"] / "weights-cnn.safetensors")
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert MaskSet.load(pushed["down"] / "masks-cnn") == MaskSet.load(pushed["cnn"])


def test_repo_without_masks_loads_with_masks_from_zeros(pushed):
    derived = MaskSet.load(pushed["down"] / "masks-plain")
    weights = load_file(pushed["plain"] / "model.safetensors")
    assert derived["classifier.weight"].equal(weights["classifier.weight"].ne(0))
    assert float(derived.layer_sparsity()["classifier.weight"]) == pytest.approx(0.5)
    assert "bert.encoder.layer.0.attention.self.query.weight" in derived  # every Linear weight, not embeddings
    assert not any("embeddings" in n for n in derived)


def test_inspect_repo_id_against_the_local_hub(pushed):
    """`hf-tickets inspect REPO_ID --revision level_01` (cli.main, in the download process) reads the level's masks."""
    printed = (pushed["down"] / "inspect.txt").read_text()
    masks = MaskSet.load(pushed["run"] / "level_01")
    assert printed.startswith("exit 0") and f"sparsity {masks.report()['sparsity']:.4f}" in printed
    assert REPO in printed and "bert.encoder.layer.0.attention.self.query.weight" in printed


def test_offline_mode_answers_from_the_cache(pushed, hub):
    proc = client(hub, OFFLINE, pushed["down"] / "empty-home", offline=True)
    lines = proc.stdout.splitlines()
    assert lines[1] == "imp" and "UNCACHED:" in proc.stdout and "level_02" in proc.stdout


# ---- cards --------------------------------------------------------------------------------------------------------


def test_card_command_keeps_every_section(imp_run, tmp_path):
    import shutil

    ticket = tmp_path / "ticket"
    shutil.copytree(imp_run / "ticket", ticket)
    card_path = ticket / CARD_NAME
    text = card_path.read_text(encoding="utf-8")
    text = text.replace("\n# ", "\nHand-written intro that must survive.\n\n# ", 1)
    card_path.write_text(text.replace("license: apache-2.0", "license: mit"), encoding="utf-8")
    before = card_path.read_text(encoding="utf-8")
    keys = section_keys(before)
    assert {"main", "lottery", "evaluation", "command"} <= set(keys)
    assert main(["card", str(ticket)]) == 0
    after = card_path.read_text(encoding="utf-8")
    assert section_keys(after) == keys  # every section, in the same order
    for key in keys:
        if key != "main":
            assert get_section(after, key) == get_section(before, key), key
    assert "Hand-written intro that must survive." in after
    card = ModelCard.load(card_path)
    data = card.data.to_dict()
    assert data["license"] == "mit" and data["datasets"] == [DATASET] and data["library_name"] == "transformers"
    assert {"sparse", "lottery-ticket", "imp"} <= set(data["tags"])
    assert data["pipeline_tag"] == "text-classification"
    assert data["model-index"][0]["results"][0]["metrics"][0]["type"] == "accuracy"
    model_params = sum(t.numel() for t in load_file(ticket / "model.safetensors").values())
    assert f"% of {model_params} |" in after  # all parameters counted from the weights, not the masks
    assert "python train_tiny_bert.py" in get_section(after, "command")
    assert "| parameter | shape | kept | sparsity |" in after and "| level | remaining weights |" in after


def test_card_images_are_valid_pngs(imp_run):
    import matplotlib.image

    for name in (SPARSITY_PLOT, "imp_accuracy.png", "imp_early_stop.png"):
        path = imp_run / "ticket" / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        image = matplotlib.image.imread(str(path))
        assert image.shape[0] > 200 and image.shape[1] > 400, name
        assert f"({name})" in (imp_run / "ticket" / CARD_NAME).read_text()


def test_card_of_a_legacy_card_keeps_its_evaluation(tmp_path):
    """Cards of earlier versions held the evaluation table inside the sparsity section; `card` keeps it."""
    trainer = TicketTrainer(
        model=make_bert(), args=training_args(tmp_path / "o"), sparsity_config=SparsityConfig(sparsity=0.5)
    )
    trainer.save_model(str(tmp_path / "out"))
    path = tmp_path / "out" / CARD_NAME
    text = path.read_text().replace(
        "### Per-layer sparsity",
        "### Evaluation\n| metric | value |\n|---|---|\n| eval_accuracy | 0.9100 |\n\n### Per-layer sparsity",
    )
    text = text.replace("<!-- hf_tickets:command:start -->", "<!-- gone -->").replace(
        "<!-- hf_tickets:command:end -->", ""
    )
    path.write_text(text)
    assert main(["card", str(tmp_path / "out")]) == 0
    assert "| eval_accuracy | 0.9100 |" in get_section(path.read_text(), "evaluation")


def test_nm_card_has_the_validators_verdict(tmp_path):
    trainer = TicketTrainer(
        model=make_bert(),
        args=training_args(tmp_path / "o"),
        sparsity_config=SparsityConfig(method="nm", pattern="2:4"),
    )
    trainer.save_model(str(tmp_path / "out"))
    card = ModelCard.load(tmp_path / "out" / CARD_NAME)
    verdict = get_section(card.text, "nm_check")
    assert "✅" in verdict and "14 of 14 tensors hold the pattern" in verdict
    assert "2:4" in card.data.tags and "nm" in card.data.tags


# ---- safety: what a repo's masks may and may not do -----------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    trainer = TicketTrainer(
        model=make_bert(), args=training_args(tmp_path / "o"), sparsity_config=SparsityConfig(sparsity=0.5)
    )
    trainer.save_model(str(tmp_path / "ckpt"))
    return tmp_path / "ckpt"


def _rewrite(folder, tensors=None, info=None):
    from safetensors import safe_open

    path = folder / MASKS_NAME
    with safe_open(str(path), framework="pt") as fh:
        old = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        header = fh.metadata()
    meta = json.loads(header["hf_tickets_masks"])
    save_file(
        tensors(old) if tensors else old,
        str(path),
        metadata=dict(header, hf_tickets_masks=json.dumps(info(meta) if info else meta)),
    )


def _untouched(model_before, model_after):
    return all(
        torch.equal(a, b) for a, b in zip(model_before.state_dict().values(), model_after.state_dict().values())
    )


@pytest.mark.parametrize("damage", ["renamed", "reshaped", "unlisted", "checksum", "dtype"])
def test_malformed_masks_are_rejected_and_nothing_is_applied(saved, damage, tmp_path):
    name = "bert.encoder.layer.0.attention.self.query.weight"
    if damage == "renamed":  # names that the model does not have (header and file agree)

        def info(m):
            m["tensors"]["not.a.param"] = m["tensors"].pop(name)
            m["order"] = ["not.a.param" if n == name else n for n in m["order"]]
            return m

        _rewrite(saved, tensors=lambda t: {("not.a.param" if k == name else k): v for k, v in t.items()}, info=info)
    elif damage == "reshaped":  # a consistent file for another shape

        def info(m):
            m["tensors"][name]["shape"] = [16, 64]
            return m

        _rewrite(saved, info=info)
    elif damage == "unlisted":  # a tensor the header does not list
        _rewrite(saved, tensors=lambda t: dict(t, extra=torch.zeros(4, dtype=torch.uint8)))
    elif damage == "checksum":  # one flipped byte
        _rewrite(saved, tensors=lambda t: {k: (v ^ 1 if k == name else v) for k, v in t.items()})
    else:  # float payload instead of packed uint8
        _rewrite(saved, tensors=lambda t: {k: (v.float() if k == name else v) for k, v in t.items()})
    model = make_bert()
    reference = make_bert()
    with pytest.raises(ValueError) as err:
        TicketTrainer(model=model, args=training_args(tmp_path / "x"), masks=load_masks(saved, model=model))
    assert damage in ("renamed", "reshaped") or "re-save" in str(err.value)
    assert _untouched(reference, model)  # nothing was applied


def test_push_refuses_weights_whose_pruned_entries_are_not_zero(saved):
    weights = load_file(saved / "model.safetensors")
    weights["classifier.weight"] = torch.ones_like(weights["classifier.weight"])
    save_file(weights, str(saved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not zero"):
        check_checkpoint(str(saved))


def test_zero_mask_module_types_match_the_default_targets():
    from hf_tickets.masks import _ZERO_MASK_TYPES
    from hf_tickets.targets import DEFAULT_TARGET_TYPES

    assert set(DEFAULT_TARGET_TYPES) - set(_ZERO_MASK_TYPES) <= {
        t for t in DEFAULT_TARGET_TYPES if t.__name__ == "Conv1D"
    }


def test_model_cards_folder_holds_the_template_and_valid_example_cards():
    folder = os.path.join(ROOT, "model_cards")
    template = os.path.join(folder, "templates", "sparsity_section.md")
    package = os.path.join(ROOT, "hf_tickets", "templates", "sparsity_section.md")
    assert os.path.samefile(template, package)  # one template: the one the package renders
    examples = [d for d in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, d, CARD_NAME))]
    assert {"lenet300_mnist", "lenet5_fashion_mnist", "minilm_rotten_tomatoes"} <= set(examples)
    for name in examples:
        path = os.path.join(folder, name, CARD_NAME)
        card = ModelCard.load(path)
        assert {"sparse", "lottery-ticket"} <= set(card.data.tags) and card.data.datasets, name
        assert "shortened" in get_section(card.text, "example_run") and "hf-tickets run" in get_section(
            card.text, "command"
        )
        for image in ("imp_accuracy.png", SPARSITY_PLOT):
            assert open(os.path.join(folder, name, image), "rb").read(8) == PNG_MAGIC, (name, image)
