"""Scorers: `ModelScorer`, which the trainer's "preferred" and "aligned" read (forwards without gradient, dropout off,
only what is read), gives the scores of the full logits (`LogitsScorer`), with the backbone and LM head apart or
through the wrapped model's forward (the path under FSDP and DeepSpeed), LoRA dropout included."""

from __future__ import annotations

import pytest
import torch

from tests.distributed_worker import swapping_llama
from tests.testing_utils import first_batch, qa_config, qa_dataset
from trl_qaloss import QALossSFTTrainer, reorder_answers
from trl_qaloss.engine.options import MODEL_ORDERS
from trl_qaloss.engine.scoring import LogitsScorer, ModelScorer, accepts_logits_to_keep


@pytest.fixture
def lora_trainer(tokenizer, tmp_path):
    from peft import LoraConfig

    # Random LoRA weights (PEFT starts B at zero): dropout on the LoRA inputs then changes the outputs.
    peft_config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.5,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    return QALossSFTTrainer(
        model=swapping_llama(tokenizer),
        args=qa_config(tmp_path, lambda_set=0.0, answer_order="aligned"),
        train_dataset=qa_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def full_logits(model, batch) -> torch.Tensor:
    """`[B, T, V]` logits of an eval-mode forward on the batch as given."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train()
    return logits


def model_scorer(trainer, batch, split: bool, keeps_logits: bool = True) -> ModelScorer:
    trainer.model.train()  # as in training: dropout on, which the scorer must turn off
    return ModelScorer(trainer.model, batch, keeps_logits, trainer.model if split else None)


@pytest.mark.parametrize("split", [True, False], ids=["backbone-and-head", "wrapped-forward"])
def test_argmax_equals_the_full_logits(lora_trainer, split):
    batch = first_batch(lora_trainer)
    targets = batch["labels"][:, 1:]
    expected = LogitsScorer(full_logits(lora_trainer.model, batch)).argmax(targets)
    assert torch.equal(model_scorer(lora_trainer, batch, split).argmax(targets), expected)
    assert (expected[targets == -100] == 0).all()


@pytest.mark.parametrize("keeps_logits", [True, False], ids=["logits_to_keep", "all-logits"])
def test_logits_at_equals_the_full_logits(lora_trainer, keeps_logits):
    batch = first_batch(lora_trainer)
    assert accepts_logits_to_keep(lora_trainer.model)
    logits = full_logits(lora_trainer.model, batch)
    length = logits.size(1)
    for positions in (torch.tensor([3, 7, 8]), torch.arange(length - 4, length), torch.tensor([0, length - 1])):
        got = model_scorer(lora_trainer, batch, split=False, keeps_logits=keeps_logits).logits_at(positions)
        assert not got.requires_grad
        torch.testing.assert_close(got, LogitsScorer(logits).logits_at(positions), rtol=1e-5, atol=1e-5)


def test_logits_at_a_middle_run_and_a_single_middle_position(lora_trainer):
    """Adjacent positions that stop before the row's end, and one position in the middle, are contiguous but are no
    tail: `logits_to_keep` must get them as an index tensor. Kept as an int (a count from the end), they would read
    the last positions' logits instead."""
    batch = first_batch(lora_trainer)
    logits = full_logits(lora_trainer.model, batch)
    length = logits.size(1)
    for positions in (torch.arange(2, 6), torch.arange(length - 5, length - 1), torch.tensor([length // 2])):
        assert int(positions[-1]) < length - 1
        got = model_scorer(lora_trainer, batch, split=False).logits_at(positions)
        torch.testing.assert_close(got, logits[:, positions], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", MODEL_ORDERS)
@pytest.mark.parametrize("split", [True, False], ids=["backbone-and-head", "wrapped-forward"])
def test_the_model_orders_like_its_full_logits(lora_trainer, order, split):
    batch = first_batch(lora_trainer)
    args = (batch["input_ids"], batch["labels"], lora_trainer.separators, order)
    expected = reorder_answers(*args, logits=full_logits(lora_trainer.model, batch))
    ours = reorder_answers(*args, scorer=model_scorer(lora_trainer, batch, split))
    assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])
    if order == "aligned":  # the swapping model's answers come in another order than the data's
        assert not torch.equal(ours[0], batch["input_ids"])


def test_scoring_leaves_the_model_training(lora_trainer):
    batch = first_batch(lora_trainer)
    scorer = model_scorer(lora_trainer, batch, split=True)
    scorer.argmax(batch["labels"][:, 1:])
    scorer.logits_at(torch.tensor([1, 2]))
    assert all(m.training for m in lora_trainer.model.modules() if isinstance(m, torch.nn.Dropout))
