"""Scaling: gradient accumulation and two processes give the gradients of one big batch, for each loss term.

The set term is normalized like the CE term (see `QALossSFTTrainer`): by the target answer tokens of the whole
accumulation window and of all processes, so the split of a global batch does not change the step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed_worker import SETTINGS, train_one_step
from tests.testing_utils import slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    """Loss and gradients of each setting on the global batch in one process, without accumulation."""
    out = tmp_path_factory.mktemp("one_batch")
    return {name: train_one_step(out / name, **overrides)[:2] for name, overrides in SETTINGS.items()}


def assert_same_step(loss, grads, expected_loss, expected_grads):
    assert loss == pytest.approx(expected_loss, rel=1e-4)
    assert grads.keys() == expected_grads.keys()
    assert any(g.abs().sum() > 0 for g in expected_grads.values())
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_gradient_accumulation_gives_the_big_batch_gradients(tmp_path, one_batch, name):
    """`set_*`: the set term alone; `both_mean` minus `set_mean` is the CE term, so it matches as well."""
    loss, grads, _ = train_one_step(tmp_path, accumulation=4, **SETTINGS[name])
    assert_same_step(loss, grads, *one_batch[name])


@slow
def test_two_processes_give_the_one_process_gradients(tmp_path, one_batch):
    """`accelerate launch --num_processes 2` on CPU (gloo), each process accumulating 2 micro-batches."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(ROOT / "tests" / "distributed_worker.py"),
        str(tmp_path),
        "2",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    two = torch.load(tmp_path / "results.pt")
    for name in SETTINGS:
        assert_same_step(two[name]["loss"], two[name]["grads"], *one_batch[name])
    # The logged set loss with "sum": each micro-batch logs the mean of the processes' sums, so 2 processes of 2
    # micro-batches of 2 rows log what 1 process of 4 micro-batches of 2 rows logs (their total would log twice it).
    _, _, accumulated = train_one_step(tmp_path / "acc4", accumulation=4, **SETTINGS["set_sum"])
    assert two["set_sum"]["set_loss"] == pytest.approx(accumulated.state.log_history[0]["set_loss"], rel=1e-5)
