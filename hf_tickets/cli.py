"""`hf-tickets` command: run a recipe, inspect a sparse checkpoint, rebuild a report or a card.

    hf-tickets run recipes/quickstart_digits.yaml [section.key=value ...]
    hf-tickets inspect runs/quickstart/ticket
    hf-tickets report runs/quickstart
    hf-tickets card runs/quickstart/ticket
    hf-tickets stability runs/quickstart/rewind_point

The same module runs under `accelerate launch -m hf_tickets.cli run RECIPE`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Optional, Sequence


def _cmd_run(opts: argparse.Namespace) -> int:
    _show_progress()
    from .recipes import default_recipe_path, load_recipe, run_recipe
    from .run_log import quiet_progress_bars, set_console

    set_console(step_logs=opts.log_steps, progress_bar=opts.progress)
    path = default_recipe_path(opts.recipe)
    recipe = load_recipe(path, opts.overrides)  # a wrong path or override fails here, before torch is imported
    _check_pretrained(recipe)
    _pick_threads()
    command = "hf-tickets run " + " ".join(shlex.quote(a) for a in [path, *opts.overrides])
    recipe.setdefault("ticket", {}).setdefault("command", command)
    from .data import hub_dataset_id

    hub_id = hub_dataset_id(str(recipe.get("data", {}).get("name") or ""))
    if hub_id:  # a Hub data set (aliases resolved; not a local folder, not sklearn's digits): the card's `datasets`
        recipe["ticket"].setdefault("datasets", [hub_id])
    with quiet_progress_bars(), _bar_safe_logging(opts.progress):  # no save bars; log lines above the run's bar
        summary = run_recipe(recipe, trust_remote_code=opts.trust_remote_code)
    report = summary.get("report")
    if report:
        _print_run(summary["output_dir"], report, summary.get("trained", []), summary.get("reused", []))
    if "ticket_dir" in summary:  # absent on non-writing ranks of a distributed run
        print(f"ticket: {summary['ticket_dir']}")
    return 0


def _check_pretrained(recipe: dict) -> None:
    """A recipe's `model.pretrained` that is a missing local folder, or a Hub id that is neither cached nor
    reachable (and has no `model.offline_fallback`), fails now, in seconds, with the fix."""
    from .hub_probe import require_hub_model, require_local_path

    model = recipe.get("model") or {}
    pretrained = model.get("pretrained") if isinstance(model, dict) else None
    if not (isinstance(pretrained, str) and pretrained):
        return
    require_local_path(pretrained, "model.pretrained")  # a mistyped folder is an error, fallback or not
    if not model.get("offline_fallback"):
        require_hub_model(
            pretrained,
            fix="give the recipe a model.offline_fallback (a local folder, or 'minilm', which a package ships)",
        )


def _pct(value: Optional[float]) -> str:
    """An accuracy in [0, 1] as a percentage with 2 decimals ("n/a" when missing)."""
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _mean_std(stats: Optional[dict]) -> str:
    return "" if stats is None else f"{_pct(stats['mean'])} ± {100 * stats['std']:.2f} (n={stats['n']})"


def _print_run(output_dir: str, report: dict, trained: list, reused: list) -> None:
    """The run's table: per level, the ticket and each control (mean ± std over replicates when there are several)."""
    from .lottery.report import score, summary_lines

    print(f"\nIMP run in {output_dir} (accuracy = {report['scored_by']})")
    if reused:
        print(
            f"reused {len(reused)} finished arm-levels from an earlier run with the same identity: {', '.join(reused)}"
        )
    print(f"trained {len(trained)} arm-levels in this run")
    if "levels" in report:  # replicates: the aggregate
        arms = [arm for arm in ("ticket", "reinit", "random_prune") if any(arm in e for e in report["levels"])]
        print(f"{'level':>5} {'remaining %':>12} " + " ".join(f"{arm + ' (mean ± std)':>24}" for arm in arms))
        for e in report["levels"]:
            cells = [f"{_mean_std(e.get(arm)):>24}" for arm in arms]
            print(f"{e['level']:>5} {e['remaining_weights_pct']:>12.2f} " + " ".join(cells))
    else:
        print(f"{'level':>5} {'remaining %':>12} {'accuracy':>9}")
        for row in report["trunk"]:
            acc = score(row)[0]
            print(f"{row['level']:>5} {row['remaining_weights_pct']:>12.2f} {_pct(acc):>9}")
        for kind, rows in report["controls"].items():
            for row in rows:
                acc = score(row)[0]
                acc_text = _pct(acc)
                print(
                    f"{kind:>12} @ level {row['trunk_level']}: {row['remaining_weights_pct']:.2f}% remaining, "
                    f"accuracy {acc_text}"
                )
    print("\n".join(summary_lines(report)))  # winning tickets (level 0 excluded); margins over the controls


def _cmd_inspect(opts: argparse.Namespace) -> int:
    import os

    from .hub_probe import require_hub_model
    from .masks import MASKS_NAME, load_masks

    if opts.pattern and os.path.isdir(opts.path) and not os.path.isfile(os.path.join(opts.path, MASKS_NAME)):
        return _inspect_nm(opts, None)  # a folder without masks: its zeros alone
    if os.path.isdir(opts.path) and not os.path.isfile(os.path.join(opts.path, MASKS_NAME)):
        raise ValueError(
            f"{opts.path} is not a sparse checkpoint folder (no {MASKS_NAME} in it): pass a level, ticket or "
            "checkpoint folder, a masks file or a Hub repo id (a dense folder's zeros: add --pattern N:M)."
        )
    if not os.path.exists(opts.path):  # a missing local path is not sent to the Hub; an unreachable Hub fails now
        require_hub_model(opts.path, MASKS_NAME, opts.revision, fix="check the repo id or the local path")
    masks = load_masks(opts.path, revision=opts.revision)  # a folder, a masks file, or a Hub repo id (cached)
    report = masks.report()
    pattern = opts.pattern or str(masks.metadata.get("pattern", "unstructured"))
    if opts.json:
        summary = dict(report, metadata=masks.metadata)
        if ":" in pattern:  # one JSON object: the masks' report with the N:M check under "nm"
            return _inspect_nm(opts, masks, pattern, summary)
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(
        f"{opts.path}: {len(masks)} masked tensors, sparsity {report['sparsity']:.4f} "
        f"({report['kept']} of {report['numel']} kept)"
    )
    print(f"metadata: {json.dumps(masks.metadata, default=str)}")
    width = max(len(n) for n in report["layers"]) if report["layers"] else 10
    for name, row in report["layers"].items():
        print(f"  {name:<{width}}  {'x'.join(map(str, row['shape'])):>12}  {100 * row['sparsity']:6.2f}%")
    if ":" in pattern:
        return _inspect_nm(opts, masks, pattern)
    return 0


def _inspect_nm(opts: argparse.Namespace, masks, pattern: Optional[str] = None, summary: Optional[dict] = None) -> int:
    """The N:M validator's per-tensor report; exit code 1 when a tensor fails."""
    import os

    from .nm import check_tensors, validate_nm

    pattern = pattern or opts.pattern
    if os.path.isdir(opts.path):
        report = validate_nm(opts.path, pattern, from_zeros=opts.from_zeros or masks is None)
    else:  # a masks file alone: its groups
        dims = masks.metadata.get("nm_dims") or {n: 1 for n in masks}
        report = check_tensors(dict(masks), dims, pattern)
    if opts.json:
        print(json.dumps(dict(summary or {}, nm=report.to_dict()), indent=2, default=str))
    else:
        print(f"N:M check: {report.summary()}")
        for name, row in report.tensors.items():
            state = "ok" if row["ok"] else "FAIL"
            detail = (
                ""
                if row["ok"]
                else "  "
                + ", ".join(
                    f"{k}={row[k]}" for k in ("bad_groups", "bad_mask_groups", "nonzero_pruned", "error") if row.get(k)
                )
            )
            print(f"  {state:4s} {name}{detail}")
        for name, why in report.skipped.items():
            print(f"  skip {name}: {why}")
    return 0 if report.ok else 1


def _cmd_report(opts: argparse.Namespace) -> int:
    import os

    from .hub_probe import require_folder
    from .lottery import write_run_report
    from .lottery.layout import finished_levels, replicate_roots

    require_folder(opts.path, "lottery run folder")
    if not any(finished_levels(root) for root in replicate_roots(opts.path)):
        print(
            f"hf-tickets: error: {opts.path} is not a lottery run folder (no finished level_NN/ in it"
            f"{'' if os.path.isdir(opts.path) else ': it does not exist'}); pass a run's output_dir.",
            file=sys.stderr,
        )
        return 2
    report = write_run_report(opts.path, tolerance=opts.tolerance)
    keys = ("dense_accuracy", "winning_ticket_levels", "rewind_vs_reinit_gap", "replicates", "levels")
    print(json.dumps({k: report[k] for k in keys if k in report}, indent=2))
    return 0


def _cmd_card(opts: argparse.Namespace) -> int:
    """Rebuild the card of a saved folder from its files; every section and metadata field the run wrote is kept."""
    import os

    from .cards import card_from_folder
    from .files import MASKS_NAME, SPARSITY_CONFIG_NAME
    from .hub_probe import require_folder

    require_folder(opts.path, "checkpoint folder")
    missing = [n for n in (MASKS_NAME, SPARSITY_CONFIG_NAME) if not os.path.isfile(os.path.join(opts.path, n))]
    if missing:
        raise ValueError(
            f"{opts.path} is not a sparse checkpoint folder (no {' or '.join(missing)} in it), so nothing was written "
            "there: pass a level, ticket or checkpoint folder written by hf_tickets."
        )
    path = card_from_folder(opts.path, datasets=opts.dataset, license=opts.license, base_model=opts.base_model)
    print(path)
    return 0


def _cmd_stability(opts: argparse.Namespace) -> int:
    """Linear mode connectivity from a rewind point, or over rewind steps k of an IMP run (hf_tickets.stability)."""
    import os

    from .lottery.layout import finished_levels, replicate_roots
    from .recipes import build_trainer, default_recipe_path, load_recipe
    from .run_log import quiet_progress_bars, set_console
    from .stability import check_points, check_rewind_point, instability, instability_sweep, recipe_from_run

    set_console(step_logs=opts.log_steps)
    check_points(opts.points)
    is_run = not os.path.isfile(os.path.join(opts.path, "trainer_state.json")) and any(
        finished_levels(root) for root in replicate_roots(opts.path)
    )
    if is_run and opts.masks:
        raise ValueError("--masks applies to a rewind point; for a run folder choose the masks with --level.")
    if not is_run:
        check_rewind_point(opts.path)  # not a run either: says what a rewind point holds
        if opts.steps or opts.level is not None:
            raise ValueError("--steps and --level apply to an IMP run folder, not to a rewind point.")
    recipe_path, overrides = (opts.recipe, []) if opts.recipe else recipe_from_run(opts.path)
    if not opts.recipe and not os.path.isfile(default_recipe_path(recipe_path)):
        raise ValueError(
            f"the run's recipe {recipe_path!r} (from its level_00/metrics.json, a path relative to the folder the "
            "run was started in) is not found from here: run this command from that folder, or pass --recipe."
        )
    out = opts.out or (os.path.join(opts.path, "stability") if is_run else os.path.normpath(opts.path) + ".stability")
    recipe = load_recipe(default_recipe_path(recipe_path), [*overrides, *opts.overrides, f"training.output_dir={out}"])
    trainer = build_trainer(recipe, trust_remote_code=opts.trust_remote_code)
    kwargs = dict(
        data_seeds=tuple(opts.data_seeds),
        points=opts.points,
        max_steps=opts.max_steps,
        eval_split=opts.split,
        batchnorm=opts.batchnorm,
        bn_batches=opts.bn_batches,
        plot=not opts.no_plot,
    )
    if is_run:
        with quiet_progress_bars():  # no "Writing model shards" bars (unless --log-steps)
            sweep = instability_sweep(trainer, opts.path, out, steps=opts.steps, level=opts.level, **kwargs)
        print(f"\nlevel {sweep['level']} ({sweep['remaining_weights_pct']:.2f}% of weights left) of {sweep['run']}")
        print(f"{'k':>8} {'instability':>12} {'loss instab.':>13} {'endpoint errors':>18}")
        for row in sweep["steps"]:
            ends = "/".join(f"{e:.4f}" for e in row["endpoint_errors"])
            print(f"{row['k']:>8} {row['instability']:>12.4f} {row['loss_instability']:>13.4f} {ends:>18}")
    else:
        with quiet_progress_bars():
            result = instability(trainer, opts.path, out, masks=opts.masks, **kwargs)
        print(f"\ntwo copies from step {result.start_step} to {result.end_step}, data seeds {result.data_seeds}")
        print(f"{'alpha':>6} {'error':>8} {'loss':>8}")
        for alpha, error, loss in zip(result.alphas, result.error, result.loss):
            print(f"{alpha:>6.3f} {error:>8.4f} {loss:>8.4f}")
        print(f"instability {result.instability:.4f} (error), {result.loss_instability:.4f} (loss)")
    print(f"results: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="hf-tickets", description="Lottery tickets and sparse training for transformers."
    )
    parser.add_argument("--version", action="version", version=f"hf-tickets {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe (YAML) end to end")
    run.add_argument("recipe", help="recipe file, or a name under recipes/ such as quickstart_digits")
    run.add_argument(
        "overrides", nargs="*", default=[], help="section.key=value overrides, e.g. training.max_steps=100"
    )
    run.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a text model's folder or Hub repo run its own code (never settable from a recipe file)",
    )
    run.add_argument(
        "--log-steps",
        action="store_true",
        help="also print Trainer's per-step log dicts and bars (always written to <output_dir>/train_log.jsonl)",
    )
    run.add_argument(
        "--progress", action="store_true", help="a progress bar over the run's arm-levels (on a terminal only)"
    )
    run.set_defaults(func=_cmd_run)
    inspect = sub.add_parser("inspect", help="per-layer sparsity of a folder, a masks.safetensors or a Hub repo id")
    inspect.add_argument("path", help="a folder, a masks.safetensors file, or a Hub repo id (through the Hub cache)")
    inspect.add_argument("--revision", help="branch, tag or commit of a Hub repo (e.g. level_03 of a pushed run)")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--pattern", help="check an N:M pattern such as 2:4 (default: the masks' own pattern)")
    inspect.add_argument("--from-zeros", action="store_true", help="N:M check from the weights' zeros, not the masks")
    inspect.set_defaults(func=_cmd_inspect)
    report = sub.add_parser("report", help="rebuild imp_report.json and the plots of an IMP run")
    report.add_argument("path")
    report.add_argument("--tolerance", type=float, default=0.01)
    report.set_defaults(func=_cmd_report)
    card = sub.add_parser(
        "card", help="write or update the model card of a sparse checkpoint folder (keeps every section it has)"
    )
    card.add_argument("path")
    card.add_argument("--dataset", action="append", help="Hub data set id for the card's metadata (repeatable)")
    card.add_argument("--license", help="license for the card's metadata (default: kept, else apache-2.0)")
    card.add_argument("--base-model", help="Hub id of the model this one was pruned from")
    card.set_defaults(func=_cmd_card)
    stab = sub.add_parser(
        "stability", help="instability (linear mode connectivity) from a rewind point, or over rewind steps of a run"
    )
    stab.add_argument("path", help="a rewind point (Trainer checkpoint folder) or an IMP run folder")
    stab.add_argument("overrides", nargs="*", default=[], help="recipe overrides, section.key=value")
    stab.add_argument("--recipe", help="the recipe the run used (default: read from the run's level_00/metrics.json)")
    stab.add_argument("--out", help="output folder (default: <run>/stability or <rewind point>.stability)")
    stab.add_argument("--points", type=int, default=30, help="points on the path, endpoints included (default 30)")
    stab.add_argument("--data-seeds", type=int, nargs=2, default=[0, 1_000_003], help="the two copies' data_seed")
    stab.add_argument("--max-steps", type=int, help="global step the copies train to (default: end of schedule)")
    stab.add_argument("--masks", help="masks folder or file to keep (default: the rewind point's own, else dense)")
    stab.add_argument("--steps", type=int, nargs="+", help="run folder: rewind steps k (default: the run's own k)")
    stab.add_argument("--level", type=int, help="run folder: whose masks (default: the last finished trunk level)")
    stab.add_argument("--split", help="eval set the error is measured on (default: test)")
    stab.add_argument("--batchnorm", choices=["auto", "recompute", "interpolate"], default="auto")
    stab.add_argument("--bn-batches", type=int, default=100, help="training batches that recompute BN statistics")
    stab.add_argument("--no-plot", action="store_true")
    stab.add_argument("--trust-remote-code", action="store_true", help="as for `hf-tickets run`")
    stab.add_argument(
        "--log-steps",
        action="store_true",
        help="also print Trainer's per-step log dicts and bars (always written to train_log.jsonl next to the copies)",
    )
    stab.set_defaults(func=_cmd_stability)
    return parser


def _show_progress() -> None:
    """hf_tickets' own progress lines (one per level of a batched experiment) on stderr."""
    import logging

    log = logging.getLogger("hf_tickets")
    ours = [h for h in log.handlers if getattr(h, "_hf_tickets_cli", False)]
    if ours:  # a second main() in one process: write to the stderr of now (tests swap it; the old may be closed)
        ours[0].stream = sys.stderr
    elif not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler._hf_tickets_cli = True
        handler.setFormatter(logging.Formatter("hf_tickets: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _pick_threads() -> None:
    """Small models train fastest on one CPU thread: the default when OMP_NUM_THREADS is unset (said once)."""
    import logging

    from .cpu_threads import pick_cpu_threads

    line = pick_cpu_threads()
    if line:
        logging.getLogger("hf_tickets").info(line)


def _bar_safe_logging(bar: bool):
    """With the run's bar on, hf_tickets' log lines are written through tqdm so they do not tear the bar."""
    import contextlib
    import logging

    if not bar:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[logging.getLogger("hf_tickets")])


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """`parse_args`, except that overrides may also follow the options (`run RECIPE --log-steps a.b=1`): argparse
    gives the positional list everything before the first option and calls the rest unrecognized."""
    parser = build_parser()
    opts, extra = parser.parse_known_args(argv)
    if extra and hasattr(opts, "overrides") and not any(e.startswith("-") for e in extra):
        opts.overrides = [*opts.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return opts


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = _parse(argv)
    try:
        return opts.func(opts)
    except KeyboardInterrupt:  # Ctrl-C: finished levels are on disk; say how to go on, not where Python was
        again = "; finished levels are kept: run the same command again to continue" if opts.command == "run" else ""
        print(f"\nhf-tickets: interrupted{again}.", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as err:  # bad input: the message names the field and the fix
        print(f"hf-tickets: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a permission: one line, not a traceback
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"hf-tickets: error: {err.strerror or err}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
