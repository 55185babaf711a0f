"""Benchmarks of the set loss and of the training step: prints Markdown tables and writes benchmarks/RESULTS.md.

    python benchmarks/run.py                 # CPU: loss at several sizes and the tiny-model training step
    python benchmarks/run.py --gpu           # CUDA: loss at B=8, T=2048, bf16; step of a Llama-3.1-8B config, 4-bit
    python benchmarks/run.py --check-gpu-path  # the --gpu code path at tiny sizes on the CPU (a smoke run)

1. Loss alone, on the same logits and labels: `set_matching_loss` (vectorized), `set_matching_loss_reference` (the
   plain per-row loops) and one `F.cross_entropy` over the same logits (Hugging Face's causal-LM loss: every row of
   `logits.view(-1, V)`, labels shifted by padding, so no copy of the logits before it), forward and forward +
   backward. Rows hold realistic completions (a masked prompt, then items of 2-6 answers); the logits' argmax spells
   the target with its answers shuffled inside each item and 10% of tokens replaced, so most pairs are matched and
   some are not. The time share of each stage comes from the `qaloss.*` profiler labels of one profiled call (host
   time: on CUDA, a stage's kernels are counted in the first later stage that waits for them). "argmax pass alone"
   is one max/argmax pass over the labelled rows: the floor of any forward, naive or vectorized.
2. Training step (forward, loss, backward: `Trainer.training_step`) of `QALossSFTTrainer` against plain
   `SFTTrainer`, on the same model and batch.

Extra peak memory: on CUDA, `torch.cuda.max_memory_allocated` over the allocated memory before the call; on the CPU,
the peak of the running sum of the allocations and frees that torch's profiler records during the call
(`profile_memory=True`; tracemalloc does not see torch's allocations). For forward + backward, the logits' gradient (the
size of the logits, the same for every loss) is subtracted. Times are medians; ratios are taken within one run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # trl_qaloss and the tests' offline fixtures, without installing

from tests.testing_utils import build_tokenizer, config_values, qa_text, tiny_llama  # noqa: E402
from trl_qaloss import QASeparators, set_matching_loss  # noqa: E402
from trl_qaloss.logprobs import rows_view, vocab_stats  # noqa: E402
from trl_qaloss.reference import set_matching_loss_reference  # noqa: E402

QA, ANSWER, QEND, EOS = 1, 2, 3, 0
MIB = 1 << 20
CPU_SIZES = [(b, t, v) for b in (4, 16) for t in (256, 1024) for v in (32000, 151936)] + [(16, 512, 32000)]
GPU_SIZES = [(8, 2048, 128256), (8, 2048, 151936)]
STAGES = {
    "qaloss.vocab_stats": "argmax/lse pass",
    "qaloss.parse": "parsing",
    "qaloss.iou": "IoU",
    "qaloss.assignment": "assignment",
    "qaloss.pair_ce": "pair CE",
    "qaloss.log_probs_backward": "pair CE backward",
}
# Llama-3.1-8B's config.json (the architecture only: the weights are random, no hub access is needed).
LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)


# ---------------------------------------------------------------------------------------------------------- data


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


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference point: Hugging Face's causal-LM loss, one `F.cross_entropy` over every row of the logits."""
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(rows_view(logits).float(), shifted.reshape(-1), ignore_index=-100)


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


# ---------------------------------------------------------------------------------------------- loss benchmark


def bench_loss(size, dtype, device, args) -> list[dict]:
    """One row per mode (forward, forward + backward) for the three losses at `size` = (B, T, V)."""
    batch, length, vocab = size
    logits_bytes = batch * length * vocab * torch.empty(0, dtype=dtype).element_size()
    # The cross-entropy's log-softmax is a full copy (float32), and the backward adds the gradient.
    float_bytes = batch * length * vocab * 4
    needed = {"forward": logits_bytes + float_bytes, "forward+backward": 2 * logits_bytes + 2 * float_bytes}
    base = {"B": batch, "T": length, "V": vocab, "logits_mib": logits_bytes / MIB}
    if device.type == "cpu" and needed["forward"] > args.memory_budget_gib * (1 << 30):
        return [dict(base, mode=mode, skipped="memory") for mode in needed]
    logits, labels, seps = make_batch(batch, length, vocab, dtype, device)
    losses = {
        "vectorized": lambda: set_matching_loss(logits, labels, seps).loss,
        "naive": lambda: set_matching_loss_reference(logits, labels, seps).loss,
        "cross_entropy": lambda: cross_entropy(logits, labels),
    }
    rows = []
    for mode, backward in (("forward", False), ("forward+backward", True)):
        row = dict(base, mode=mode)
        rows.append(row)
        if device.type == "cpu" and needed[mode] > args.memory_budget_gib * (1 << 30):
            row["skipped"] = "memory"
            continue
        logits.requires_grad_(backward)
        grad_bytes = logits_bytes if backward else 0
        for name, loss_fn in losses.items():

            def call(loss_fn=loss_fn, backward=backward):
                logits.grad = None
                loss = loss_fn()
                if backward:
                    loss.backward()

            if name == "naive" and backward and logits_bytes > args.naive_backward_max_mib * MIB:
                row[name] = None  # its backward builds a full-size gradient per pair: minutes at this size
                continue
            if name == "naive" and backward:  # one timed call (minutes at the larger sizes), then the measured one
                start = time.perf_counter()
                call()
                row[name], row[f"{name}_repeats"] = time.perf_counter() - start, 1
                logits.grad = None  # freed before the measured call, not during it
                extra = peak_extra_bytes(call, device) if logits_bytes <= 200 * MIB else None
            else:
                call()  # warm-up
                logits.grad = None
                extra = peak_extra_bytes(call, device)
                repeats = args.repeats_backward if backward else args.repeats
                row[name], row[f"{name}_repeats"] = timed(call, repeats, device), repeats
            row[f"{name}_mem"] = None if extra is None else max(0, extra - grad_bytes) / logits_bytes

        def vectorized_call(backward=backward):
            logits.grad = None
            loss = set_matching_loss(logits, labels, seps).loss
            if backward:
                loss.backward()

        row["stages"] = stage_shares(vectorized_call)
        if not backward:
            # The floor of any forward, naive or not: one max/argmax pass over the labelled rows (the predictions).
            valid = (labels[:, 1:] != -100).nonzero(as_tuple=True)
            rows_read = valid[0] * length + valid[1]
            argmax_pass = lambda rows_read=rows_read: vocab_stats(logits, rows_read, with_lse=False)  # noqa: E731
            row["argmax_pass"] = timed(argmax_pass, args.repeats, device)
        logits.grad = None
    row["stats"] = set_matching_loss(logits.detach(), labels, seps).stats
    return rows


# ------------------------------------------------------------------------------------------ trainer benchmark


def qa_rows(num_rows: int, max_length: int, seed: int = 0):
    """Prompt/completion rows whose completions fill about `max_length` tokens of the tests' tokenizer."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [
        {"prompt": f"context {rng.randint(0, 999)}:", "completion": " " + qa_text(rng, max(1, max_length // 18))}
        for _ in range(num_rows)
    ]
    return Dataset.from_list(rows)


def bench_step(name: str, load_model, tokenizer, args_values: dict, peft_config, device, repeats: int) -> list[dict]:
    """Step time and extra peak memory of `training_step` for plain SFTTrainer and QALossSFTTrainer on one batch."""
    from trl import SFTConfig, SFTTrainer

    from trl_qaloss import QALossConfig, QALossSFTTrainer

    dataset = qa_rows(4 * args_values["per_device_train_batch_size"], args_values["max_length"])
    rows, batch = [], None
    for label, trainer_cls, config_cls in (
        ("SFTTrainer", SFTTrainer, SFTConfig),
        ("QALossSFTTrainer", QALossSFTTrainer, QALossConfig),
    ):
        with tempfile.TemporaryDirectory() as out:
            trainer = trainer_cls(
                model=load_model(),
                args=config_cls(**dict(args_values, output_dir=out)),
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=copy.deepcopy(peft_config),
            )
            if batch is None:  # the same batch for both
                batch = next(iter(trainer.get_train_dataloader()))
                batch = {k: v.to(trainer.args.device) for k, v in batch.items()}
            num_items = (batch["labels"][:, 1:] != -100).sum()

            def step(trainer=trainer, batch=batch, num_items=num_items):
                trainer.training_step(trainer.model, dict(batch), num_items_in_batch=num_items)

            step()  # warm-up: allocates the parameters' gradients, which then stay
            extra = peak_extra_bytes(step, device)
            seconds = timed(step, repeats, device)
            shares = stage_shares(step)
            rows.append(
                dict(
                    model=name,
                    trainer=label,
                    shape=tuple(batch["input_ids"].shape),
                    time=seconds,
                    mem=extra,
                    loss_share=sum(v for k, v in shares.items() if k != "other"),
                    set_share=sum(shares[k] for k in ("parsing", "IoU", "assignment")),
                )
            )
            del trainer, step
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def small_llama():
    """A small Llama with random weights: hidden 256, 4 layers, V=32000."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=1,
        eos_token_id=2,
        bos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(config)


def cpu_step_benchmarks(args) -> list[dict]:
    tokenizer = build_tokenizer()
    values = config_values(
        "unused", per_device_train_batch_size=8, max_length=256, bf16=False, logging_steps=1000, max_steps=1
    )
    rows = bench_step(
        "tiny Llama (tests: hidden 32, 2 layers, V=600)",
        lambda: tiny_llama(len(tokenizer)),
        tokenizer,
        values,
        None,
        torch.device("cpu"),
        args.step_repeats,
    )

    return rows + bench_step(
        "small Llama (hidden 256, 4 layers, V=32000)",
        small_llama,
        tokenizer,
        values,
        None,
        torch.device("cpu"),
        args.step_repeats,
    )


def quantized_step_benchmarks(args, device: torch.device, model_config: dict, batch: int, length: int) -> list[dict]:
    """The step of a model built from `model_config` with random weights, loaded in 4-bit nf4, trained with LoRA."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, LlamaConfig

    from benchmarks.random_4bit import load_random_4bit

    tokenizer = build_tokenizer()
    compute_dtype = torch.bfloat16
    config = LlamaConfig(**model_config, pad_token_id=1, eos_token_id=2, bos_token_id=None)
    config.architectures = ["LlamaForCausalLM"]
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )

    def load():
        # Random weights drawn and quantized one at a time on the device: no 16 GB bf16 checkpoint is written.
        return load_random_4bit(config, quantization, device, dtype=compute_dtype)[0]

    values = config_values(
        "unused",
        per_device_train_batch_size=batch,
        max_length=length,
        bf16=True,
        logging_steps=1000,
        max_steps=1,
        use_cpu=device.type == "cpu",
        activation_checkpointing=True,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    name = f"Llama {model_config['hidden_size']}x{model_config['num_hidden_layers']}, 4-bit nf4 + LoRA r=16"
    return bench_step(name, load, tokenizer, values, peft_config, device, args.step_repeats)


# -------------------------------------------------------------------------------------------------- report


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "skipped: slow"
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def fmt_mem(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def loss_tables(rows: list[dict]) -> list[str]:
    lines = [
        "| B | T | V | mode | `set_matching_loss` | reference (naive) | `F.cross_entropy` | naive / vectorized "
        "| vectorized / CE | argmax pass alone | extra peak memory, % of logits: vectorized / naive / CE |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        head = f"| {r['B']} | {r['T']} | {r['V']} | {r['mode']} "
        if "skipped" in r:
            lines.append(head + f"| skipped: {r['skipped']} | | | | | | |")
            continue
        vec, naive, ce = r["vectorized"], r["naive"], r["cross_entropy"]
        speedup = f"{naive / vec:.1f}x" if naive is not None else "n/a"
        mems = " / ".join(fmt_mem(r.get(f"{n}_mem")) for n in ("vectorized", "naive", "cross_entropy"))
        naive_text = fmt_time(naive) + (" (1 run)" if naive is not None and r.get("naive_repeats") == 1 else "")
        lines.append(
            head + f"| {fmt_time(vec)} | {naive_text} | {fmt_time(ce)} | {speedup} | {vec / ce:.2f}x "
            f"| {fmt_time(r['argmax_pass']) if 'argmax_pass' in r else ''} | {mems} |"
        )
    lines += ["", "Share of the vectorized loss's time per stage (one profiled call):", ""]
    names = [*STAGES.values(), "other"]
    lines += ["| B | T | V | mode | " + " | ".join(names) + " |", "|---:|---:|---:|---|" + "---:|" * len(names)]
    for r in rows:
        if "stages" in r:
            shares = " | ".join(f"{100 * r['stages'][n]:.0f}%" for n in names)
            lines.append(f"| {r['B']} | {r['T']} | {r['V']} | {r['mode']} | {shares} |")
    return lines


def step_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | batch [B, T] | trainer | step time | extra peak memory | time ratio | memory ratio "
        "| `qaloss.*` stages, % of step (of which parsing, IoU, assignment) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for plain, ours in zip(rows[::2], rows[1::2], strict=True):
        for r in (plain, ours):
            mem = "n/a" if r["mem"] is None else f"{r['mem'] / MIB:.1f} MiB"
            ratios = "| | |"
            if r is ours:
                mem_ratio = "n/a" if None in (r["mem"], plain["mem"]) else f"{r['mem'] / max(plain['mem'], 1):.2f}"
                ratios = f"| {r['time'] / plain['time']:.2f} | {mem_ratio} "
                ratios += f"| {100 * r['loss_share']:.0f}% ({100 * r['set_share']:.0f}%) |"
            shape = list(r["shape"])
            lines.append(f"| {r['model']} | {shape} | {r['trainer']} | {r['time'] * 1e3:.0f} ms | {mem} {ratios}")
    return lines


def targets(loss_rows: list[dict], step_rows: list[dict], fixed: tuple[int, int, int]) -> list[str]:
    """Each speed and memory target next to the figure measured in this run."""
    lines = ["| target | measured | met |", "|---|---|---|"]

    def find(size, mode):
        return next((r for r in loss_rows if (r["B"], r["T"], r["V"]) == size and r["mode"] == mode), None)

    for mode in ("forward", "forward+backward"):
        r = find(fixed, mode)
        if r and "skipped" not in r and r["naive"] is not None:
            speedup = r["naive"] / r["vectorized"]
            lines.append(
                f"| vectorized >= 50x faster than naive, B,T,V={fixed}, {mode} | {speedup:.1f}x | "
                f"{'yes' if speedup >= 50 else 'no'} |"
            )
    long_rows = [r for r in loss_rows if r["T"] >= 1024 and "skipped" not in r]
    for r in long_rows:
        ratio = r["vectorized"] / r["cross_entropy"]
        lines.append(
            f"| set loss <= 1.5x `F.cross_entropy`, B,T,V=({r['B']}, {r['T']}, {r['V']}), {r['mode']} | "
            f"{ratio:.2f}x | {'yes' if ratio <= 1.5 else 'no'} |"
        )
    measured = [r for r in loss_rows if r.get("vectorized_mem") is not None]
    if measured:
        worst = max(measured, key=lambda r: r["vectorized_mem"])
        lines.append(
            f"| extra peak memory <= 10% of the logits (worst size/mode: ({worst['B']}, {worst['T']}, {worst['V']}), "
            f"{worst['mode']}) | {fmt_mem(worst['vectorized_mem'])} | "
            f"{'yes' if worst['vectorized_mem'] <= 0.10 else 'no'} |"
        )
    for plain, ours in zip(step_rows[::2], step_rows[1::2], strict=True):
        limit = 0.05 if "4-bit" in ours["model"] else 0.15
        time_over = ours["time"] / plain["time"] - 1
        lines.append(
            f"| step time overhead <= {limit:.0%}, {ours['model']} | {time_over:+.0%} | "
            f"{'yes' if time_over <= limit else 'no'} |"
        )
        if None not in (ours["mem"], plain["mem"]):
            mem_over = ours["mem"] / max(plain["mem"], 1) - 1
            lines.append(
                f"| step peak memory overhead <= {limit:.0%}, {ours['model']} | {mem_over:+.0%} | "
                f"{'yes' if mem_over <= limit else 'no'} |"
            )
    return lines


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="run the CUDA benchmarks (B=8, T=2048, bf16; 8B step)")
    parser.add_argument("--check-gpu-path", action="store_true", help="the --gpu code path at tiny sizes, on CPU")
    parser.add_argument("--only", choices=["loss", "step"], help="run one of the two parts")
    parser.add_argument("--size", type=int, nargs=3, action="append", metavar=("B", "T", "V"), help="loss sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward calls per loss")
    parser.add_argument("--repeats-backward", type=int, default=3, help="timed forward+backward calls per loss")
    parser.add_argument("--step-repeats", type=int, default=3, help="timed training steps per trainer")
    parser.add_argument("--memory-budget-gib", type=float, default=6.0, help="CPU sizes needing more are skipped")
    parser.add_argument(
        "--naive-backward-max-mib",
        type=float,
        default=None,
        help="largest logits (MiB) at which the naive backward runs (default: 200 on CPU, no limit on CUDA)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine, multi-threaded small ops mostly wait on each other)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="where the tables go (default: benchmarks/RESULTS.md; with --check-gpu-path, nowhere unless given)",
    )
    parser.add_argument("--append", action="store_true", help="append the tables to --output instead of replacing it")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    gpu = args.gpu or args.check_gpu_path
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device; torch sees none.")
    if args.naive_backward_max_mib is None:
        args.naive_backward_max_mib = float("inf") if device.type == "cuda" else 200.0
    dtype = torch.bfloat16 if gpu else torch.float32
    sizes = GPU_SIZES if args.gpu else [(2, 128, 1000)] if args.check_gpu_path else CPU_SIZES
    sizes = [tuple(size) for size in args.size] if args.size else sizes
    fixed = sizes[-1]

    started = time.perf_counter()
    loss_rows, step_rows = [], []
    if args.only in (None, "loss"):
        for size in sizes:
            loss_rows += bench_loss(size, dtype, device, args)
            print(f"loss {size} done at {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.only in (None, "step"):
        if args.gpu:
            step_rows = quantized_step_benchmarks(args, device, LLAMA_8B, batch=4, length=1024)
        elif args.check_gpu_path:
            tiny = dict(
                LLAMA_8B,
                vocab_size=1000,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
            step_rows = quantized_step_benchmarks(args, device, tiny, batch=2, length=128)
        else:
            step_rows = cpu_step_benchmarks(args)

    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    lines = [
        f"# Benchmark results ({'CUDA' if args.gpu else 'CPU'})",
        "",
        f"`{command.strip()}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine(device)}; "
        f"{time.perf_counter() - started:.0f} s in all.",
        "",
        "Ratios are taken within one run, on a machine shared with other jobs: absolute times vary from run to run. "
        "`skipped: slow`: the naive backward builds a full-size gradient per pair (`--naive-backward-max-mib`); "
        "`skipped: memory`: the size needs more than `--memory-budget-gib`.",
        "",
    ]
    if loss_rows:
        lines += [
            f"## Loss alone ({str(dtype).replace('torch.', '')} logits; medians of {args.repeats} forward and "
            f"{args.repeats_backward} forward+backward calls)",
            "",
        ]
        lines += loss_tables(loss_rows)
        stats = next((r["stats"] for r in loss_rows if (r["B"], r["T"], r["V"]) == fixed and "stats" in r), None)
        if stats:
            lines += ["", f"Batch statistics at {fixed}: " + ", ".join(f"{k} {v:g}" for k, v in stats.items())]
        lines.append("")
    if step_rows:
        lines += [f"## Training step (`training_step`: forward, loss, backward; median of {args.step_repeats})", ""]
        lines += step_table(step_rows) + [""]
    lines += ["## Targets", ""] + targets(loss_rows, step_rows, fixed) + [""]
    text = "\n".join(lines)
    print(text)
    if args.output is None and args.check_gpu_path:
        return
    args.output = args.output or ROOT / "benchmarks" / "RESULTS.md"
    if args.append and args.output.exists():
        text = args.output.read_text() + "\n---\n\n" + text
    args.output.write_text(text)


if __name__ == "__main__":
    main()
