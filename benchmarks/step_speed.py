"""Speed and extra peak memory of a training step: `QALossSFTTrainer` against plain `SFTTrainer`.

    python benchmarks/step_speed.py                   # CPU: the tests' tiny Llama and a small Llama (V=32000)
    python benchmarks/step_speed.py --gpu             # CUDA: a Llama-3.1-8B config, random 4-bit nf4 + LoRA r=16
    python benchmarks/step_speed.py --check-gpu-path  # the --gpu code path with a tiny model on the CPU (a smoke run)

`Trainer.training_step` (forward, loss, backward) of both trainers on the same model and batch, after a warm-up step
that allocates the parameters' gradients. Extra peak memory: see `benchmark_utils.peak_extra_bytes`. The share of the
step under the `qaloss.*` profiler labels comes from one profiled step. Prints the tables; `benchmarks/run.py` runs
this and the loss alone together.
"""

from __future__ import annotations

import argparse
import copy
import gc
import tempfile
import time

import torch
from benchmark_utils import (
    MIB,
    build_tokenizer,
    config_values,
    nf4_quantization,
    parse_benchmark_args,
    peak_extra_bytes,
    qa_rows,
    report,
    small_llama,
    stage_shares,
    timed,
    tiny_llama,
)

from trl_qaloss.compat import checkpointing_arguments

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
# --check-gpu-path: the same architecture at test size.
TINY_LLAMA_8B = dict(
    LLAMA_8B,
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


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
    from random_4bit import load_random_4bit
    from transformers import LlamaConfig

    tokenizer = build_tokenizer()
    compute_dtype = torch.bfloat16
    config = LlamaConfig(**model_config, pad_token_id=1, eos_token_id=2, bos_token_id=None)
    config.architectures = ["LlamaForCausalLM"]
    quantization = nf4_quantization(compute_dtype)

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
        **checkpointing_arguments(True),
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    name = f"Llama {model_config['hidden_size']}x{model_config['num_hidden_layers']}, 4-bit nf4 + LoRA r=16"
    return bench_step(name, load, tokenizer, values, peft_config, device, args.step_repeats)


def run_step_benchmarks(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """The steps of the device mode: the 8B config in 4-bit (`--gpu`), the same at test size on the CPU
    (`--check-gpu-path`), else the two small Llamas on the CPU. Rows come in pairs: plain, then ours."""
    if args.gpu:
        return quantized_step_benchmarks(args, device, LLAMA_8B, batch=4, length=1024)
    if args.check_gpu_path:
        return quantized_step_benchmarks(args, device, TINY_LLAMA_8B, batch=2, length=128)
    return cpu_step_benchmarks(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's flags (besides `benchmark_utils.add_common_arguments`)."""
    parser.add_argument("--step-repeats", type=int, default=3, help="timed training steps per trainer")


# ---------------------------------------------------------------------------------------------- report


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


def step_section(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """The report's section on the training step."""
    if not rows:
        return []
    header = f"## Training step (`training_step`: forward, loss, backward; median of {args.step_repeats})"
    return [header, "", *step_table(rows), ""]


def step_targets(rows: list[dict]) -> list[str]:
    """Rows of the targets table: the step's time and memory overhead over plain SFT next to the limits (5% for the
    4-bit models, 15% on the CPU)."""
    lines = []
    for plain, ours in zip(rows[::2], rows[1::2], strict=True):
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


def main() -> None:
    args, device = parse_benchmark_args(__doc__.splitlines()[0], add_arguments)
    started = time.perf_counter()
    rows = run_step_benchmarks(args, device)
    print(report(device, started, step_section(rows, args), step_targets(rows), loss_notes=False))


if __name__ == "__main__":
    main()
