"""Which training target gives the best answer sets? Plain SFT against the set loss and the answer orders, on the demo.

    python benchmarks/set_vs_sft.py            # the full run: 10 methods x 4 tasks x 3 seeds x 2 budgets
    python benchmarks/set_vs_sft.py --quick    # a few minutes: every method and task, 1 seed, a few steps
    python benchmarks/set_vs_sft.py --model Qwen/Qwen2.5-0.5B-Instruct --data my_qa_dir --lora --learning_rate 2e-4
                                               # your model and data: one task, LoRA instead of full fine-tuning

Needs the `bench` extra for its plot (matplotlib): `pip install "trl-qaloss[bench]"`, or `pip install -e ".[bench]"`
from a checkout; without it the script stops at start-up.

Methods (the same model, data, seeds, optimizer, hyperparameters and steps for all):

| method | `answer_order` | `lambda_set` |
|---|---|---:|
| plain SFT | `data` | 0 |
| set loss | `data` | 1 |
| canonical | `canonical` | 0 |
| appearance | `appearance` | 0 |
| preferred | `preferred` | 0 |
| aligned | `aligned` | 0 |
| aligned + set loss | `aligned` | 1 |
| canonical + set loss | `canonical` | 1 |
| canonical + set loss 0.3 | `canonical` | 0.3 |
| canonical + set loss 0.1 | `canonical` | 0.1 |

(`lambda_ce=1` for all; `lambda_set=0` trains with `SFTTrainer`'s own loss, on targets reordered by `answer_order`.)

Tasks: the demo's four tasks, each 400 training and 80 held-out rows whose prompts name the questions to answer, in
order; every answer list is in random order. Three ask for facts the base learned in pretraining, none of them in
the prompt (`trl_qaloss/demo/data`, 1-4 one-name answers per question; `trl_qaloss/demo/data_hard`, 5-8 multi-token
answers sharing first tokens; `trl_qaloss/demo/data_long`, 12-30 of them); `trl_qaloss/demo/data_grounded` asks
which names of a kind a passage in the prompt mentions (4-12 answers), and one question in five for a country's
names, some in the passage and some not. Or one task of your own: `--model` (a hub name or a directory) and `--data`
(any dataset `trl-qaloss train` reads: structured rows, prompt/completion or chat; its `test` split is held out, or
10% of its rows, at most 200, drawn with seed 0 when it has none), with `--lora` for LoRA on every linear layer
instead of full fine-tuning. Budgets: `full` steps, and `low` (a quarter of the steps, its own cosine schedule)
where learning speed shows.

The hyperparameters were chosen once, for plain SFT, and are used unchanged for every method (`--max_steps` etc.
change them for all). Each run fully fine-tunes the task's pretrained model (the demo's tiny Llama,
`trl_qaloss/demo/model`; for the long task its 512-token twin `trl_qaloss/demo/model_long`; for the grounded task
`trl_qaloss/demo/model_grounded`, pretrained to copy from its prompt) and, at evaluations
spread over training, measures on the held-out rows, with the same code for every method:

- answer-set metrics of greedy completions of all 80 prompts (`QASetEvalCallback`, `answer_set_scores`, questions
  paired by position): exact-set match, set-F1, duplicate rate, cardinality error;
- the held-out SFT cross-entropy (mean over completion tokens) of the completions in their data order, tokenized
  here, whatever order the method trains on;
- the mean time of a training step (forward, loss, backward, optimizer; evaluations excluded), as a ratio to plain
  SFT's step in the same task, budget and seed.

Runs go to `--workers` processes of one torch thread each, on the CPU, or on the GPU when there is one (then use
`--workers 1` unless several runs fit on it at once). Writes `<out>.md` (a table per task and budget: mean ±
standard deviation over seeds and the paired difference to plain SFT), `<out>.png` (metrics over steps of the full
budget, per method: mean line and min-max band over seeds) and `<out>.json` (every run's numbers).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# isort: off
# trl_qaloss before the libraries: importing it filters their messages a user cannot act on (bitsandbytes' note about
# a CPU kernel on the Hub is printed as it is imported, which transformers' quantization code does).
from trl_qaloss import QALossConfig, QALossSFTTrainer

# isort: on
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

from trl_qaloss.data import load_qa_dataset
from trl_qaloss.demo import (
    DATA_DIR,
    GROUNDED_DATA_DIR,
    GROUNDED_MODEL_DIR,
    HARD_DATA_DIR,
    LONG_DATA_DIR,
    LONG_MODEL_DIR,
    MODEL_DIR,
    resolve_demo_path,
)

METHODS = {  # name: (answer_order, lambda_set)
    "plain SFT": ("data", 0.0),
    "set loss": ("data", 1.0),
    "canonical": ("canonical", 0.0),
    "appearance": ("appearance", 0.0),
    "preferred": ("preferred", 0.0),
    "aligned": ("aligned", 0.0),
    "aligned + set loss": ("aligned", 1.0),
    "canonical + set loss": ("canonical", 1.0),
    "canonical + set loss 0.3": ("canonical", 0.3),
    "canonical + set loss 0.1": ("canonical", 0.1),
}
BASELINE = "plain SFT"


@dataclass(frozen=True)
class Task:
    data: str  # a dataset `trl-qaloss train` reads: a directory, a .jsonl file or a hub name
    model: str  # a directory or a hub name
    max_length: int  # longer than every row: nothing is truncated
    max_new_tokens: int  # room for the longest reference completion
    cost: float = 1.0  # a run's time relative to the countries task's, so that the longest start first


TASKS = {
    "countries": Task(str(DATA_DIR), str(MODEL_DIR), 128, 96),
    "hard": Task(str(HARD_DATA_DIR), str(MODEL_DIR), 192, 176, cost=2.0),
    "long": Task(str(LONG_DATA_DIR), str(LONG_MODEL_DIR), 384, 352, cost=4.0),
    # 4 layers of 8 full heads: its 480-step run takes 5.5 times the countries' (349 against 64 s, 2 workers, 2 cores)
    "grounded": Task(str(GROUNDED_DATA_DIR), str(GROUNDED_MODEL_DIR), 320, 160, cost=5.5),
}
BUDGETS = {"full": 1.0, "low": 0.25}
METRICS = [  # (key in a run's final numbers, label, format, plotted)
    ("eval_exact_set_match", "exact-set match", "{:.3f}", True),
    ("eval_set_f1", "set-F1", "{:.3f}", True),
    ("eval_duplicate_rate", "duplicate rate", "{:.3f}", True),
    ("eval_cardinality_error", "cardinality error", "{:.3f}", False),
    ("heldout_ce", "held-out CE", "{:.4f}", True),
    ("step_time_ratio", "step time / plain SFT", "{:.2f}", False),
]


@dataclass(frozen=True)
class Job:
    task: str
    budget: str
    seed: int
    method: str
    max_steps: int
    evals: int


def split_data(task: Task) -> tuple:
    """`(train, held_out)` rows of `task.data`, as `trl-qaloss train` converts them (prompt and completion).

    The held-out rows are its `test` split or, without one, 10% of its rows (at most 200) drawn with seed 0, the same
    rows for every method and seed.
    """
    data = load_qa_dataset(task.data)  # a directory's eval.jsonl or test.jsonl is its "test" split
    if "train" not in data:
        raise SystemExit(f"--data {task.data}: no `train` split (it has {list(data)}).")
    if "test" in data:
        train, held_out = data["train"], data["test"]
    else:
        size = min(max(len(data["train"]) // 10, 1), 200)
        parts = data["train"].train_test_split(test_size=size, seed=0)
        train, held_out = parts["train"], parts["test"]
    if not {"prompt", "completion"} <= set(train.column_names):
        raise SystemExit(
            f"--data {task.data}: the benchmark needs prompt and completion columns (structured rows, "
            f"prompt/completion or chat prompt/completion), got columns {train.column_names}."
        )
    return train, held_out


def prompt_completion_ids(tokenizer, row) -> tuple[list[int], list[int]]:
    """The token ids of a row's prompt and of its completion followed by EOS, as `SFTTrainer` tokenizes them: plain
    text as it is, chat messages through the tokenizer's chat template."""
    if isinstance(row["prompt"], str):
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return prompt, completion
    prompt_text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    return prompt, full[len(prompt) :]


def heldout_batches(tokenizer, rows, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The held-out rows as padded `input_ids`, `attention_mask`, `labels` (completion tokens and EOS labelled).

    Built here from the rows in their data order, so every method is measured on the same targets.
    """
    batches = []
    for start in range(0, len(rows), batch_size):
        ids, labels = [], []
        for row in rows.select(range(start, min(start + batch_size, len(rows)))):
            prompt, completion = prompt_completion_ids(tokenizer, row)
            ids.append(torch.tensor(prompt + completion))
            labels.append(torch.tensor([-100] * len(prompt) + completion))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad_id)
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": torch.nn.utils.rnn.pad_sequence([torch.ones_like(i) for i in ids], batch_first=True),
                "labels": torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100),
            }
        )
    return batches


class HeldOutCrossEntropy(TrainerCallback):
    """At each evaluation: the token-mean cross-entropy of the held-out completions, in their data order."""

    def __init__(self, trainer, batches):
        self.trainer, self.batches, self.history = trainer, batches, []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        model = self.trainer.model
        was_training = model.training
        model.eval()
        nll = tokens = 0.0
        with torch.no_grad():
            for batch in self.batches:
                batch = {key: value.to(model.device) for key, value in batch.items()}
                labels = batch["labels"][:, 1:]
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                nll += F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="sum").item()
                tokens += (labels != -100).sum().item()
        model.train(was_training)
        metrics["heldout_ce"] = nll / tokens
        self.history.append(nll / tokens)


class StepTimer(TrainerCallback):
    """Wall time of each training step (forward, loss, backward, optimizer), evaluations and logging excluded."""

    def __init__(self):
        self.seconds, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def run(job: Job, settings: dict) -> dict:
    """Train one method on one task, seed and budget; its final held-out numbers and their curves over steps."""
    task = settings["tasks"][job.task]
    answer_order, lambda_set = METHODS[job.method]
    tokenizer = AutoTokenizer.from_pretrained(task.model)
    model = AutoModelForCausalLM.from_pretrained(task.model, dtype=torch.float32)
    train, heldout = split_data(task)
    heldout = heldout.select(range(min(settings["eval_rows"], len(heldout))))
    peft_config = None
    if settings["lora_r"]:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=settings["lora_r"],
            lora_alpha=2 * settings["lora_r"],
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    on_gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as out_dir:
        config = QALossConfig(
            output_dir=out_dir,
            seed=job.seed,
            data_seed=job.seed,
            answer_order=answer_order,
            lambda_ce=1.0,
            lambda_set=lambda_set,
            max_steps=job.max_steps,
            per_device_train_batch_size=settings["batch_size"],
            learning_rate=settings["learning_rate"],
            lr_scheduler_type="cosine",
            warmup_steps=job.max_steps // 20,
            weight_decay=0.0,
            max_length=task.max_length,
            eval_strategy="steps",
            eval_steps=max(job.max_steps // job.evals, 1),
            per_device_eval_batch_size=40,
            eval_generate_samples=len(heldout),
            eval_generate_batch_size=40,
            eval_max_new_tokens=task.max_new_tokens,
            logging_steps=max(job.max_steps // 24, 1),
            save_strategy="no",
            report_to=[],
            use_cpu=not on_gpu,
            bf16=on_gpu and torch.cuda.is_bf16_supported(),
            activation_checkpointing=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = QALossSFTTrainer(
            model=model,
            args=config,
            train_dataset=train,
            eval_dataset=heldout,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        cross_entropy = HeldOutCrossEntropy(trainer, heldout_batches(tokenizer, heldout, 40))
        timer = StepTimer()
        trainer.add_callback(cross_entropy)
        trainer.add_callback(timer)
        trainer.remove_callback(PrinterCallback)  # one line per run instead of every log
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    evals = [e for e in trainer.state.log_history if "eval_set_f1" in e]
    curves = {"step": [e["step"] for e in evals], "heldout_ce": cross_entropy.history}
    curves |= {key: [e[key] for e in evals] for key, *_ in METRICS if key.startswith("eval_")}
    # The first steps warm up allocators and caches; the step time is the mean of the rest.
    step_seconds = statistics.mean(timer.seconds[min(5, len(timer.seconds) - 1) :])
    final = {key: values[-1] for key, values in curves.items() if key != "step"}
    final["step_seconds"] = step_seconds
    print(
        f"{job.task:>9} {job.budget:>4} seed {job.seed} {job.method:>18}: "
        f"exact-set {final['eval_exact_set_match']:.3f}  set-F1 {final['eval_set_f1']:.3f}  "
        f"dup {final['eval_duplicate_rate']:.3f}  CE {final['heldout_ce']:.4f}"
        f"  step {1000 * step_seconds:.0f} ms  ({seconds:.0f} s)",
        flush=True,
    )
    parameters = {
        "trained": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "all": sum(p.numel() for p in trainer.model.parameters()),
    }
    return {
        "job": job.__dict__,
        "final": final,
        "curves": curves,
        "seconds": seconds,
        "parameters": parameters,
        "heldout_rows": len(heldout),
    }


def _run_in_worker(item: tuple[Job, dict]) -> dict:
    torch.set_num_threads(1)  # the tiny model runs fastest on one thread; the workers share the cores
    # Step times compare only within one invocation on one machine (see add_step_time_ratios).
    return {**run(*item), "machine": platform.node(), "invocation": item[1]["invocation"]}


def add_step_time_ratios(results: list[dict]) -> None:
    """`step_time_ratio`: a run's mean step time over plain SFT's in the same task, budget and seed, made by the same
    invocation on the same machine (NaN, left out of the means, otherwise: the load and the machine can differ)."""

    def same_conditions(r: dict) -> tuple:
        return (r["job"]["task"], r["job"]["budget"], r["job"]["seed"], r.get("machine"), r.get("invocation"))

    baseline = {same_conditions(r): r["final"]["step_seconds"] for r in results if r["job"]["method"] == BASELINE}
    for r in results:
        seconds = baseline.get(same_conditions(r))
        r["final"]["step_time_ratio"] = r["final"]["step_seconds"] / seconds if seconds else float("nan")


def mean_std(values: list[float], fmt: str, signed: bool = False) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    mean = fmt.format(statistics.mean(values))
    return f"{'+' if signed and not mean.startswith('-') else ''}{mean} ± {fmt.format(std)}"


def select(results: list[dict], **job) -> list[dict]:
    """The runs whose job has these fields, in seed order."""
    runs = [r for r in results if all(r["job"][k] == v for k, v in job.items())]
    return sorted(runs, key=lambda r: r["job"]["seed"])


def results_table(results: list[dict], task: str, budget: str, methods: list[str]) -> list[str]:
    """One Markdown table: a row per method, a column per metric, `mean ± std (paired difference to plain SFT)`."""
    lines = [f"| method | {' | '.join(label for _, label, *_ in METRICS)} |", "|---|" + "---:|" * len(METRICS)]
    baseline = {r["job"]["seed"]: r["final"] for r in select(results, task=task, budget=budget, method=BASELINE)}
    for method in methods:
        runs = select(results, task=task, budget=budget, method=method)
        cells = []
        for key, _, fmt, _ in METRICS:
            values = [r["final"][key] for r in runs if r["final"][key] == r["final"][key]]  # NaN: not comparable
            cell = mean_std(values, fmt) if values else "n/a"
            if method != BASELINE and key != "step_time_ratio" and baseline:
                diffs = [r["final"][key] - baseline[r["job"]["seed"]][key] for r in runs]
                cell += f" ({mean_std(diffs, fmt, signed=True)})"
            cells.append(cell)
        lines.append(f"| {method} | {' | '.join(cells)} |")
    return lines


def write_report(
    results: list[dict], args: argparse.Namespace, methods: list[str], wall: float, ran_now: int, path: Path
) -> None:
    steps = {budget: budget_steps(args.max_steps, budget) for budget in BUDGETS}
    training = f"LoRA (r={args.lora_r}, every linear layer)" if args.lora else "Full fine-tuning"
    model = (
        f"`{args.model}`"
        if args.model
        else "each task's tiny pretrained Llama (`trl_qaloss/demo/model`; `model_long` for the long task, "
        "`model_grounded` for the grounded task)"
    )
    lines = [
        f"Held-out rows ({args.eval_rows} per task), greedy decoding, questions paired by position; mean ± standard "
        f"deviation over seeds {', '.join(map(str, args.seeds))}, and in parentheses the paired difference to plain "
        f"SFT (same seed). {training} of {model}, batch {args.batch_size}, lr "
        f"{args.learning_rate}, cosine with 5% warmup, {steps['full']} steps (full) or {steps['low']} (low budget).",
    ]
    for task in args.tasks:
        for budget in BUDGETS:
            lines += ["", f"**{task}, {budget} budget ({steps[budget]} steps)**", ""]
            lines += results_table(results, task, budget, methods)
    lines += ["", runtime_line(results, ran_now, wall, args.workers)]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def runtime_line(results: list[dict], ran_now: int, wall: float, workers: int) -> str:
    """How long the runs took: this invocation's wall time for the runs it made, and every run's own time."""
    if ran_now:
        line = f"Wall time: {wall / 60:.1f} min for the {ran_now} runs made by this invocation on {workers} workers"
        if len(results) > ran_now:
            line += f"; {len(results) - ran_now} runs kept from an earlier file (`--resume`)"
    else:
        line = f"Written from {len(results)} finished runs (`--report_from`)"
    run_times = [r["seconds"] for r in results]
    return (
        f"{line}. Training and evaluations of all {len(results)} runs: {sum(run_times) / 60:.0f} min of worker time "
        f"({statistics.mean(run_times):.0f} s per run on average)."
    )


def plot(results: list[dict], methods: list[str], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, label) for key, label, _, plotted in METRICS if plotted]
    tasks = args.tasks
    fig, axes = plt.subplots(len(tasks), len(panels), figsize=(4.2 * len(panels), 3.6 * len(tasks)), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for row, task in enumerate(tasks):
        for col, (key, label) in enumerate(panels):
            ax = axes[row][col]
            for method, color in zip(methods, colors, strict=False):
                runs = select(results, task=task, budget="full", method=method)
                if not runs:
                    continue
                steps = runs[0]["curves"]["step"]
                values = torch.tensor([r["curves"][key] for r in runs])
                ax.plot(steps, values.mean(0), color=color, marker="o", markersize=3, label=method)
                ax.fill_between(steps, values.min(0).values, values.max(0).values, color=color, alpha=0.15)
            ax.set_title(f"{task}: {label}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Held-out metrics over training (full budget), {len(args.seeds)} seeds: mean (line), min-max (band)")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")


def budget_steps(max_steps: int, budget: str) -> int:
    return max(int(max_steps * BUDGETS[budget]), 1)


def make_jobs(args: argparse.Namespace, methods: list[str], tasks: dict[str, Task]) -> list[Job]:
    """Every (task, budget, seed, method) run, the longest first so the workers finish together."""
    jobs = [
        Job(task, budget, seed, method, budget_steps(args.max_steps, budget), args.evals if budget == "full" else 1)
        for task in args.tasks
        for budget in BUDGETS
        for seed in args.seeds
        for method in methods
    ]
    return sorted(jobs, key=lambda j: -tasks[j.task].cost * BUDGETS[j.budget])  # stable: seeds in order


def custom_task(args: argparse.Namespace) -> Task:
    """The task of `--model` and `--data`: `max_length` holds its longest row and `max_new_tokens` its longest
    held-out completion (with 10% to spare), unless given."""
    task = Task(args.data, args.model, args.max_length or 0, args.max_new_tokens or 0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train, held_out = split_data(task)
    lengths = [[len(ids) for ids in prompt_completion_ids(tokenizer, row)] for row in (*train, *held_out)]
    longest_completion = max(c for _, c in lengths[len(train) :])
    return Task(
        args.data,
        args.model,
        args.max_length or max(p + c for p, c in lengths),
        args.max_new_tokens or int(1.1 * longest_completion) + 1,
    )


def check_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}.")
    if BASELINE not in methods:
        raise SystemExit(f"--methods must include {BASELINE!r}: every difference is taken to it.")
    if "answer_order" not in QALossConfig.__dataclass_fields__:
        raise SystemExit("This benchmark needs `QALossConfig.answer_order`; install a trl-qaloss that has it.")


def check_optional_imports() -> None:
    """Exit with the extra to install when the report's plot cannot be drawn, before any run rather than after all."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            'set_vs_sft.py needs matplotlib (the "bench" extra) to draw its plot: pip install "trl-qaloss[bench]", or '
            'pip install -e ".[bench]" from a checkout.'
        ) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few minutes: seed 0, 20 steps (5 low), 1 evaluation of 10 held-out rows, written to set_vs_sft_quick.*",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"a subset of {list(METHODS)}")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="the demo's tasks")
    parser.add_argument(
        "--model", default=None, help="instead of the demo's tasks: this causal LM (a hub name or a directory) ..."
    )
    parser.add_argument(
        "--data",
        default=None,
        help="... trained on this dataset (any dataset `trl-qaloss train` reads; its `test` split is held out, or "
        "10%% of its rows, at most 200, drawn with seed 0)",
    )
    parser.add_argument("--lora", action="store_true", help="LoRA on every linear layer instead of full fine-tuning")
    parser.add_argument(
        "--lora_r", type=int, default=None, help="with --lora: LoRA rank (default 16; alpha is twice it)"
    )
    parser.add_argument(
        "--max_length", type=int, default=None, help="with --data: tokens per row (default: the longest row)"
    )
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=None,
        help="with --data: tokens generated per held-out prompt (default: the longest held-out completion + 10%%)",
    )
    parser.add_argument("--max_steps", type=int, default=480, help="steps of the full budget; the low one is 1/4")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument(
        "--evals", type=int, default=4, help="evaluations during a full-budget run, the last at the end"
    )
    parser.add_argument("--eval_rows", type=int, default=80, help="held-out rows measured (of 80)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one torch thread each")
    parser.add_argument(
        "--resume", type=Path, default=None, help="keep the finished runs of a <out>.runs.jsonl and do the others"
    )
    parser.add_argument(
        "--report_from", type=Path, default=None, help="write the report from a <out>.runs.jsonl of finished runs"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "set_vs_sft",
        help="where <out>.md, .png, .json go (default: benchmarks/set_vs_sft, or set_vs_sft_<data name> with --data)",
    )
    if parser.parse_known_args(argv)[0].quick:  # its sizes are defaults: flags given with --quick still win
        parser.set_defaults(
            seeds=[0], max_steps=20, evals=1, eval_rows=10, out=parser.get_default("out").with_name("set_vs_sft_quick")
        )
    args = parser.parse_args(argv)
    check_methods(args.methods)
    if (args.model is None) != (args.data is None):
        parser.error("--model and --data go together: a model trained on a dataset of your own.")
    if args.lora and args.model is None:
        parser.error("--lora needs --model and --data (the demo's tasks are measured with full fine-tuning).")
    if args.lora_r is not None and not args.lora:
        parser.error("--lora_r is the rank of --lora: add --lora, or drop --lora_r.")
    if args.model is None and (args.max_length or args.max_new_tokens):
        parser.error("--max_length and --max_new_tokens size a task of your own: add --model and --data.")
    check_optional_imports()
    args.lora_r = args.lora_r or 16
    tasks = dict(TASKS)
    if args.model is not None:
        args.model, args.data = resolve_demo_path(args.model), resolve_demo_path(args.data)
        name = Path(args.data.rstrip("/")).name.removesuffix(".jsonl").removesuffix(".json") or "custom"
        tasks = {name: custom_task(args)}
        args.tasks = [name]
        if args.out == parser.get_default("out"):  # the demo's own results stay as they are
            args.out = args.out.with_name(f"set_vs_sft_{name}")
    methods = [m for m in METHODS if m in args.methods]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if len(args.seeds) < 3:
        print("note: fewer than 3 seeds; the spread is not meaningful")
    if args.quick:
        print(
            f"note: --quick trains {args.max_steps} steps, far too few for any method to learn the tasks: expect "
            "answer-set figures at or near 0. It checks that every method and task runs; the comparison is the "
            "full run."
        )
    settings = {
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "eval_rows": args.eval_rows,
        "lora_r": args.lora_r if args.lora else 0,
        "tasks": tasks,
        "invocation": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    runs_file = args.out.with_suffix(".runs.jsonl")
    start, ran_now = time.perf_counter(), 0
    if args.report_from:  # the report of runs already done (e.g. a run cut short: its finished runs)
        results = [json.loads(line) for line in args.report_from.read_text().splitlines() if line.strip()]
        methods = [m for m in methods if any(r["job"]["method"] == m for r in results)]
    else:
        results = []
        if args.resume:  # runs finished earlier (their <out>.runs.jsonl) are kept, not run again
            results = [json.loads(line) for line in args.resume.read_text().splitlines() if line.strip()]
        done = {tuple(r["job"][k] for k in ("task", "budget", "seed", "method")) for r in results}
        jobs = [
            job for job in make_jobs(args, methods, tasks) if (job.task, job.budget, job.seed, job.method) not in done
        ]
        # Each finished run is saved at once, so a run cut short keeps what it finished (see --report_from).
        with runs_file.open("w") as saved, multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for result in results:
                saved.write(json.dumps(result) + "\n")
            for result in pool.imap_unordered(_run_in_worker, [(job, settings) for job in jobs], chunksize=1):
                results.append(result)
                saved.write(json.dumps(result) + "\n")
                saved.flush()
                ran_now += 1
            # Workers that exit on their own release what they hold; the `with` block alone would terminate them, and
            # the semaphores they made would be reported leaked at shutdown.
            pool.close()
            pool.join()
    wall = time.perf_counter() - start
    add_step_time_ratios(results)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "wall_seconds": wall,
                "ran_now": ran_now,
                "runs": results,
            },
            indent=1,
        )
    )
    write_report(results, args, methods, wall, ran_now, args.out.with_suffix(".md"))
    plot(results, methods, args, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
