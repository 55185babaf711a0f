"""Training steps of a QLoRA recipe at a model's real size: peak GPU memory and tokens/s, plain SFT vs the set loss.

    python benchmarks/qlora_steps.py --recipe recipes/qwen2.5-7b-instruct-qlora.yaml \
        --model-config benchmarks/configs/qwen2.5-7b.json --out /tmp/qlora-7b.json
    python benchmarks/qlora_steps.py --recipe ... --model-config ... --tiny   # same code path, tiny sizes, on the CPU

The recipe is read by `trl-qaloss train`'s own parser (`trl_qaloss.cli.parse_args`), so its quantization, LoRA, batch
size, `max_length`, gradient checkpointing, optimizer and loss settings are the ones measured; only what a measurement
needs is overridden: the data (synthetic rows of `<QA> q? <A> a ...` items, each longer than `max_length`, so every row
is truncated to exactly `max_length` tokens), `max_steps`, `gradient_accumulation_steps` (1 unless
`--gradient-accumulation-steps`: every step is then one micro-batch), logging, saving and reporting.

The model is the recipe's architecture built from `--model-config` (the model's config.json) with random weights,
already quantized as the recipe says (`benchmarks/random_4bit.py`); the tokenizer is the demo's (its ids are all below
the real vocabulary size, and `<QA>`/`<A>` are tokens of it: unlike with Qwen's tokenizer, the trainer adds no tokens
and trains no embedding rows, a difference of two rows). The model is loaded once; the first run wraps it with the
recipe's LoRA (as `SFTTrainer` does) and the later runs train the same PEFT model with a new trainer each.

Runs, in this order (or that of `--runs`): `plain` (`lambda_set=0`: exactly `SFTTrainer`'s loss), `recipe` (the recipe's
settings), then one per other `answer_order` value `QALossConfig` accepts, if it has that field. Each run takes
`--warmup` steps, then `--steps` measured ones. Per run: the peak of `torch.cuda.max_memory_allocated` over the whole
run (weights, adapter, gradients, activations, optimizer states; reset before each run; bitsandbytes' paged
optimizer states live outside torch's allocator and are not in it) and of `max_memory_reserved` (what the caching
allocator holds), the median time between the ends of consecutive measured steps, the tokens per second over
them (input tokens counted by the Trainer; the rows hold no padding) and the ratios of both to the `plain` run. The JSON
is rewritten after every run, so a run killed by a time limit leaves the finished ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # trl_qaloss and the benchmarks, without installing

from benchmarks.random_4bit import load_random_4bit  # noqa: E402
from trl_qaloss import QALossConfig, QALossSFTTrainer  # noqa: E402
from trl_qaloss.cli.training import load_datasets, model_init_kwargs, parse_args  # noqa: E402
from trl_qaloss.compat import installed_versions, is_checkpointing  # noqa: E402

DEMO_TOKENIZER = ROOT / "trl_qaloss" / "demo" / "model"
DEMO_ROWS = ROOT / "trl_qaloss" / "demo" / "data" / "train.jsonl"
GIB = 1 << 30
# --tiny: the architecture of --model-config at test size; the recipe's batch size and settings are kept.
TINY_MODEL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
    max_position_embeddings=256,
    bos_token_id=None,
    eos_token_id=2,
)
TINY_MAX_LENGTH = 128


# -------------------------------------------------------------------------------------------------------- runs


def run_settings(recipe_args, config_cls=QALossConfig) -> list[tuple[str, dict]]:
    """`(name, QALossConfig overrides)` of each run: plain SFT (`lambda_set=0`, `answer_order="data"`: exactly
    `SFTTrainer`'s loss), the recipe, then, if `config_cls` has the `answer_order` field, every (order, `lambda_set`
    in 0 and 1) combination other than those two, each order first with the recipe's `lambda_set`."""
    answer_order = config_cls.__dataclass_fields__.get("answer_order")
    if answer_order is None:
        return [("plain", {"lambda_set": 0}), ("recipe", {})]
    recipe_order = getattr(recipe_args, "answer_order", None)
    recipe_weight = 0 if not getattr(recipe_args, "lambda_set", 1) else 1
    runs = [
        ("plain", {"lambda_set": 0, "answer_order": "data"}),
        (f"recipe (answer_order={recipe_order}, lambda_set={getattr(recipe_args, 'lambda_set', 1):g})", {}),
    ]
    done = {("data", 0), (recipe_order, recipe_weight)}
    for weight in (recipe_weight, 1 - recipe_weight):
        for order in answer_order.metadata.get("choices", []):
            if (order, weight) not in done:
                runs.append(
                    (f"answer_order={order}, lambda_set={weight}", {"answer_order": order, "lambda_set": weight})
                )
    return runs


def synthetic_rows(path: Path, num_rows: int, min_tokens: int, tokenizer, seed: int = 0) -> None:
    """Write `num_rows` structured rows (`{"context", "qas"}`) to `path`, each with at least `min_tokens` tokens.

    The items are the demo's questions and answer lists, drawn at random and with their answers shuffled, so the
    loss sees realistic items, and each row has more tokens than `max_length`: truncation makes them all full.
    """
    rng = random.Random(seed)
    demo = [json.loads(line) for line in DEMO_ROWS.read_text().splitlines() if line.strip()]
    items = [qa for row in demo for qa in row["qas"]]
    with path.open("w") as f:
        for _ in range(num_rows):
            qas, text = [], ""
            while len(tokenizer(text).input_ids) < min_tokens:
                chunk = [dict(qa, answers=rng.sample(qa["answers"], len(qa["answers"]))) for qa in rng.sample(items, 8)]
                qas += chunk
                text += " ".join(
                    f"<QA> {qa['question']} " + " ".join(f"<A> {a}" for a in qa["answers"]) for qa in chunk
                )
            f.write(json.dumps({"context": rng.choice(demo)["context"], "qas": qas}) + "\n")


class StepMeter(TrainerCallback):
    """Wall time and input tokens of every optimizer step, and the device's memory peaks over the run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.step_ends, self.tokens_seen = [], []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_begin(self, args, state, control, **kwargs):
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.step_ends, self.tokens_seen = [time.perf_counter()], [state.num_input_tokens_seen]

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.step_ends.append(time.perf_counter())
        self.tokens_seen.append(state.num_input_tokens_seen)

    def summary(self, warmup: int) -> dict:
        """Median step time and tokens/s over the steps after the first `warmup`, and the memory peaks."""
        times = [b - a for a, b in zip(self.step_ends[warmup:-1], self.step_ends[warmup + 1 :], strict=True)]
        tokens = self.tokens_seen[-1] - self.tokens_seen[warmup]
        result = dict(
            steps=len(self.step_ends) - 1,
            measured_steps=len(times),
            step_s=statistics.median(times) if times else None,
            step_times_s=[round(t, 4) for t in times],
            tokens_per_step=tokens / len(times) if times else None,
            tokens_per_s=tokens / sum(times) if times else None,
        )
        if self.device.type == "cuda":
            result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / GIB
        return result


def last_logged(log_history: list[dict], *names: str) -> dict:
    """The last logged value of each of `names` (None if never logged)."""
    values = {}
    for name in names:
        logged = [entry[name] for entry in log_history if name in entry]
        values[name] = logged[-1] if logged else None
    return values


def ratios(runs: list[dict]) -> None:
    """Add each run's time, throughput and memory ratios to the `plain` run's, in place."""
    plain = next((r for r in runs if r["name"] == "plain" and r.get("step_s")), None)
    if plain is None:
        return
    for run in runs:
        if run.get("step_s"):
            run["time_ratio"] = run["step_s"] / plain["step_s"]
            run["tokens_per_s_ratio"] = run["tokens_per_s"] / plain["tokens_per_s"]
        if run.get("peak_allocated_gib") and plain.get("peak_allocated_gib"):
            run["memory_ratio"] = run["peak_allocated_gib"] / plain["peak_allocated_gib"]


def load_model(args, quantization_config, device: torch.device, overrides, work: Path, load_kwargs: dict):
    """`(model, draw_s, load_s, loaded_from)`: the random 4-bit model, loaded from memory, or from files written to
    `--checkpoint-dir` (or to `work`, if loading from memory fails)."""
    checkpoint_dir = args.checkpoint_dir
    try:
        loaded = load_random_4bit(
            args.model_config, quantization_config, device, args.seed, overrides, checkpoint_dir, **load_kwargs
        )
        return *loaded, "files" if checkpoint_dir else "state dict"
    except Exception:
        if checkpoint_dir:
            raise
        # A transformers version that loads no pre-quantized state dict still loads the same tensors from files.
        traceback.print_exc()
        print("Loading the state dict failed; writing it as a checkpoint and loading that.", file=sys.stderr)
        free_device_memory(device)
        loaded = load_random_4bit(
            args.model_config, quantization_config, device, args.seed, overrides, work / "checkpoint", **load_kwargs
        )
        return *loaded, "files, after the state dict failed"


def measure_run(model, name: str, overrides: dict, run_args, train_dataset, tokenizer, peft_config, device, warmup):
    """`(run, model)`: the figures of one run (or its error) and the model to train next: the PEFT model once
    the first run has wrapped it."""
    run = dict(name=name, overrides=overrides)
    meter = StepMeter(device)
    trainer = None
    try:
        trainer = QALossSFTTrainer(
            model=model,
            args=run_args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config if not hasattr(model, "peft_config") else None,
            callbacks=[meter],
        )
        trainer.train()
        run.update(meter.summary(warmup))
        run["checkpointing"] = is_checkpointing(trainer.model)  # the recipe's setting, read back from the model
        run["logged"] = last_logged(trainer.state.log_history, "loss", "ce_loss", "set_loss")
    except Exception as error:  # one failed run must not lose the others' figures
        run["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
        print(f"run {name} failed: {run['error']}", file=sys.stderr, flush=True)
        if device.type == "cuda" and isinstance(error, torch.OutOfMemoryError):
            run.update(meter.summary(warmup))
    if trainer is not None:
        model = trainer.model  # PEFT wrapped the base model in place: later runs train this adapter
        trainer.accelerator.free_memory()
        del trainer
    for param in model.parameters():
        param.grad = None
    free_device_memory(device)
    return run, model


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------ report


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"### {meta['model']}: {meta['recipe']} ({meta['device']})",
        "",
        f"Batch [{meta['per_device_train_batch_size']}, {meta['max_length']}] per step (gradient accumulation "
        f"{meta['gradient_accumulation_steps']}), {meta['warmup']} warm-up + {meta['steps']} measured steps per run; "
        f"random 4-bit weights drawn in {meta['draw_s']:.0f} s, loaded ({meta['loaded_from']}) in "
        f"{meta['load_s']:.0f} s; "
        f"weights on the device after loading: {fmt(meta.get('loaded_allocated_gib'), '.2f', ' GiB')}.",
        f"Releases: {meta.get('versions', 'not recorded')}.",
        "",
        "| run | peak allocated | peak reserved | step time | tokens/s | time ratio | tokens/s ratio | memory ratio "
        "| checkpointing | loss (last) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for run in report["runs"]:
        if "error" in run:
            lines.append(f"| {run['name']} | failed: {run['error'][:120]} | | | | | | | | |")
            continue
        losses = ", ".join(f"{k} {v:.3f}" for k, v in run["logged"].items() if v is not None)
        lines.append(
            f"| {run['name']} | {fmt(run.get('peak_allocated_gib'), '.2f', ' GiB')} "
            f"| {fmt(run.get('peak_reserved_gib'), '.2f', ' GiB')} | {fmt(run['step_s'], '.3f', ' s')} "
            f"| {fmt(run['tokens_per_s'], '.0f')} | {fmt(run.get('time_ratio'), '.3f')} "
            f"| {fmt(run.get('tokens_per_s_ratio'), '.3f')} | {fmt(run.get('memory_ratio'), '.3f')} "
            f"| {'on' if run.get('checkpointing') else 'OFF'} | {losses} |"
        )
    skipped = report.get("skipped_runs")
    if skipped:
        lines += ["", f"Not run (time budget): {', '.join(skipped)}."]
    return "\n".join(lines)


def fmt(value, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU, torch {torch.__version__}"


# -------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="the recipe YAML (read by `trl-qaloss train`'s parser)")
    parser.add_argument("--model-config", required=True, help="the model's config.json (random weights are drawn)")
    parser.add_argument("--runs", help="comma-separated names of the runs to do, in that order (default: all)")
    parser.add_argument("--warmup", type=int, default=2, help="steps per run before the measured ones")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per run")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--max-length", type=int, help="override the recipe's max_length")
    parser.add_argument("--time-budget", type=float, default=math.inf, help="start no run after this many seconds")
    parser.add_argument("--tiny", action="store_true", help="tiny model and max_length: the code path, on the CPU")
    parser.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="write the random 4-bit weights there and load them from the files (default: from memory)",
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON results; the Markdown table goes next to it")
    parser.add_argument("recipe_flags", nargs="*", help="after --: more `--field value` flags for the recipe")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    tokenizer = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    work = Path(tempfile.mkdtemp(prefix="qlora-steps-"))
    steps = args.warmup + args.steps

    def recipe_args(overrides: dict):
        flags = [
            "--config",
            args.recipe,
            "--model_name_or_path",
            str(args.model_config),
            "--dataset_name",
            str(work / "rows.jsonl"),
            "--output_dir",
            str(work / "out"),
            "--max_steps",
            str(steps),
            "--gradient_accumulation_steps",
            str(args.gradient_accumulation_steps),
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            "--eval_strategy",
            "no",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--include_num_input_tokens_seen",
            "true",
            "--dataloader_num_workers",
            "0",
            "--seed",
            str(args.seed),
        ]
        if args.tiny or args.max_length:
            flags += ["--max_length", str(args.max_length or TINY_MAX_LENGTH)]
        if device.type == "cpu":
            flags += ["--use_cpu", "true"]
        flags += args.recipe_flags
        for name, value in overrides.items():
            flags += [f"--{name}", str(value)]
        return parse_args(flags)

    script_args, training_args, model_args, dataset_args = recipe_args({})
    quantization_config = get_quantization_config(model_args)
    if quantization_config is None or not quantization_config.load_in_4bit:
        parser.error(f"{args.recipe} does not load the model in 4-bit (`load_in_4bit: true`).")
    batch = training_args.per_device_train_batch_size * args.gradient_accumulation_steps
    synthetic_rows(work / "rows.jsonl", batch * steps, training_args.max_length + 8, tokenizer, args.seed)
    train_dataset, _, _ = load_datasets(script_args, training_args, dataset_args)

    load_kwargs = model_init_kwargs(training_args, model_args)
    load_kwargs = {k: v for k, v in load_kwargs.items() if k in ("dtype", "attn_implementation") and v is not None}
    if isinstance(load_kwargs.get("dtype"), str) and load_kwargs["dtype"] != "auto":
        load_kwargs["dtype"] = getattr(torch, load_kwargs["dtype"])
    overrides = TINY_MODEL if args.tiny else None
    model, draw_s, load_s, loaded_from = load_model(args, quantization_config, device, overrides, work, load_kwargs)
    free_device_memory(device)  # what loading left in the allocator's cache is not the training's
    model_name = Path(args.model_config).stem + (" (tiny)" if args.tiny else "")
    report = dict(
        meta=dict(
            model=model_name,
            recipe=Path(args.recipe).name,
            device=device_name(device),
            versions=installed_versions(),
            started=f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            draw_s=draw_s,
            load_s=load_s,
            loaded_from=loaded_from,
            loaded_allocated_gib=torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None,
            per_device_train_batch_size=training_args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            max_length=training_args.max_length,
            warmup=args.warmup,
            steps=args.steps,
            parameters=sum(p.numel() for p in model.parameters()),
        ),
        runs=[],
    )
    print(
        f"model {model_name} ready at {time.perf_counter() - started:.0f} s (draw {draw_s:.0f} s, load {load_s:.0f} s)",
        file=sys.stderr,
        flush=True,
    )

    settings = run_settings(training_args)
    if args.runs:  # in the order given; "recipe" also names "recipe (answer_order=...)"
        keep = args.runs.split(",")
        settings = [(name, overrides) for name, overrides in settings if name.split(" (")[0] in keep]
        settings.sort(key=lambda setting: keep.index(setting[0].split(" (")[0]))
    peft_config = get_peft_config(model_args)
    for index, (name, overrides) in enumerate(settings):
        if time.perf_counter() - started > args.time_budget:
            report["skipped_runs"] = [n for n, _ in settings[index:]]
            break
        run_args = recipe_args(overrides)[1]
        run_args.model_init_kwargs = None  # the model is already loaded with them
        run, model = measure_run(
            model, name, overrides, run_args, train_dataset, tokenizer, peft_config, device, args.warmup
        )
        report["runs"].append(run)
        ratios(report["runs"])
        report["meta"]["elapsed_s"] = time.perf_counter() - started
        args.out.write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".md").write_text(markdown(report) + "\n")
        print(f"run {name} done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    args.out.write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
