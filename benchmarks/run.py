"""Benchmarks of the set loss and of the training step: prints Markdown tables and writes benchmarks/RESULTS.md.

    python benchmarks/run.py                   # CPU: loss at several sizes and the tiny-model training step
    python benchmarks/run.py --gpu             # CUDA: loss at B=8, T=2048, bf16; step of a Llama-3.1-8B config, 4-bit
    python benchmarks/run.py --check-gpu-path  # the --gpu code path at tiny sizes on the CPU (a smoke run)

Runs the two benchmarks, each also runnable alone (printing its tables only):

1. `benchmarks/loss_speed.py`: the loss alone, `set_matching_loss` (vectorized) against the naive reference and
   `F.cross_entropy` on the same logits and labels, forward and forward + backward, with the time share of each stage.
2. `benchmarks/step_speed.py`: the training step (forward, loss, backward: `Trainer.training_step`) of
   `QALossSFTTrainer` against plain `SFTTrainer`, on the same model and batch.

Their shared timing, memory and report helpers live in `benchmarks/benchmark_utils.py`. Times are medians; ratios
are taken within one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import loss_speed
import step_speed
from benchmark_utils import ROOT, parse_benchmark_args, report


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of this driver: which part runs, and where the tables go."""
    parser.add_argument("--only", choices=["loss", "step"], help="run one of the two parts")
    parser.add_argument(
        "--output",
        type=Path,
        help="where the tables go (default: benchmarks/RESULTS.md; with --check-gpu-path, nowhere unless given)",
    )
    parser.add_argument("--append", action="store_true", help="append the tables to --output instead of replacing it")


def main() -> None:
    args, device = parse_benchmark_args(
        __doc__.splitlines()[0], add_run_arguments, loss_speed.add_arguments, step_speed.add_arguments
    )

    started = time.perf_counter()
    loss_rows = loss_speed.run_loss_benchmarks(args, device, started) if args.only in (None, "loss") else []
    step_rows = step_speed.run_step_benchmarks(args, device) if args.only in (None, "step") else []
    sections = loss_speed.loss_section(loss_rows, args) + step_speed.step_section(step_rows, args)
    target_lines = loss_speed.loss_targets(loss_rows, loss_speed.loss_sizes(args)[-1])
    text = report(device, started, sections, target_lines + step_speed.step_targets(step_rows))
    print(text)
    if args.output is None and args.check_gpu_path:
        return
    output = args.output or ROOT / "benchmarks" / "RESULTS.md"
    if args.append and output.exists():
        text = output.read_text() + "\n---\n\n" + text
    output.write_text(text)


if __name__ == "__main__":
    main()
