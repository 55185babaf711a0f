"""Packed (padding-free) rows, padding sides, completion-only and assistant-only labels."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from datasets import Dataset

from tests.testing_utils import CHAT_TEMPLATE, STAT_KEYS, encode_pair, qa_config, qa_dataset, random_batch, tiny_llama
from trl_qaloss import QALossSFTTrainer, set_matching_loss
from trl_qaloss.engine.reference import set_matching_loss_reference

COUNT_KEYS = ("target_answers", "target_tokens", "matched", "missing", "extra")


def pack(logits_list, labels_list):
    """One padding-free row from several sequences, as TRL's collator builds it: position ids restart at 0 and the
    first label of each sequence is masked."""
    logits = torch.cat(logits_list, dim=1)
    labels = torch.cat(labels_list, dim=1).clone()
    position_ids = torch.cat([torch.arange(lb.size(1)) for lb in labels_list])[None]
    labels[position_ids == 0] = -100
    return logits, labels, position_ids


def separate(seps, logits_list, labels_list):
    """The loss of each sequence on its own, summed, and the summed counts."""
    outs = [set_matching_loss(lg, lb, seps, reduction="sum") for lg, lb in zip(logits_list, labels_list, strict=True)]
    return sum(o.loss for o in outs), {k: sum(o.stats[k] for o in outs) for k in COUNT_KEYS}


@pytest.mark.parametrize("seed", range(12))
def test_packed_row_is_the_sum_of_its_sequences(seps, tokenizer, seed):
    vocab = len(tokenizer)
    pieces = [
        random_batch(seps, vocab, batch=1, length=20 + 7 * k + seed, seed=100 * seed + k, agree=0.6) for k in range(3)
    ]
    logits_list = [lg.requires_grad_(True) for lg, _ in pieces]
    labels_list = [lb for _, lb in pieces]
    expected, expected_stats = separate(seps, logits_list, labels_list)
    logits, labels, position_ids = pack([lg.detach() for lg in logits_list], labels_list)
    logits.requires_grad_(True)
    out = set_matching_loss(logits, labels, seps, reduction="sum", position_ids=position_ids)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    assert {k: out.stats[k] for k in COUNT_KEYS} == expected_stats
    ref = set_matching_loss_reference(logits, labels, seps, reduction="sum", position_ids=position_ids)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    for key in STAT_KEYS:
        assert out.stats[key] == pytest.approx(ref.stats[key]), key
    # The gradient of each sequence is the one it gets on its own.
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(logits.grad, torch.cat([lg.grad for lg in logits_list], dim=1), rtol=1e-4, atol=1e-6)


def test_an_item_never_spans_two_sequences(tokenizer, seps):
    """The first sequence predicts an extra item: without boundaries it would be paired with the second's item."""
    # The first target answer is long enough for the predicted extra item to sit on labelled positions.
    first = encode_pair(tokenizer, "<QA> who? <A> ann the a of in the a", "<QA> who? <A> ann <QA> where? <A> rome")
    second = encode_pair(tokenizer, "<QA> where? <A> paris <A> rome", "<QA> where? <A> rome <A> paris")
    logits_list, labels_list = [first[0], second[0]], [first[1], second[1]]
    expected, stats = separate(seps, logits_list, labels_list)
    logits, labels, position_ids = pack(logits_list, labels_list)
    out = set_matching_loss(logits, labels, seps, reduction="sum", position_ids=position_ids)
    torch.testing.assert_close(out.loss, expected)
    assert stats["matched"] == 3 and out.stats["matched"] == 3
    joined = set_matching_loss(logits, labels, seps, reduction="sum")
    assert joined.stats["matched"] < 3


def test_sequence_starts_are_read_from_the_position_ids():
    """Target p is token p + 1 (token first + 1 + p when the logits start at `first`): it starts a sequence where its
    position id is 0."""
    from trl_qaloss.engine.parsing import seq_starts_from

    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    assert seq_starts_from(None) is None
    assert seq_starts_from(position_ids).tolist() == [[False, False, True, False, True, False, False]]
    assert seq_starts_from(position_ids, first=2).tolist() == [[True, False, True, False, False]]


def test_position_ids_shape_is_checked(seps, tokenizer):
    logits, labels = random_batch(seps, len(tokenizer), batch=2, length=16)
    with pytest.raises(ValueError, match="position_ids"):
        set_matching_loss(logits, labels, seps, position_ids=torch.zeros(1, 16, dtype=torch.long))


def split_packed(batch):
    """The sequences of a padding-free batch as separate batches of one row each (attention mask, no position ids)."""
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].size(1)]
    return [
        {
            "input_ids": batch["input_ids"][:, s:e],
            "attention_mask": torch.ones_like(batch["input_ids"][:, s:e]),
            "labels": batch["labels"][:, s:e],
        }
        for s, e in zip(starts[:-1], starts[1:], strict=True)
        if e - s > 1
    ]


def step_metrics(trainer, batch):
    """The trainer's loss and logged set metrics on one batch, normalized as in training (one micro-batch)."""
    trainer.model.train()
    trainer._metrics["train"].clear()
    num_items = (batch["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("dataset_kind", ["prompt_completion", "text"])
def test_trainer_with_packing(tokenizer, tmp_path, dataset_kind):
    """With `packing=True` the set loss of a packed batch is the sum over its sequences, and training runs."""
    dataset = qa_dataset(12)
    if dataset_kind == "text":
        # Sequences start right at `<QA>`, the token the collator masks at each sequence start.
        dataset = Dataset.from_list([{"text": r["completion"].strip()} for r in dataset])
    args = qa_config(
        tmp_path, packing=True, max_length=96, per_device_train_batch_size=3, set_loss_reduction="sum", max_steps=2
    )
    trainer = QALossSFTTrainer(
        model=tiny_llama(len(tokenizer)), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch and "attention_mask" not in batch
    assert int((batch["position_ids"] == 0).sum()) >= 3
    _, packed = step_metrics(trainer, batch)
    parts = [step_metrics(trainer, part)[1] for part in split_packed(batch)]
    for key in ("set_loss", "set/target_answers", "set/matched", "set/missing", "set/extra"):
        assert packed[key] == pytest.approx(sum(p[key] for p in parts), rel=1e-4), key
    assert packed["set/target_answers"] > 0
    if dataset_kind == "text":
        # Trained with "mean": the window's answer-token count (taken before the step) must be the one the step's
        # parse finds, or the loss would not be the logged terms' sum.
        trainer.args.set_loss_reduction = "mean"
        trainer._metrics["train"].clear()  # the metrics of the calls above
        trainer.train()
        logs = [e for e in trainer.state.log_history if "set_loss" in e]
        assert len(logs) == 2
        for entry in logs:
            assert entry["loss"] == pytest.approx(entry["ce_loss"] + entry["set_loss"], rel=1e-4)


def test_left_and_right_padding_give_the_same_loss(tokenizer, tmp_path):
    """A left-padded batch (with the position ids a left-padding collator passes) scores like a right-padded one."""
    trainer = QALossSFTTrainer(
        model=tiny_llama(len(tokenizer)),
        args=qa_config(tmp_path),
        train_dataset=qa_dataset(8),
        processing_class=tokenizer,
    )
    rows = [trainer.train_dataset[i] for i in range(4)]
    length = max(len(r["input_ids"]) for r in rows)

    def padded(side):
        batch = {"input_ids": [], "attention_mask": [], "labels": [], "position_ids": []}
        for r in rows:
            n, pad = len(r["input_ids"]), length - len(r["input_ids"])
            order = (lambda real, fill: fill + real) if side == "left" else (lambda real, fill: real + fill)
            batch["input_ids"].append(order(r["input_ids"], [tokenizer.pad_token_id] * pad))
            batch["attention_mask"].append(order([1] * n, [0] * pad))
            batch["labels"].append(order(r["labels"], [-100] * pad))
            batch["position_ids"].append(order(list(range(n)), [1] * pad))
        return {k: torch.tensor(v) for k, v in batch.items()}

    right_loss, right = step_metrics(trainer, padded("right"))
    left_loss, left = step_metrics(trainer, padded("left"))
    torch.testing.assert_close(left_loss, right_loss, rtol=1e-4, atol=1e-6)
    for key in ("set_loss", "ce_loss", "set/target_answers", "set/matched", "set/missing"):
        assert left[key] == pytest.approx(right[key], rel=1e-4), key
    assert right["set/target_answers"] > 0


def count_answers(text: str) -> int:
    """Answers of `<QA> q? <A> a ...` text, by the parsing rules (every answer here is non-empty)."""
    return sum(item.split("?", 1)[1].count("<A>") for item in text.split("<QA>")[1:] if "?" in item)


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_completion_only_loss(tokenizer, tmp_path, completion_only_loss):
    """Answers in the prompt count as targets only when the prompt is trained on."""
    rows = [
        {"prompt": "quiz <QA> context? <A> eve <A> jack", "completion": " <QA> who? <A> ann <A> bob <QA> where? <A> x"},
        {"prompt": "no items", "completion": " <QA> which city? <A> paris"},
    ]
    args = qa_config(tmp_path, completion_only_loss=completion_only_loss, per_device_train_batch_size=2)
    trainer = QALossSFTTrainer(
        model=tiny_llama(len(tokenizer)), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    batch = next(iter(trainer.get_train_dataloader()))
    _, metrics = step_metrics(trainer, batch)
    # Without completion-only loss the prompt's item comes first, and the completion's first item follows it.
    expected = sum(count_answers(r["completion"]) for r in rows)
    expected += 0 if completion_only_loss else count_answers(rows[0]["prompt"])
    assert metrics["set/target_answers"] == expected


def test_assistant_only_loss_multi_turn(tokenizer, tmp_path):
    """In a multi-turn conversation only the assistant turns' answers are targets."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    turns = [
        ("user", "<QA> quiz? <A> eve <A> frank"),
        ("assistant", "<QA> who? <A> ann <A> bob"),
        ("user", "more <QA> again? <A> iris"),
        ("assistant", "<QA> where? <A> paris <A> rome <A> berlin"),
    ]
    rows = [{"messages": [{"role": r, "content": c} for r, c in turns]}] * 2
    args = qa_config(tmp_path, assistant_only_loss=True, per_device_train_batch_size=2)
    trainer = QALossSFTTrainer(
        model=tiny_llama(len(tokenizer)), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    batch = next(iter(trainer.get_train_dataloader()))
    _, metrics = step_metrics(trainer, batch)
    assert metrics["set/target_answers"] == 2 * sum(count_answers(c) for r, c in turns if r == "assistant")


def test_wrapped_packing_warns(tokenizer, tmp_path, caplog):
    """Wrapped packing without padding-free leaves no sequence boundaries in the batch: the user is told."""
    args = qa_config(tmp_path, packing=True, packing_strategy="wrapped", max_length=64)
    with caplog.at_level(logging.WARNING, logger="trl_qaloss.trainer"):
        QALossSFTTrainer(
            model=tiny_llama(len(tokenizer)), args=args, train_dataset=qa_dataset(8), processing_class=tokenizer
        )
    assert "packing_strategy='wrapped' without padding_free" in caplog.text
