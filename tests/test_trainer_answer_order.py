"""`answer_order` in `QALossSFTTrainer`: both loss terms train on the reordered batch, and with `lambda_set=0` the
loss is exactly `SFTTrainer`'s on it."""

from __future__ import annotations

import copy

import pytest
import torch
from trl import SFTConfig, SFTTrainer

from tests.distributed_worker import copying_llama, swapping_llama
from tests.testing_utils import (
    WORDS,
    config_values,
    first_batch,
    grounded_rows,
    nf4_quantization,
    qa_config,
    qa_dataset,
    tiny_llama,
)
from trl_qaloss import QALossSFTTrainer, reorder_answers, set_matching_loss
from trl_qaloss.engine.scoring import ModelScorer

MODES = ("canonical", "appearance", "preferred", "aligned")


def reordered(model, batch, seps, order, tokenizer):
    """The batch reordered by `reorder_answers` from the full logits of an eval-mode forward."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train()
    ids, labels = reorder_answers(batch["input_ids"], batch["labels"], seps, order, logits=logits, tokenizer=tokenizer)
    return {**batch, "input_ids": ids, "labels": labels}


def trained_input_ids(trainer, batch) -> list[torch.Tensor]:
    """The `input_ids` of each forward of one training-mode `compute_loss` on `batch`: what the model trains on."""
    seen = []
    hook = trainer.model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    trainer.model.train()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(batch))
    hook.remove()
    return seen


@pytest.mark.parametrize("order", MODES)
def test_lambda_set_zero_is_sft_on_the_reordered_batch(tokenizer, tmp_path, order):
    model = swapping_llama(tokenizer)
    trainer = QALossSFTTrainer(
        model=copy.deepcopy(model),
        args=qa_config(tmp_path, lambda_set=0.0, answer_order=order),
        train_dataset=qa_dataset(),
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    expected_batch = reordered(trainer.model, batch, trainer.separators, order, tokenizer)
    assert not torch.equal(expected_batch["input_ids"], batch["input_ids"])  # the batch does change
    trainer.model.train()
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(batch))
    sft = SFTTrainer(
        model=copy.deepcopy(model),
        args=SFTConfig(**config_values(tmp_path)),
        train_dataset=qa_dataset(),
        processing_class=tokenizer,
    )
    sft.model.train()
    with torch.no_grad():
        expected = sft.compute_loss(sft.model, dict(expected_batch))
        on_data_order = sft.compute_loss(sft.model, dict(batch))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=0)
    assert not torch.isclose(ours, on_data_order, rtol=1e-6)


@pytest.mark.parametrize("order", MODES)
def test_both_terms_read_the_reordered_batch(tokenizer, tmp_path, order):
    model = swapping_llama(tokenizer)
    args = qa_config(tmp_path, lambda_ce=0.0, lambda_set=1.0, answer_order=order, set_loss_reduction="sum")
    trainer = QALossSFTTrainer(model=model, args=args, train_dataset=qa_dataset(), processing_class=tokenizer)
    batch = first_batch(trainer)
    expected_batch = reordered(trainer.model, batch, trainer.separators, order, tokenizer)
    trainer.model.train()
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(batch))
        logits = trainer.model(input_ids=expected_batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = set_matching_loss(logits, expected_batch["labels"], trainer.separators, reduction="sum").loss
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_evaluation_reads_the_targets_as_given(tokenizer, tmp_path):
    model = copying_llama(len(tokenizer))
    losses = []
    for order in ("data", "canonical"):
        args = qa_config(tmp_path / order, lambda_set=0.0, answer_order=order, per_device_eval_batch_size=4)
        trainer = QALossSFTTrainer(
            model=copy.deepcopy(model),
            args=args,
            train_dataset=qa_dataset(),
            eval_dataset=qa_dataset(8, seed=1),
            processing_class=tokenizer,
        )
        losses.append(trainer.evaluate()["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize("order", MODES)
@pytest.mark.parametrize("lambda_set", [0.0, 1.0])
def test_each_mode_trains_lora(tokenizer, tmp_path, order, lambda_set):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    args = qa_config(tmp_path, max_steps=3, answer_order=order, lambda_set=lambda_set)
    trainer = QALossSFTTrainer(
        model=copying_llama(len(tokenizer)),
        args=args,
        train_dataset=qa_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("order", MODES)
def test_each_mode_trains_qlora_4bit(tokenizer, tmp_path, order):
    import bitsandbytes as bnb
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "base")
    quantization = nf4_quantization(torch.float32)
    model4 = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = QALossSFTTrainer(
        model=model4,
        args=qa_config(tmp_path / "out", max_steps=2, answer_order=order),
        train_dataset=qa_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "set_loss" in e]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor([e["loss"], e["set_loss"]])).all() for e in logs)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())


@pytest.mark.parametrize("order", ("data", *MODES))
@pytest.mark.parametrize("lambda_set", [0.0, 1.0])
def test_gradient_accumulation_matches_one_big_batch(tokenizer, tmp_path, order, lambda_set):
    """2 micro-batches of 2 with accumulation give the loss and update of one batch of 4, in every mode."""
    results = []
    for batch_size, steps in ((4, 1), (2, 2)):
        model = copying_llama(len(tokenizer))
        args = qa_config(
            tmp_path / f"ga{steps}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=steps,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
            answer_order=order,
            lambda_set=lambda_set,
        )
        trainer = QALossSFTTrainer(model=model, args=args, train_dataset=qa_dataset(8), processing_class=tokenizer)
        trainer.train()
        results.append((trainer.state.log_history[0]["loss"], [p.detach().clone() for p in model.parameters()]))
    (loss_big, params_big), (loss_acc, params_acc) = results
    assert loss_acc == pytest.approx(loss_big, rel=1e-4)
    for big, acc in zip(params_big, params_acc, strict=True):
        torch.testing.assert_close(acc, big, rtol=1e-4, atol=1e-5)


def test_model_vocabulary_larger_than_the_tokenizer(tokenizer, tmp_path):
    """Padded embeddings: the model predicts ids the tokenizer does not have (they parse as skip tokens)."""
    model = tiny_llama(len(tokenizer) + 300, seed=1)
    trainer = QALossSFTTrainer(
        model=model,
        args=qa_config(tmp_path, answer_order="aligned", lambda_set=0.0),
        train_dataset=qa_dataset(),
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    scorer = ModelScorer(trainer.model, batch, keeps_logits=True, unwrapped_model=trainer.model)
    assert int(scorer.argmax(batch["labels"][:, 1:]).max()) >= len(tokenizer)
    trainer.train()


def test_a_batch_whose_largest_item_has_two_answers_is_reordered(tokenizer, tmp_path):
    """The reordering skips a batch only when no item has two answers: two are enough."""
    from datasets import Dataset

    from trl_qaloss.engine.separators import QASeparators

    words = sorted((ids[0], w) for w in WORDS for ids in [tokenizer.encode(" " + w)] if len(ids) == 1)
    (_, low), (_, high) = words[0], words[-1]
    rows = [{"prompt": "context:", "completion": f" <QA> who wrote it? <A> {high} <A> {low} <QA> where? <A> {low}"}]
    trainer = QALossSFTTrainer(
        model=tiny_llama(len(tokenizer)),
        args=qa_config(tmp_path, lambda_set=0.0, answer_order="canonical"),
        train_dataset=Dataset.from_list(rows * 4),
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    seps = QASeparators.from_tokenizer(tokenizer)
    expected, _ = reorder_answers(batch["input_ids"], batch["labels"], seps, "canonical")
    assert not torch.equal(expected, batch["input_ids"])  # sorted, the low id comes first
    seen = trained_input_ids(trainer, batch)
    assert len(seen) == 1 and torch.equal(seen[0], expected)


def test_sharded_parameters_are_scored_through_the_wrapped_forward(tokenizer, tmp_path):
    """FSDP and DeepSpeed gather the parameters only in the wrapped model's forward: there "aligned" scores with a
    second forward of the whole model, elsewhere with the backbone alone and the LM head in chunks."""
    trainer = QALossSFTTrainer(
        model=swapping_llama(tokenizer),
        args=qa_config(tmp_path, lambda_set=0.0, answer_order="aligned"),
        train_dataset=qa_dataset(),
        processing_class=tokenizer,
    )
    assert not trainer._params_sharded
    batch = first_batch(trainer)
    calls = []
    hook = trainer.model.register_forward_pre_hook(lambda module, args: calls.append(module))
    trainer.model.train()
    losses = []
    for sharded, model_forwards in ((False, 1), (True, 2)):
        trainer._params_sharded = sharded
        calls.clear()
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, dict(batch)))
        assert len(calls) == model_forwards
    hook.remove()
    assert torch.equal(losses[0], losses[1])


def test_config_rejects_an_unknown_order(tmp_path):
    with pytest.raises(ValueError, match="answer_order"):
        qa_config(tmp_path, answer_order="sorted")


def test_no_separators_needed_without_set_loss_or_reordering(tmp_path):
    """`lambda_set=0` with the data order is `SFTTrainer`: a tokenizer without the separators is fine."""
    from tests.testing_utils import build_tokenizer

    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    trainer = QALossSFTTrainer(
        model=tiny_llama(vocab),
        args=qa_config(tmp_path, lambda_set=0.0, qa_token="<Q>"),
        train_dataset=qa_dataset(),
        processing_class=tokenizer,
    )
    assert trainer.separators is None and len(tokenizer) == vocab


def test_appearance_reads_each_packed_sequence_prompt(tokenizer, tmp_path):
    """Packed rows: the batch the model trains on is the reference's, each item reading its own sequence's prompt."""
    from datasets import Dataset

    from trl_qaloss.data import format_qas
    from trl_qaloss.engine.reference import reorder_answers_reference

    args = qa_config(tmp_path, packing=True, max_length=128, lambda_set=0.0, answer_order="appearance")
    trainer = QALossSFTTrainer(
        model=tiny_llama(len(tokenizer)),
        args=args,
        train_dataset=Dataset.from_list([format_qas(row) for row in grounded_rows(16)]),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))  # on the CPU, as the trainer is
    assert int((batch["position_ids"] == 0).sum()) > batch["input_ids"].size(0)  # several sequences in a row
    rows = (batch["input_ids"], batch["labels"], trainer.separators)
    kwargs = dict(position_ids=batch["position_ids"], tokenizer=tokenizer)
    expected, _ = reorder_answers_reference(*rows, "appearance", **kwargs)
    canonical, _ = reorder_answers(*rows, "canonical", **kwargs)
    assert not torch.equal(expected, canonical)
    seen = trained_input_ids(trainer, batch)
    assert len(seen) == 1 and torch.equal(seen[0], expected)
