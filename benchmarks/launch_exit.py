"""Exit codes of repeated `accelerate launch` runs of `trl-qaloss train` on 2 CPU processes (gloo).

A scheduler reads a job's exit code, so a launch that trained and saved correctly must also exit 0. This script runs
each launch line `--runs` times in a row and counts the runs that exited 0, the ones that aborted while exiting
(`terminate called without an active exception`), the ones that failed otherwise and the ones that hung (killed
after `--timeout` seconds). The lines are the ones the tests run, at 2 training steps on the demo model:

    ddp    recipes/accelerate/ddp.yaml, the demo recipe, ACCELERATE_USE_CPU=true
    zero3  recipes/accelerate/zero3-qlora.yaml with the sharded 7B recipe and recipes/README.md's CPU flags

and, to show where the abort comes from, a bare gloo program (one all-reduce, then exit) launched the same way:

    gloo-left    leaves the process group to the interpreter's teardown
    gloo-ended   ends with `trl_qaloss.cli.training.end_processes()` (a barrier, then destroy_process_group), as
                 `trl-qaloss train` does after a successful run

    python benchmarks/launch_exit.py --runs 20            # both lines, 20 launches each (about 25 min on 2 cores)
    python benchmarks/launch_exit.py --lines ddp --runs 3
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXIT_ABORT = "terminate called without an active exception"
STEPS = ["--max_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true", "--eval_generate_samples", "4"]
LINES = {
    "ddp": (
        ["--config_file", "recipes/accelerate/ddp.yaml", "--num_processes", "2"],
        ["--config", "recipes/demo-cpu.yaml", "--per_device_train_batch_size", "4", "--max_length", "96"],
        {"ACCELERATE_USE_CPU": "true"},
    ),
    "zero3": (
        ["--config_file", "recipes/accelerate/zero3-qlora.yaml", "--num_processes", "2", "--mixed_precision", "no"],
        ["--config", "recipes/qwen2.5-7b-instruct-qlora-sharded.yaml", "--bf16", "false", "--ddp_backend", "gloo"]
        + ["--model_name_or_path", "trl_qaloss/demo/model", "--dataset_name", "trl_qaloss/demo/data"],
        {},
    ),
}


BARE_GLOO = """
import sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
value = torch.ones(4)
dist.all_reduce(value)
if sys.argv[1] == "gloo-ended":
    from trl_qaloss.cli.training import end_processes

    end_processes()
print("all-reduce done:", value.tolist())
"""
LINES["gloo-left"] = LINES["gloo-ended"] = (LINES["ddp"][0], [], {"ACCELERATE_USE_CPU": "true"})


def launch(line: str, output_dir: str, timeout: float) -> tuple[str, float, int | None, str]:
    """One launch of `line`: (outcome, seconds, exit code or None when killed, the end of its stderr)."""
    launcher, train, env_extra = LINES[line]
    argv = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--main_process_port", "0"]
    if line.startswith("gloo"):
        program = Path(output_dir, "bare_gloo.py")
        program.write_text(BARE_GLOO)
        argv += [str(program), line]
    else:
        argv += ["-m", "trl_qaloss", "train", *train, *STEPS, "--output_dir", output_dir]
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "TRL_QALOSS_DEBUG")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env_extra)
    start = time.perf_counter()
    # A session of its own, so that a hang is killed with all of the launcher's processes.
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return "hang", time.perf_counter() - start, None, stderr[-2000:]
    seconds = time.perf_counter() - start
    finished = ("all-reduce done" if line.startswith("gloo") else "LoRA adapter saved to") in stdout
    if proc.returncode == 0:
        outcome = "exit 0" if finished else "exit 0, unfinished"
    elif EXIT_ABORT in stderr:
        outcome = "abort at exit" if finished else "abort"
    else:
        outcome = "failed"
    return outcome, seconds, proc.returncode, stderr[-2000:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", nargs="+", choices=sorted(LINES), default=["ddp", "zero3"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a launch counts as hung")
    args = parser.parse_args()
    rows = []
    for line in args.lines:
        outcomes, times = Counter(), []
        for run in range(args.runs):
            with tempfile.TemporaryDirectory() as output_dir:
                outcome, seconds, code, tail = launch(line, output_dir, args.timeout)
            outcomes[outcome] += 1
            times.append(seconds)
            print(f"{line} run {run + 1}/{args.runs}: {outcome} (exit code {code}) in {seconds:.0f} s", flush=True)
            if outcome != "exit 0":
                print("  " + "\n  ".join(tail.splitlines()[-8:]), flush=True)
        rows.append((line, outcomes, times))
    print("\n| line | launches | exit 0 | other outcomes | seconds per launch (min-max) |")
    print("|---|---|---|---|---|")
    for line, outcomes, times in rows:
        other = ", ".join(f"{k}: {v}" for k, v in outcomes.items() if k != "exit 0") or "none"
        print(f"| {line} | {len(times)} | {outcomes['exit 0']} | {other} | {min(times):.0f}-{max(times):.0f} |")
    if any(set(outcomes) != {"exit 0"} for _, outcomes, _ in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
