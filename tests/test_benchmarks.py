"""The benchmark scripts stay runnable: tiny sizes on the CPU (no timing is checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_gpu_path_runs_at_tiny_sizes_on_cpu(tmp_path):
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--check-gpu-path", "--only", "loss"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The tables are printed with every implementation measured, and the smoke run leaves RESULTS.md alone.
    assert "## Targets" in result.stdout and "2, 128, 1000" in result.stdout
    assert "naive" in result.stdout and "cross_entropy" in result.stdout
    assert results.read_text() == before


def test_set_vs_sft_benchmark_runs_every_task_and_budget_at_tiny_sizes(tmp_path):
    """`benchmarks/set_vs_sft.py` end to end at 4 steps: both tasks, both budgets, its table, plot and JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "bench"
    command = [sys.executable, str(ROOT / "benchmarks" / "set_vs_sft.py"), "--quick", "--max_steps", "4", "--eval_rows",
               "4", "--methods", "plain SFT", "set loss", "--workers", "1", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (tmp_path / "bench.md").read_text()
    for heading in ("countries, full budget (4 steps)", "countries, low budget (1 steps)", "hard, full budget"):
        assert heading in table
    assert table.count("| plain SFT |") == 4 and table.count("| set loss |") == 4
    assert (tmp_path / "bench.png").stat().st_size > 0
    import json

    runs = json.loads((tmp_path / "bench.json").read_text())["runs"]
    assert len(runs) == 8  # 2 tasks x 2 budgets x 1 seed x 2 methods
    for run in runs:
        assert 0 <= run["final"]["eval_exact_set_match"] <= 1 and run["final"]["heldout_ce"] > 0
        assert run["job"]["max_steps"] == (4 if run["job"]["budget"] == "full" else 1)
