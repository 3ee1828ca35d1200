"""benchmarks/pruning_at_init.py with --methods imp: the per-level rate lands on the targets, each target gets the
nearest level, the summary table mixes files and names IMP's levels, and a tiny IMP run end to end (5 s)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "pruning_at_init.py")


def _benchmark():
    spec = importlib.util.spec_from_file_location("pruning_at_init_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imp_rate_lands_exactly_on_the_least_sparse_target():
    bench = _benchmark()
    fraction = bench.imp_prune_fraction([0.98, 0.95])
    assert fraction == pytest.approx(1 - 0.05 ** (1 / 13))
    levels = bench.imp_levels([0.95, 0.98], fraction)
    assert levels == {0.95: 13, 0.98: 17}
    assert 1 - (1 - fraction) ** 13 == pytest.approx(0.95, abs=1e-12)
    assert 1 - (1 - fraction) ** 17 == pytest.approx(0.98, abs=2e-4)
    assert bench.imp_prune_fraction([0.2, 0.36]) == pytest.approx(0.2)
    assert bench.imp_levels([0.2, 0.36], 0.2) == {0.2: 1, 0.36: 2}


def test_summarize_mixes_files_and_names_the_imp_level(tmp_path):
    bench = _benchmark()

    def row(method, target, seed, acc, **extra):
        return dict(method=method, target_sparsity=target, seed=seed, sparsity=target, **extra,
                    test_accuracy_early_stop=acc, test_accuracy_final=acc - 0.01)  # fmt: skip

    (tmp_path / "a.json").write_text(json.dumps([row("snip", 0.95, s, 0.96) for s in (0, 1)]))
    (tmp_path / "b.json").write_text(json.dumps([row("imp", 0.95, s, 0.97 + s / 100, level=13) for s in (0, 1)]))
    lines = bench.summarize(str(tmp_path / "a.json"), str(tmp_path / "b.json")).splitlines()
    assert lines[2] == "| 95% | imp (level 13) | 2 | 95.00% | 97.50 ± 0.71 | 96.50 ± 0.71 | 97.00, 98.00 |"
    assert lines[3] == "| 95% | snip | 2 | 95.00% | 96.00 ± 0.00 | 95.00 ± 0.00 | 96.00, 96.00 |"


def test_imp_rows_from_a_tiny_run(tmp_path):
    """Two levels of 20 steps on MNIST per seed (lockstep): a dense row and one row per target, from its level."""
    bench = _benchmark()
    out = tmp_path / "imp.json"
    argv = ["--methods", "imp", "--sparsities", "0.2", "0.36", "--seeds", "0", "--steps", "20", "--eval-steps", "10"]
    rows = bench.main([*argv, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    assert [(r["method"], r["target_sparsity"], r["level"]) for r in rows] == [
        ("dense", 0.0, 0),
        ("imp", 0.2, 1),
        ("imp", 0.36, 2),
    ]
    for r in rows:
        assert r["sparsity"] == pytest.approx(r["target_sparsity"], abs=1e-5)
        assert set(r["layer_sparsity"]) == {"hidden.0.weight", "hidden.1.weight", "classifier.weight"}
        assert r["early_stop_step"] in (10, 20) and 0 < r["test_accuracy_early_stop"] <= 1
        assert "sparsity.prune_fraction=0.200000" in r["overrides"] and "backend=lockstep" in r["overrides"]
