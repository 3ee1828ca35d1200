"""The run report's two judgements: which levels are winning tickets, and whether the ticket beats a control by
more than the evaluation split's noise (hf_tickets/lottery/report.py)."""

import json
import math

import pytest

from hf_tickets.lottery.layout import METRICS_NAME, control_dir, level_dir
from hf_tickets.lottery.report import (
    aggregate_replicates,
    margin_over_control,
    summary_lines,
    winning_ticket_levels,
    write_report,
)


def test_dense_level_is_never_a_winning_ticket():
    # Level 0 scores exactly its own accuracy, so a definition that counts every level within tolerance lists it.
    assert winning_ticket_levels({0: 0.98, 1: 0.975, 2: 0.95, 3: 0.99}, tolerance=0.01) == [1, 3]
    assert winning_ticket_levels({0: 0.98}, tolerance=0.01) == []
    assert winning_ticket_levels({0: 0.98, 1: 0.96, 2: 0.90}, tolerance=0.01) == []
    assert winning_ticket_levels({1: 0.99, 2: 0.99}, tolerance=0.01) == []  # no dense score: nothing to match
    assert winning_ticket_levels({0: 0.98, 1: None, 2: 0.98}, tolerance=0.0) == [2]  # unscored levels are not tickets


def _write_level(folder, level, accuracy, *, trunk_level=None, test_size=300):
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {
        "level": level,
        "remaining_weights_pct": 100 * 0.5**level,
        "test_at_early_stop": {"accuracy": accuracy},
        "data": {"name": "sklearn/digits", "splits": {"train": 1297, "validation": 200, "test": test_size}},
    }
    if trunk_level is not None:
        metrics["trunk_level"] = trunk_level
    (folder / METRICS_NAME).write_text(json.dumps(metrics))


def test_report_of_a_run_excludes_level_0_and_gives_margins_in_test_images(tmp_path):
    root = tmp_path / "run"
    for level, acc in enumerate([0.98, 0.98, 0.97, 0.93]):  # dense, two tickets within 0.01, then a drop
        _write_level(root / f"level_{level:02d}", level, acc)
    for kind, accs in {"reinit": [0.98, 0.95, 0.85], "random_prune": [0.97, 0.96, 0.20]}.items():
        for level, acc in enumerate(accs, start=1):
            _write_level(tmp_path / f"run.{kind}" / f"level_{level:02d}", level, acc, trunk_level=level)
    assert str(control_dir(str(root), "reinit")).endswith("run.reinit")
    assert level_dir(str(root), 3).endswith("level_03")

    report = write_report(str(root), tolerance=0.01)
    assert report["winning_ticket_levels"] == [1, 2]
    last = report["control_margins"]["3"]
    # 0.93 vs 0.85 on 300 images: 24 images; noise: 1.96 * sqrt((.93*.07 + .85*.15) / 300) * 300 = 14.9 -> 15 needed
    assert last["reinit"]["examples"] == 24 and last["reinit"]["needed_examples"] == 15
    assert last["reinit"]["beyond_noise"] and last["random_prune"]["beyond_noise"]
    assert report["control_margins"]["1"]["reinit"] == {
        "points": 0.0,
        "examples": 0,
        "needed_examples": 7,  # 1.96 * sqrt(2 * .98 * .02 / 300) * 300 = 6.7
        "n": 300,
        "beyond_noise": False,
    }
    assert "0" not in report["control_margins"]  # the dense level has no controls

    lines = summary_lines(report)
    assert lines[0] == "winning-ticket levels (pruned levels within 0.01 of the dense level 0's accuracy): 1, 2"
    assert "300-example test split" in lines[1]
    assert lines[2].startswith("  level  2 (25.00% of weights left): reinit +6 (within noise: >= +")
    assert lines[3] == (
        "  level  3 (12.50% of weights left): reinit +24 (beyond noise: >= +15 needed), "
        "random_prune +219 (beyond noise: >= +17 needed)"  # 1.96 * sqrt((.93*.07 + .2*.8) / 300) * 300 = 16.1
    )
    assert len(lines) == 4  # the last two levels only


@pytest.mark.parametrize(
    "right_ticket, right_control, n, examples, needed",
    [
        (290, 280, 300, 10, 11),  # 96.7% vs 93.3%: 1.96 * sqrt((.967*.033 + .933*.067) / 300) * 300 = 10.4 images
        (285, 270, 300, 15, 13),  # 95% vs 90%: 12.6
        (294, 291, 300, 3, 8),  # 98% vs 97%: 7.5
        (29400, 29100, 30000, 300, 75),  # the same gap on 100x the examples is real: 74.9
        (270, 285, 300, -15, 13),  # a control ahead never counts
    ],
)
def test_margin_beyond_noise_is_a_two_proportion_z_test(right_ticket, right_control, n, examples, needed):
    ticket, control = right_ticket / n, right_control / n
    margin = margin_over_control(ticket, control, n)
    z = (ticket - control) / math.sqrt((ticket * (1 - ticket) + control * (1 - control)) / n)
    assert (margin["examples"], margin["needed_examples"], margin["n"]) == (examples, needed, n)
    assert margin["points"] == pytest.approx(100 * examples / n)
    assert margin["beyond_noise"] is (z > 1.96) is (examples >= needed)


def test_margin_without_a_split_size_gives_points_only():
    assert margin_over_control(0.9, 0.8, None) == {"points": pytest.approx(10.0)}
    report = {
        "tolerance": 0.01,
        "winning_ticket_levels": [],
        "scored_by": "best_eval.accuracy",
        "trunk": [{"level": 1, "remaining_weights_pct": 80.0}],
        "control_margins": {"1": {"reinit": margin_over_control(0.9, 0.8, None)}},
    }
    assert summary_lines(report) == [
        "winning-ticket levels (pruned levels within 0.01 of the dense level 0's accuracy): none",
        "ticket minus control at the last levels, in accuracy points (split size not recorded):",
        "  level  1 (80.00% of weights left): reinit +10.00 points",
    ]


def test_aggregate_judges_means_and_excludes_level_0():
    def rows(level_scores, control=False):
        return [
            {
                "level": level,
                "remaining_weights_pct": 100 * 0.5**level,
                "test_at_early_stop": {"accuracy": acc},
                "data": {"splits": {"test": 300}},
                **({"trunk_level": level} if control else {}),
            }
            for level, acc in level_scores
        ]

    reports = [
        {"scored_by": "test_at_early_stop.accuracy", "trunk": rows([(0, 0.97), (1, 0.97), (2, 0.93)]),
         "controls": {"reinit": rows([(1, 0.96), (2, 0.84)], True)}},
        {"scored_by": "test_at_early_stop.accuracy", "trunk": rows([(0, 0.99), (1, 0.97), (2, 0.95)]),
         "controls": {"reinit": rows([(1, 0.98), (2, 0.86)], True)}},
    ]  # fmt: skip
    agg = aggregate_replicates(reports, tolerance=0.01)
    assert agg["dense_accuracy"] == pytest.approx(0.98) and agg["winning_ticket_levels"] == [1]
    margin = agg["control_margins"]["2"]["reinit"]  # means 0.94 vs 0.85
    assert (margin["examples"], margin["needed_examples"], margin["n"]) == (27, 15, 300) and margin["beyond_noise"]
