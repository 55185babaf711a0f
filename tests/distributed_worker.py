"""One optimizer step of `QALossSFTTrainer` that saves the logged losses and the gradients it stepped with.

Run by `tests/test_distributed.py`, once in-process and once under `accelerate launch --num_processes 2`:
`python tests/distributed_worker.py OUT_DIR WORLD_SIZE`. Each setting trains on the same global batch of 8 rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from tests.testing_utils import WORDS, build_tokenizer, qa_config, qa_dataset, tiny_llama
from trl_qaloss import QALossSFTTrainer

GLOBAL_BATCH = 8
# (name, config overrides): the CE and set terms, each reduction, each answer order, and gradient accumulation on top
# of the processes.
SETTINGS = {
    "both_mean": dict(lambda_ce=1.0, lambda_set=1.0),
    "set_mean": dict(lambda_ce=0.0, lambda_set=1.0),
    "set_sum": dict(lambda_ce=0.0, lambda_set=1.0, set_loss_reduction="sum"),
    # Each answer order, with both terms, and "aligned" with the CE term alone (the plain SFTTrainer loss).
    "canonical": dict(lambda_ce=1.0, lambda_set=1.0, answer_order="canonical"),
    "appearance": dict(lambda_ce=1.0, lambda_set=1.0, answer_order="appearance"),
    "preferred": dict(lambda_ce=1.0, lambda_set=1.0, answer_order="preferred"),
    "aligned": dict(lambda_ce=1.0, lambda_set=1.0, answer_order="aligned"),
    "aligned_ce": dict(lambda_ce=1.0, lambda_set=0.0, answer_order="aligned"),
}


def copying_llama(vocab_size: int):
    """A tiny Llama that predicts its input token: its teacher-forced predictions hold items, one position early.

    A random model predicts no item, so every answer is missing and the set term has no gradient to compare.
    """
    model = tiny_llama(vocab_size)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(50)
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    return model


def swapping_llama(tokenizer):
    """A copying Llama (see `copying_llama`) that says another word for each word of the data (pairs of words swap
    places): its answers come in another order than the target's, so "aligned" moves them."""
    model = copying_llama(len(tokenizer))
    words = [ids[0] for ids in (tokenizer.encode(" " + w) for w in WORDS) if len(ids) == 1]
    perm = torch.arange(len(tokenizer))
    perm[words[0::2][: len(words) // 2]], perm[words[1::2][: len(words) // 2]] = (
        torch.tensor(words[1::2][: len(words) // 2]),
        torch.tensor(words[0::2][: len(words) // 2]),
    )
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight[perm])
    return model


class KeepGradients(TrainerCallback):
    """Copies the gradients right before the optimizer step: accumulated, and all-reduced across processes."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def one_step_config(out_dir, world_size: int = 1, accumulation: int = 1, **overrides):
    """The config of one unclipped step on `GLOBAL_BATCH` rows split over `world_size` processes x `accumulation`."""
    return qa_config(
        out_dir,
        per_device_train_batch_size=GLOBAL_BATCH // (world_size * accumulation),
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        max_grad_norm=0.0,
        **overrides,
    )


def train_one_step(out_dir, world_size: int = 1, accumulation: int = 1, **overrides):
    """`(logged loss, {name: gradient})` of one step on the first `GLOBAL_BATCH` rows (sequential order)."""
    tokenizer = build_tokenizer()
    args = one_step_config(out_dir, world_size, accumulation, **overrides)
    keep = KeepGradients()
    trainer = QALossSFTTrainer(
        model=copying_llama(len(tokenizer)),
        args=args,
        train_dataset=qa_dataset(GLOBAL_BATCH),
        processing_class=tokenizer,
        callbacks=[keep],
    )
    trainer.train()
    return trainer.state.log_history[0]["loss"], keep.grads, trainer


def main(out_dir: str, world_size: int) -> None:
    results = {}
    for name, overrides in SETTINGS.items():
        loss, grads, trainer = train_one_step(Path(out_dir) / name, world_size, accumulation=2, **overrides)
        assert trainer.args.world_size == world_size, trainer.args.world_size
        results[name] = {"loss": loss, "grads": grads, "set_loss": trainer.state.log_history[0].get("set_loss")}
    if trainer.accelerator.is_main_process:
        torch.save(results, Path(out_dir) / "results.pt")


if __name__ == "__main__":
    from trl_qaloss.cli.training import end_processes

    main(sys.argv[1], int(sys.argv[2]))
    end_processes()  # as `trl-qaloss train` does: a launch whose run finished exits 0
