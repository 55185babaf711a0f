"""Training-step time of each `answer_order` against `"data"`, on the same model and batch, ratios taken in one run.

    python benchmarks/answer_order_step.py              # tiny Llama of the tests and a small Llama (V=32000), CPU
    python benchmarks/answer_order_step.py --repeats 5

For `lambda_set` 0 (plain SFT loss on the reordered batch) and 1 (both terms), each mode's `training_step` (the
reordering, its scoring forward when the mode has one, the training forward, the loss and the backward) is timed
against `answer_order="data"` with the same `lambda_set`. Times are medians of `--repeats` rounds after a warm-up; in
each round every setting takes one step, so that load from other jobs spreads over all settings alike. 1 torch
thread.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from benchmark_utils import build_tokenizer, config_values, qa_rows, small_llama, tiny_llama

from trl_qaloss import ANSWER_ORDERS, QALossConfig, QALossSFTTrainer


def step_times(load_model, tokenizer, repeats: int) -> dict[tuple[float, str], float]:
    """`{(lambda_set, answer_order): median seconds of training_step}` on one batch of 8 rows of 256 tokens.

    Every setting gets its own trainer (a fresh model each) first; then the settings are timed in turns, one step
    each per round, so that a change in the machine's load hits them all alike.
    """
    values = config_values("unused", per_device_train_batch_size=8, max_length=256, logging_steps=1000, max_steps=1)
    dataset = qa_rows(32, values["max_length"])
    steps, batch = {}, None
    with tempfile.TemporaryDirectory() as out:
        for lambda_set in (0.0, 1.0):
            for order in ANSWER_ORDERS:
                args = QALossConfig(**dict(values, output_dir=out, lambda_set=lambda_set, answer_order=order))
                trainer = QALossSFTTrainer(
                    model=load_model(), args=args, train_dataset=dataset, processing_class=tokenizer
                )
                if batch is None:  # the same batch for every setting
                    batch = dict(next(iter(trainer.get_train_dataloader())))
                num_items = (batch["labels"][:, 1:] != -100).sum()

                def step(trainer=trainer, batch=batch, num_items=num_items):
                    trainer.training_step(trainer.model, dict(batch), num_items_in_batch=num_items)

                step()  # warm-up: allocates the gradients
                steps[lambda_set, order] = step
        samples = {key: [] for key in steps}
        for _ in range(repeats):
            for key, step in steps.items():
                start = time.perf_counter()
                step()
                samples[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as benchmarks/run.py: steadier on a shared machine
    tokenizer = build_tokenizer()
    models = {
        "tiny Llama (tests: hidden 32, 2 layers, V=600)": lambda: tiny_llama(len(tokenizer)),
        "small Llama (hidden 256, 4 layers, V=32000)": small_llama,
    }
    lines = ["| model | lambda_set | " + " | ".join(ANSWER_ORDERS) + " |", "|---|---:|" + "---:|" * len(ANSWER_ORDERS)]
    for name, load in models.items():
        times = step_times(load, tokenizer, args.repeats)
        for lambda_set in (0.0, 1.0):
            base = times[lambda_set, "data"]
            cells = [f"{times[lambda_set, o] * 1e3:.0f} ms ({times[lambda_set, o] / base:.2f}x)" for o in ANSWER_ORDERS]
            lines.append(f"| {name} | {lambda_set:g} | " + " | ".join(cells) + " |")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch [8, 256]")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
