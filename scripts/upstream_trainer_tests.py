#!/usr/bin/env python
"""Run transformers' own Trainer tests with Trainer replaced by TicketTrainer, and compare with stock Trainer.

The claim checked (issue 9): a TicketTrainer built exactly like Trainer is Trainer, and so is one built with
SparsityConfig(sparsity=0.0): every upstream test that passes with stock Trainer passes in modes `ticket` and
`ticket0`. Mode `ticket50` (SparsityConfig(sparsity=0.5)) is reported too; there only tests that need the dense
model's exact loss may differ.

transformers' tests are not in its PyPI package and are never committed here: point the script at a checkout of
the installed release (`git clone --depth 1 -b v5.24.0 https://github.com/huggingface/transformers`):

    .venv/bin/python scripts/upstream_trainer_tests.py --transformers-src /path/to/transformers
    .venv/bin/python scripts/upstream_trainer_tests.py --transformers-git /path/to/transformers.git --rev v5.24.0

Each mode is one pytest process (run one after another, or two at a time with --jobs 2) over the same files, with
`-p no:cacheprovider`, no `-x`, a JUnit XML per mode, the Hugging Face Hub offline, and the plugin
`scripts/upstream_trainer_plugin.py` that rebinds `transformers.Trainer` before the test modules import it. The
script prints a table (mode, passed, failed, errors, skipped, seconds), every test that passes with stock but not
in a ticket mode (with its failure message), the distinct failure messages, and writes `summary.json` to --out.
Exit status: 0 when `ticket` and `ticket0` lose no stock pass, 1 otherwise, 2 when a mode could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
PLUGIN = "upstream_trainer_plugin"
MODES = ("stock", "ticket", "ticket0", "ticket50")
# Modes whose pass set must contain stock's; ticket50 is informational (pruning half the weights changes losses).
STRICT_MODES = ("ticket", "ticket0")

# The CPU-runnable files of tests/trainer/ that exercise Trainer, measured on 2 CPU cores (see docs/drop_in.md). The
# rest is distributed/DeepSpeed/FSDP/TPU/accelerator-only, needs packages or Hub models this machine lacks, or tests
# trainer_pt_utils without building a Trainer; add files with --files.
DEFAULT_FILES = (
    "tests/trainer/test_trainer.py",
    "tests/trainer/test_trainer_callback.py",
    "tests/trainer/test_trainer_resume.py",
    "tests/trainer/test_trainer_checkpointing.py",
    "tests/trainer/test_trainer_data.py",
    "tests/trainer/test_trainer_evaluation.py",
    "tests/trainer/test_trainer_hyperparameter.py",
    "tests/trainer/test_trainer_optimizers.py",
)

# Tests that cannot run here at all, with stock Trainer either: they download models, tokenizers or data sets
# from the Hub (the machines that run this have no network beyond package registries).
DEFAULT_EXCLUDES = {
    "test_gradient_accumulation_loss_alignment_with_loss_func": "downloads TinyStories-33M + wikitext",
    "test_include_num_input_tokens_seen": "downloads bert-base-cased",
    "test_special_token_alignment": "downloads hf-internal-testing/tiny-random-LlamaForCausalLM",
    "test_trainer_works_without_model_config": "downloads the tiny-random-LlamaForCausalLM tokenizer",
    "test_train_and_predict_loss_parity": "downloads hf-internal-testing/tiny-random-LlamaForCausalLM",
    "test_save_collator_tokenizer_by_default": "downloads the bert-base-uncased tokenizer",
    "test_trainer_saves_tokenizer": "downloads the google-bert/bert-base-uncased tokenizer",
    "test_trainer_saves_feature_extractor": "downloads the facebook/wav2vec2-base-960h feature extractor",
}

# What the tests need from tests/ besides tests/trainer/ when exporting from a git directory.
EXPORT_PATHS = ("tests/__init__.py", "tests/trainer", "tests/fixtures")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--transformers-src", type=Path, help="checkout/export of transformers (holds tests/trainer/)")
    src.add_argument(
        "--transformers-git", type=Path, help="a transformers git directory (bare or .git) to export from"
    )
    p.add_argument("--rev", default="v5.24.0", help="revision to export with --transformers-git (default: v5.24.0)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--files", nargs="+", default=list(DEFAULT_FILES), help="test files, relative to the source root")
    p.add_argument("-k", dest="keyword", default=None, help="extra pytest -k expression (and-ed with the exclusions)")
    p.add_argument("--no-default-excludes", action="store_true", help="run the Hub-downloading tests too")
    p.add_argument(
        "--out", type=Path, default=REPO / "build" / "upstream_trainer_results", help="folder for logs, XML, JSON"
    )
    p.add_argument("--jobs", type=int, choices=(1, 2), default=1, help="modes run at once (2 cores: at most 2)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed per mode (default 1800)")
    p.add_argument("--python", default=sys.executable, help="interpreter with transformers and hf_tickets")
    p.add_argument(
        "--hf-tickets-rev",
        default=None,
        help="test hf_tickets as committed at this revision of this repository (exported to a temporary folder "
        "placed first on PYTHONPATH) instead of the working tree",
    )
    p.add_argument("--summarize-only", action="store_true", help="re-read the XML files in --out, run nothing")
    return p.parse_args(argv)


# ---- sources ----------------------------------------------------------------------------------------------------


def export_git(git_dir: Path, rev: str, dest: Path, paths) -> Path:
    """`git archive` the given paths of `rev` into dest; paths missing at that revision are skipped."""
    dest.mkdir(parents=True, exist_ok=True)
    present = []
    for path in paths:
        probe = subprocess.run(
            ["git", f"--git-dir={git_dir}", "cat-file", "-e", f"{rev}:{path}"], capture_output=True, text=True
        )
        if probe.returncode == 0:
            present.append(path)
    if not present:
        raise SystemExit(f"{git_dir} has none of {list(paths)} at {rev}")
    archive = dest / "export.tar"
    subprocess.run(["git", f"--git-dir={git_dir}", "archive", "-o", str(archive), rev, *present], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()
    return dest


def git_rev(git_dir: Path, rev: str) -> str | None:
    out = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", rev], capture_output=True, text=True)
    return out.stdout.strip() or None


def hf_tickets_commit() -> dict:
    def git(*args):
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return r.stdout.strip()

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "dirty_hf_tickets": bool(git("status", "--porcelain", "hf_tickets")),
    }


# ---- running ----------------------------------------------------------------------------------------------------


def k_expression(args) -> str | None:
    parts = []
    if not args.no_default_excludes:
        parts.append("not (" + " or ".join(sorted(DEFAULT_EXCLUDES)) + ")")
    if args.keyword:
        parts.append(f"({args.keyword})")
    return " and ".join(parts) or None


def run_mode(mode: str, args, src: Path, files, kexpr, extra_path: str | None, threads: int) -> dict:
    out = args.out
    xml = out / f"{mode}.xml"
    log = out / f"{mode}.log"
    cmd = [
        args.python,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-p",
        PLUGIN,
        "-q",
        "-rfE",
        "--tb=short",
        "--continue-on-collection-errors",
    ]
    cmd += ["-o", "junit_family=xunit1", f"--junitxml={xml}", "--basetemp", str(out / f"tmp_{mode}")]
    if kexpr:
        cmd += ["-k", kexpr]
    cmd += list(files)
    env = dict(os.environ)
    path = (
        [str(SCRIPTS)] + ([extra_path] if extra_path else []) + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.update(
        PYTHONPATH=os.pathsep.join(path),
        HF_TICKETS_UPSTREAM_MODE=mode,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
    )
    start = time.monotonic()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n\n")
        fh.flush()
        try:
            rc = subprocess.run(
                cmd, cwd=src, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=args.timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    seconds = round(time.monotonic() - start, 1)
    print(f"[{mode}] pytest exit {rc} after {seconds:.0f} s (log: {log})", flush=True)
    return {"returncode": rc, "seconds": seconds, "log": str(log), "xml": str(xml)}


# ---- reading results --------------------------------------------------------------------------------------------


def read_junit(xml: Path) -> dict[str, dict]:
    """test id -> {"status": passed|failed|error|skipped, "message": str}"""
    results = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        file = case.get("file") or ""
        classname = case.get("classname") or ""
        module = file[:-3].replace("/", ".") if file.endswith(".py") else ""
        cls = classname[len(module) + 1 :] if module and classname.startswith(module + ".") else ""
        if not file:
            file = classname.replace(".", "/") + ".py"
        test_id = "::".join(x for x in (file, cls, case.get("name")) if x)
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or (child.text or "")).strip()
                break
        # A test that failed in the call and again at teardown has two entries: keep the worst.
        if test_id in results and results[test_id]["status"] in ("failed", "error"):
            continue
        results[test_id] = {"status": status, "message": message}
    return results


def normalize(message: str) -> str:
    line = next((text for text in message.splitlines() if text.strip()), "")
    line = re.sub(r"0x[0-9a-f]+", "0x…", line)
    line = re.sub(r"/[\w./-]+", "<path>", line)
    line = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", line)
    return line[:240]


def counts(results: dict) -> dict:
    c = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for r in results.values():
        c[{"passed": "passed", "failed": "failed", "error": "errors", "skipped": "skipped"}[r["status"]]] += 1
    c["total"] = len(results)
    return c


def compare(all_results: dict[str, dict]) -> dict:
    stock = all_results.get("stock")
    comparison = {}
    for mode, results in all_results.items():
        if mode == "stock" or stock is None:
            continue
        lost, gained = [], []
        for test_id, s in sorted(stock.items()):
            r = results.get(test_id, {"status": "missing", "message": "not run in this mode"})
            if s["status"] == "passed" and r["status"] != "passed":
                lost.append(
                    {
                        "test": test_id,
                        "status": r["status"],
                        "message": r["message"].splitlines()[0][:400] if r["message"] else "",
                    }
                )
            elif s["status"] in ("failed", "error") and r["status"] == "passed":
                gained.append(test_id)
        causes: dict[str, dict] = {}
        for item in lost:
            key = normalize(item["message"]) or item["status"]
            entry = causes.setdefault(key, {"message": key, "count": 0, "example": item["test"], "tests": []})
            entry["count"] += 1
            entry["tests"].append(item["test"])
        comparison[mode] = {
            "lost_stock_passes": lost,
            "passes_where_stock_fails": gained,
            "distinct_messages": sorted(causes.values(), key=lambda e: -e["count"]),
        }
    return comparison


def report(summary: dict) -> None:
    print()
    print(f"{'mode':<10}{'passed':>8}{'failed':>8}{'errors':>8}{'skipped':>9}{'lost':>7}{'seconds':>9}")
    for mode, info in summary["modes"].items():
        c = info["counts"]
        lost = len(summary["comparison"].get(mode, {}).get("lost_stock_passes", [])) if mode != "stock" else 0
        seconds = info.get("seconds")
        seconds = f"{seconds:>9.0f}" if isinstance(seconds, (int, float)) else f"{'-':>9}"
        print(f"{mode:<10}{c['passed']:>8}{c['failed']:>8}{c['errors']:>8}{c['skipped']:>9}{lost:>7}{seconds}")
    print("(lost = tests that pass with stock Trainer but not in this mode)")
    for mode, comp in summary["comparison"].items():
        lost = comp["lost_stock_passes"]
        print(f"\n== {mode}: {len(lost)} stock passes lost" + ("" if mode in STRICT_MODES else " (informational)"))
        for e in comp["distinct_messages"]:
            print(f"  {e['count']} x {e['message']}")
            for test in e["tests"]:
                print(f"      {test}")
        if comp["passes_where_stock_fails"]:
            print(f"  pass in {mode} but fail with stock: {comp['passes_where_stock_fails']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="upstream_trainer_"))
    try:
        if args.transformers_git:
            src = export_git(args.transformers_git.resolve(), args.rev, tmp / "transformers", EXPORT_PATHS)
            source = {
                "git_dir": str(args.transformers_git),
                "rev": args.rev,
                "commit": git_rev(args.transformers_git, args.rev),
            }
        else:
            src = args.transformers_src.resolve()
            source = {"path": str(src)}
        files = [f for f in args.files if (src / f).is_file()]
        missing = sorted(set(args.files) - set(files))
        if missing:
            print(f"not found under {src}, skipped: {missing}", file=sys.stderr)
        if not files:
            raise SystemExit(f"no test file found under {src}")

        extra_path = None
        tested = {**hf_tickets_commit(), "tested": "working tree"}
        if args.hf_tickets_rev:
            repo_git = Path(
                subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "--absolute-git-dir"], text=True).strip()
            )
            commit = git_rev(repo_git, args.hf_tickets_rev)
            export_git(repo_git, commit, tmp / "hf_tickets_src", ["hf_tickets"])
            extra_path = str(tmp / "hf_tickets_src")
            tested["tested"] = f"{args.hf_tickets_rev} = {commit[:12]} (exported)"
        if not args.summarize_only:
            print(f"hf_tickets: {tested}", flush=True)

        kexpr = k_expression(args)
        run_info = {}
        if not args.summarize_only:
            threads = 1  # tiny CPU models: one thread is faster on 2 cores (see Makefile)
            print(f"tests from {src}: {files}\n-k {kexpr!r}\nmodes {args.modes}, {args.jobs} at a time", flush=True)
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                futures = {
                    m: pool.submit(run_mode, m, args, src, files, kexpr, extra_path, threads) for m in args.modes
                }
                run_info = {m: f.result() for m, f in futures.items()}

        previous = {}
        if args.summarize_only and (args.out / "summary.json").is_file():
            previous = json.loads((args.out / "summary.json").read_text())
            tested = previous.get("hf_tickets", tested)
        all_results, modes = {}, {}
        for mode in args.modes:
            xml = args.out / f"{mode}.xml"
            info = dict(
                run_info.get(mode)
                or {k: v for k, v in previous.get("modes", {}).get(mode, {}).items() if k != "counts"}
            )
            if xml.is_file():
                all_results[mode] = read_junit(xml)
                info["counts"] = counts(all_results[mode])
            else:
                info["counts"] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "total": 0}
                info["missing_xml"] = True
            modes[mode] = info

        import importlib.metadata as md

        summary = {
            "date": previous.get("date") or time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "transformers": md.version("transformers"),
            "torch": md.version("torch"),
            "hf_tickets": tested,
            "tests_source": source,
            "files": files,
            "k": kexpr,
            "excluded": {} if args.no_default_excludes else DEFAULT_EXCLUDES,
            "modes": modes,
            "comparison": compare(all_results),
        }
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        report(summary)
        print(f"\nsummary: {args.out / 'summary.json'}")
        if any(m.get("missing_xml") for m in modes.values()):
            return 2
        strict_lost = sum(len(summary["comparison"].get(m, {}).get("lost_stock_passes", [])) for m in STRICT_MODES)
        return 1 if strict_lost else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
