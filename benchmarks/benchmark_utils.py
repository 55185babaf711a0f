"""What the speed benchmarks share: timing, memory peaks, stage shares, batches and models, and the report.

The benchmark scripts run as `python benchmarks/<script>.py` from anywhere: Python puts `benchmarks/` first on the
import path, so they import this module as `benchmark_utils`, and this module puts the repository root on the path
once, for `trl_qaloss` without installing. The tiny models, tokenizer and configs they measure are the package's
offline components (`trl_qaloss.testing_utils`), built on the spot without the model hub; the benchmarks import
nothing from `tests/`.

Extra peak memory (`peak_extra_bytes`): on CUDA, `torch.cuda.max_memory_allocated` over the allocated memory before
the call; on the CPU, the peak of the running sum of the allocations and frees that torch's profiler records during
the call (`profile_memory=True`; tracemalloc does not see torch's allocations). Times are medians.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Everything measured is built on the spot: no model hub lookups, no experiment trackers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

from trl_qaloss import QASeparators  # noqa: E402
from trl_qaloss.testing_utils import (  # noqa: E402
    build_tokenizer,
    config_values,
    nf4_quantization,
    qa_text,
    random_llama,
    tiny_llama,
)

__all__ = ["ROOT", "build_tokenizer", "config_values", "nf4_quantization", "tiny_llama"]  # re-exported for the scripts

QA, ANSWER, QEND, EOS = 1, 2, 3, 0
MIB = 1 << 20
SKIPPED_NOTE = (
    " `skipped: slow`: the naive backward builds a full-size gradient per pair (`--naive-backward-max-mib`); "
    "`skipped: memory`: the size needs more than `--memory-budget-gib`."
)
STAGES = {
    "qaloss.vocab_stats": "argmax/lse pass",
    "qaloss.parse": "parsing",
    "qaloss.iou": "IoU",
    "qaloss.assignment": "assignment",
    "qaloss.pair_ce": "pair CE",
    "qaloss.log_probs_backward": "pair CE backward",
}


# ---------------------------------------------------------------------------------------------- measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of `repeats` calls, in seconds."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Peak memory that `fn()` allocates over what was allocated before it; None if not measurable.

    CUDA: `torch.cuda.max_memory_allocated` over `memory_allocated` before the call. CPU: the running sum of the
    allocations and frees that torch's profiler records (`profile_memory=True`), in time order; its maximum is the
    peak of torch's own CPU allocations during the call (tracemalloc does not see them, and the resident set of a
    process on a shared machine also moves with the file pages the kernel evicts).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:
        return None
    deltas = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    peak = total = 0
    for _, delta in deltas:
        total += delta
        peak = max(peak, total)
    return peak


def stage_shares(fn) -> dict[str, float]:
    """Share of the wall time of one `fn()` spent under each `qaloss.*` label, and the rest as "other"."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        total_us = (time.perf_counter() - start) * 1e6
    shares = {name: 0.0 for name in STAGES.values()}
    for event in prof.key_averages():
        if event.key in STAGES:
            shares[STAGES[event.key]] += event.cpu_time_total / total_us
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


# ---------------------------------------------------------------------------------------------- data and models


def completion(rng: random.Random, vocab: int, length: int) -> tuple[list[int], list[int]]:
    """Target ids and predicted ids of one completion, cut to `length`."""
    target, predicted = [], []
    while len(target) < length:
        question = [QA] + [rng.randrange(10, vocab) for _ in range(rng.randint(3, 8))] + [QEND]
        answers = [
            [ANSWER] + [rng.randrange(10, vocab) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(2, 6))
        ]
        shuffled = rng.sample(answers, len(answers))
        target += question + [t for a in answers for t in a]
        predicted += question + [t for a in shuffled for t in a]
    predicted = [rng.randrange(10, vocab) if rng.random() < 0.1 else t for t in predicted]
    return target[:length], predicted[:length]


def make_batch(batch: int, length: int, vocab: int, dtype=torch.float32, device="cpu", seed: int = 0):
    """Logits `[B, T, V]`, labels `[B, T]` and separators of a batch of realistic rows."""
    rng = random.Random(seed)
    labels = torch.full((batch, length), -100)
    generator = torch.Generator(device).manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=generator, device=device, dtype=dtype)
    for b in range(batch):
        prompt = rng.randint(16, length // 4)
        target, predicted = completion(rng, vocab, length - prompt)
        labels[b, prompt:] = torch.tensor(target)
        rows = torch.arange(prompt - 1, length - 1, device=device)
        logits[b, rows, torch.tensor(predicted[: rows.numel()], device=device)] = 12.0
    seps = QASeparators(QA, ANSWER, frozenset({QEND}), frozenset({EOS}), vocab)
    return logits, labels.to(device), seps


def qa_rows(num_rows: int, max_length: int, seed: int = 0):
    """Prompt/completion rows whose completions fill about `max_length` tokens of `build_tokenizer()`."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [
        {"prompt": f"context {rng.randint(0, 999)}:", "completion": " " + qa_text(rng, max(1, max_length // 18))}
        for _ in range(num_rows)
    ]
    return Dataset.from_list(rows)


def small_llama():
    """A small Llama with random weights: hidden 256, 4 layers, V=32000."""
    return random_llama(
        32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )


# ---------------------------------------------------------------------------------------------- command line


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The device and thread flags every benchmark script takes."""
    parser.add_argument("--gpu", action="store_true", help="run the CUDA benchmarks (B=8, T=2048, bf16; 8B step)")
    parser.add_argument("--check-gpu-path", action="store_true", help="the --gpu code path at tiny sizes, on CPU")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine, multi-threaded small ops mostly wait on each other)",
    )


def parse_benchmark_args(
    description: str, *add_arguments: Callable[[argparse.ArgumentParser], None]
) -> tuple[argparse.Namespace, torch.device]:
    """The command line of a benchmark script: the common flags, then each of `add_arguments`' flags. Sets the torch
    threads and returns the arguments and the device that `--gpu` asks for (CUDA), else the CPU."""
    parser = argparse.ArgumentParser(description=description)
    add_common_arguments(parser)
    for add in add_arguments:
        add(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device; torch sees none.")
    return args, torch.device("cuda" if args.gpu else "cpu")


# ---------------------------------------------------------------------------------------------- report


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "skipped: slow"
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def fmt_mem(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def report(
    device: torch.device, started: float, sections: list[str], target_lines: list[str], loss_notes: bool = True
) -> str:
    """The Markdown report: the command, date and machine, the sections' tables, then the targets against the
    figures measured (`target_lines`: rows of the targets table). `loss_notes`: say what the loss table's
    `skipped` cells mean."""
    command = f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])
    lines = [
        f"# Benchmark results ({'CUDA' if device.type == 'cuda' else 'CPU'})",
        "",
        f"`{command.strip()}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine(device)}; "
        f"{time.perf_counter() - started:.0f} s in all.",
        "",
        "Ratios are taken within one run, on a machine shared with other jobs: absolute times vary from run to run."
        + SKIPPED_NOTE * loss_notes,
        "",
        *sections,
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *target_lines,
        "",
    ]
    return "\n".join(lines)
