"""Does the set loss help? Plain SFT against SFT + set loss on the demo data: same model, seeds, data and budget.

    python benchmarks/set_vs_sft.py [--seeds 0 1 2] [--max_steps 480] [--out benchmarks/set_vs_sft]

For each seed, the demo's tiny pretrained Llama (`trl_qaloss/demo/model`) is fully fine-tuned twice on the demo's
train split (400 rows, every answer list in random order), with the same seed, data order, optimizer and steps:
`lambda_set=0` (exactly `SFTTrainer`) and `lambda_set=1` (`lambda_ce=1` in both). At evaluations spread over training
both are measured the same way on the held-out split (`data/eval.jsonl`, 80 rows):

- answer-set metrics of greedy completions of all 80 prompts (`QASetEvalCallback`, `answer_set_scores`);
- the SFT cross-entropy (mean over completion tokens) and the set loss (mean over target answer tokens) of the
  teacher-forced completions, computed here by the same code for both runs.

Writes `<out>.md` (tables: mean and standard deviation over seeds, per-seed values, the paired difference) and
`<out>.png` (held-out set-F1, cross-entropy and set loss, and the training cross-entropy, over steps).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from trl_qaloss import QALossConfig, QALossSFTTrainer, QASeparators, set_matching_loss
from trl_qaloss.data import load_qa_dataset
from trl_qaloss.demo import DATA_DIR, MODEL_DIR

METHODS = {"plain SFT": 0.0, "SFT + set loss": 1.0}
METRICS = [  # (key in the final evaluation, label, format)
    ("eval_set_f1", "set-F1", "{:.3f}"),
    ("eval_set_precision", "set precision", "{:.3f}"),
    ("eval_set_recall", "set recall", "{:.3f}"),
    ("eval_matched_question_set_f1", "set-F1 on questions asked right", "{:.3f}"),
    ("eval_soft_f1", "soft-F1", "{:.3f}"),
    ("eval_cardinality_error", "cardinality error", "{:.3f}"),
    ("eval_questions_matched", "questions matched (of {expected:.0f})", "{:.1f}"),
    ("eval_parse_failures", "parse failures (of {examples:.0f})", "{:.1f}"),
    ("heldout_ce", "held-out SFT cross-entropy", "{:.4f}"),
    ("heldout_set_loss", "held-out set loss", "{:.4f}"),
]


class HeldOutLosses(TrainerCallback):
    """At each evaluation: token-mean cross-entropy and set loss of the eval split, the same code for every run."""

    def __init__(self, trainer, separators: QASeparators):
        self.trainer, self.separators, self.history = trainer, separators, []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        model = self.trainer.model
        nll = tokens = set_sum = set_tokens = 0.0
        with torch.no_grad():
            for batch in self.trainer.get_eval_dataloader():
                batch = {k: v.to(model.device) for k, v in batch.items()}
                labels = batch.pop("labels")
                logits = model(**batch).logits.float()
                targets = labels[:, 1:]
                nll += F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="sum").item()
                tokens += (targets != -100).sum().item()
                out = set_matching_loss(logits, labels, self.separators, reduction="sum")
                set_sum += out.loss.item()
                set_tokens += out.stats["target_tokens"]
        values = {"heldout_ce": nll / tokens, "heldout_set_loss": set_sum / max(set_tokens, 1)}
        metrics.update(values)
        self.history.append({"step": state.global_step, **values})


def run(method: str, seed: int, args: argparse.Namespace, out_dir: str) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    demo = load_qa_dataset(str(DATA_DIR))  # splits "train" and "test" (eval.jsonl)
    config = QALossConfig(
        output_dir=out_dir,
        seed=seed,
        data_seed=seed,
        lambda_ce=1.0,
        lambda_set=METHODS[method],
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=args.max_steps // 20,
        weight_decay=0.0,
        max_length=128,
        eval_strategy="steps",
        eval_steps=args.max_steps // args.evals,
        per_device_eval_batch_size=40,
        eval_generate_samples=80,
        eval_generate_batch_size=40,
        eval_max_new_tokens=80,
        logging_steps=max(args.max_steps // 24, 1),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = QALossSFTTrainer(
        model=model,
        args=config,
        train_dataset=demo["train"],
        eval_dataset=demo["test"],
        processing_class=tokenizer,
    )
    losses = HeldOutLosses(trainer, QASeparators.from_tokenizer(tokenizer))
    trainer.add_callback(losses)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    evals = [e for e in history if "eval_set_f1" in e]
    curves = {
        "step": [e["step"] for e in evals],
        "set_f1": [e["eval_set_f1"] for e in evals],
        "matched_set_f1": [e["eval_matched_question_set_f1"] for e in evals],
        "cardinality_error": [e["eval_cardinality_error"] for e in evals],
        "heldout_ce": [h["heldout_ce"] for h in losses.history],
        "heldout_set_loss": [h["heldout_set_loss"] for h in losses.history],
        # lambda_set=0 trains exactly like SFTTrainer, whose `loss` is then the cross-entropy.
        "train_step": [e["step"] for e in history if "loss" in e and "train_runtime" not in e],
        "train_ce": [e.get("ce_loss", e["loss"]) for e in history if "loss" in e and "train_runtime" not in e],
    }
    final = {**evals[-1], **losses.history[-1]}
    print(
        f"{method:>15} seed {seed}: set-F1 {final['eval_set_f1']:.3f}  held-out CE {final['heldout_ce']:.4f}  "
        f"set loss {final['heldout_set_loss']:.4f}  ({seconds:.0f} s)",
        flush=True,
    )
    return {"final": final, "curves": curves, "seconds": seconds}


def mean_std(values: list[float], fmt: str, signed: bool = False) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    mean = fmt.format(statistics.mean(values))
    return f"{'+' if signed and not mean.startswith('-') else ''}{mean} ± {fmt.format(std)}"


def write_table(results: dict, args: argparse.Namespace, wall: float, path: Path) -> None:
    seeds = args.seeds
    first = results["plain SFT"][seeds[0]]["final"]
    counts = {"expected": first["eval_questions_expected"], "examples": first["eval_num_examples"]}
    names = list(METHODS)
    lines = [
        f"Held-out split (80 rows), after {args.max_steps} steps (batch {args.batch_size}, lr {args.learning_rate}, "
        f"cosine), mean ± standard deviation over seeds {', '.join(map(str, seeds))}; greedy decoding.",
        "",
        f"| metric | {' | '.join(names)} | difference (set loss − plain) |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for key, label, fmt in METRICS:
        per_method = [[results[m][s]["final"][key] for s in seeds] for m in names]
        diffs = [b - a for a, b in zip(*per_method, strict=True)]
        cells = [mean_std(v, fmt) for v in per_method] + [mean_std(diffs, fmt, signed=True)]
        lines.append(f"| {label.format(**counts)} | {' | '.join(cells)} |")
    lines += [
        "",
        "Per seed (set-F1 / held-out cross-entropy):",
        "",
        f"| seed | {' | '.join(names)} |",
        "|---|" + "---:|" * len(names),
    ]
    for s in seeds:
        cells = [
            f"{results[m][s]['final']['eval_set_f1']:.3f} / {results[m][s]['final']['heldout_ce']:.4f}" for m in names
        ]
        lines.append(f"| {s} | {' | '.join(cells)} |")
    run_times = [r["seconds"] for m in names for r in results[m].values()]
    lines += [
        "",
        f"Wall time: {wall / 60:.1f} min for {len(run_times)} runs "
        f"({statistics.mean(run_times):.0f} s per run on average, training and evaluations).",
    ]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(results: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("set_f1", "step", "held-out set-F1 (greedy)"),
        ("matched_set_f1", "step", "held-out set-F1, questions asked right"),
        ("cardinality_error", "step", "held-out cardinality error"),
        ("heldout_ce", "step", "held-out SFT cross-entropy"),
        ("heldout_set_loss", "step", "held-out set loss"),
        ("train_ce", "train_step", "training SFT cross-entropy"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    axes = axes.ravel()
    for ax, (key, x_key, title) in zip(axes, panels, strict=True):
        for (method, runs), color in zip(results.items(), ("tab:blue", "tab:orange"), strict=False):
            curves = [r["curves"] for r in runs.values()]
            steps = curves[0][x_key]
            values = torch.tensor([c[key] for c in curves])
            ax.plot(steps, values.mean(0), color=color, label=method, marker="o" if x_key == "step" else None)
            ax.fill_between(steps, values.min(0).values, values.max(0).values, color=color, alpha=0.2)
        ax.set_title(title)
        if key == "train_ce":
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.set_ylim(0, 1)
    axes[0].legend(loc="upper right")
    fig.suptitle(f"Demo data, held-out split, {len(args.seeds)} seeds: mean (line) and min-max (band)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=480)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--evals", type=int, default=6, help="evaluations during training, the last at the end")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the tiny model runs fastest on one)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "set_vs_sft")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if len(args.seeds) < 3:
        print("note: fewer than 3 seeds; the spread is not meaningful")
    start = time.perf_counter()
    results = {method: {} for method in METHODS}
    for seed in args.seeds:
        for method in METHODS:
            with tempfile.TemporaryDirectory() as out_dir:
                results[method][seed] = run(method, seed, args, out_dir)
    wall = time.perf_counter() - start
    write_table(results, args, wall, args.out.with_suffix(".md"))
    plot(results, args, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
