"""Speed and extra peak memory of the set loss alone, against the naive reference and `F.cross_entropy`.

    python benchmarks/loss_speed.py                   # CPU, float32 logits at several sizes
    python benchmarks/loss_speed.py --gpu             # CUDA, bf16 logits at B=8, T=2048, V=128256 and 151936
    python benchmarks/loss_speed.py --check-gpu-path  # the --gpu code path at a tiny size on the CPU (a smoke run)
    python benchmarks/loss_speed.py --size 16 512 32000 --naive-backward-max-mib 2000

On the same logits and labels: `set_matching_loss` (vectorized), `set_matching_loss_reference` (the plain per-row
loops) and one `F.cross_entropy` over the same logits (Hugging Face's causal-LM loss: every row of
`logits.view(-1, V)`, labels shifted by padding, so no copy of the logits before it), forward and forward + backward.
Rows hold realistic completions (a masked prompt, then items of 2-6 answers); the logits' argmax spells the target
with its answers shuffled inside each item and 10% of tokens replaced, so most pairs are matched and some are not.
The time share of each stage comes from the `qaloss.*` profiler labels of one profiled call (host time: on CUDA, a
stage's kernels are counted in the first later stage that waits for them). "argmax pass alone" is one max/argmax
pass over the labelled rows: the floor of any forward, naive or vectorized. Extra peak memory: see
`benchmark_utils.peak_extra_bytes`; for forward + backward, the logits' gradient (the size of the logits, the same
for every loss) is subtracted. Prints the tables; `benchmarks/run.py` runs this and the training step together.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from benchmark_utils import (
    MIB,
    STAGES,
    fmt_mem,
    fmt_time,
    make_batch,
    parse_benchmark_args,
    peak_extra_bytes,
    report,
    stage_shares,
    timed,
)

from trl_qaloss import set_matching_loss
from trl_qaloss.engine.logprobs import rows_view, vocab_stats
from trl_qaloss.engine.reference import set_matching_loss_reference

CPU_SIZES = [(b, t, v) for b in (4, 16) for t in (256, 1024) for v in (32000, 151936)] + [(16, 512, 32000)]
GPU_SIZES = [(8, 2048, 128256), (8, 2048, 151936)]
CHECK_GPU_PATH_SIZES = [(2, 128, 1000)]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference point: Hugging Face's causal-LM loss, one `F.cross_entropy` over every row of the logits."""
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(rows_view(logits).float(), shifted.reshape(-1), ignore_index=-100)


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


# ---------------------------------------------------------------------------------------------- running


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's flags (besides `benchmark_utils.add_common_arguments`)."""
    parser.add_argument("--size", type=int, nargs=3, action="append", metavar=("B", "T", "V"), help="loss sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward calls per loss")
    parser.add_argument("--repeats-backward", type=int, default=3, help="timed forward+backward calls per loss")
    parser.add_argument("--memory-budget-gib", type=float, default=6.0, help="CPU sizes needing more are skipped")
    parser.add_argument(
        "--naive-backward-max-mib",
        type=float,
        default=None,
        help="largest logits (MiB) at which the naive backward runs (default: 200 on CPU, no limit on CUDA)",
    )


def loss_sizes(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """The `(B, T, V)` sizes to run: `--size`, else the defaults of the device mode. The last one is the size the
    speed target against the naive reference is read at."""
    if args.size:
        return [tuple(size) for size in args.size]
    return GPU_SIZES if args.gpu else CHECK_GPU_PATH_SIZES if args.check_gpu_path else CPU_SIZES


def loss_dtype(args: argparse.Namespace) -> torch.dtype:
    """bf16 logits on the GPU path (and its CPU check), float32 on the CPU."""
    return torch.bfloat16 if args.gpu or args.check_gpu_path else torch.float32


def run_loss_benchmarks(args: argparse.Namespace, device: torch.device, started: float) -> list[dict]:
    """`bench_loss` rows at every size of `loss_sizes`, with a progress line per size on stderr."""
    if args.naive_backward_max_mib is None:
        args.naive_backward_max_mib = float("inf") if device.type == "cuda" else 200.0
    rows = []
    for size in loss_sizes(args):
        rows += bench_loss(size, loss_dtype(args), device, args)
        print(f"loss {size} done at {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------- report


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


def loss_section(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """The report's section on the loss alone: the tables, then the batch statistics at the last size."""
    if not rows:
        return []
    last = loss_sizes(args)[-1]
    lines = [
        f"## Loss alone ({str(loss_dtype(args)).replace('torch.', '')} logits; medians of {args.repeats} forward and "
        f"{args.repeats_backward} forward+backward calls)",
        "",
        *loss_tables(rows),
    ]
    stats = next((r["stats"] for r in rows if (r["B"], r["T"], r["V"]) == last and "stats" in r), None)
    if stats:
        lines += ["", f"Batch statistics at {last}: " + ", ".join(f"{k} {v:g}" for k, v in stats.items())]
    return lines + [""]


def loss_targets(rows: list[dict], fixed: tuple[int, int, int]) -> list[str]:
    """Rows of the targets table: each loss target next to the figure measured (the speed-up over the naive
    reference at the size `fixed`)."""
    lines = []

    def find(size, mode):
        return next((r for r in rows if (r["B"], r["T"], r["V"]) == size and r["mode"] == mode), None)

    for mode in ("forward", "forward+backward"):
        r = find(fixed, mode)
        if r and "skipped" not in r and r["naive"] is not None:
            speedup = r["naive"] / r["vectorized"]
            lines.append(
                f"| vectorized >= 50x faster than naive, B,T,V={fixed}, {mode} | {speedup:.1f}x | "
                f"{'yes' if speedup >= 50 else 'no'} |"
            )
    long_rows = [r for r in rows if r["T"] >= 1024 and "skipped" not in r]
    for r in long_rows:
        ratio = r["vectorized"] / r["cross_entropy"]
        lines.append(
            f"| set loss <= 1.5x `F.cross_entropy`, B,T,V=({r['B']}, {r['T']}, {r['V']}), {r['mode']} | "
            f"{ratio:.2f}x | {'yes' if ratio <= 1.5 else 'no'} |"
        )
    measured = [r for r in rows if r.get("vectorized_mem") is not None]
    if measured:
        worst = max(measured, key=lambda r: r["vectorized_mem"])
        lines.append(
            f"| extra peak memory <= 10% of the logits (worst size/mode: ({worst['B']}, {worst['T']}, {worst['V']}), "
            f"{worst['mode']}) | {fmt_mem(worst['vectorized_mem'])} | "
            f"{'yes' if worst['vectorized_mem'] <= 0.10 else 'no'} |"
        )
    return lines


def main() -> None:
    args, device = parse_benchmark_args(__doc__.splitlines()[0], add_arguments)
    started = time.perf_counter()
    rows = run_loss_benchmarks(args, device, started)
    print(report(device, started, loss_section(rows, args), loss_targets(rows, loss_sizes(args)[-1])))


if __name__ == "__main__":
    main()
