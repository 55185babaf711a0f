"""QASetEvalCallback on the tiny Llama: answer-set metrics from real greedy generation reach the trainer's logs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset

from tests.testing_utils import CHAT_TEMPLATE, qa_config, qa_dataset, tiny_llama
from trl_qaloss import QALossSFTTrainer, QASetEvalCallback, answer_set_scores

KEYS = (
    "set_f1",
    "set_precision",
    "set_recall",
    "soft_f1",
    "exact_set_match",
    "duplicate_rate",
    "cardinality_error",
    "parse_failures",
)


def eval_dataset():
    """Prompts of different lengths, so generation batches are padded."""
    return qa_dataset(6, seed=1).map(lambda row, i: {"prompt": "and " * i + row["prompt"]}, with_indices=True)


def eval_args(tmp_path, **overrides):
    values = dict(eval_generate_samples=4, eval_max_new_tokens=12, eval_generate_batch_size=3, lambda_set=0.5)
    return qa_config(tmp_path, **{**values, **overrides})


@pytest.fixture(scope="module")
def trainer(tokenizer, tmp_path_factory):
    args = eval_args(tmp_path_factory.mktemp("eval"), max_steps=2, eval_strategy="steps", eval_steps=2)
    return QALossSFTTrainer(
        model=tiny_llama(len(tokenizer)),
        args=args,
        train_dataset=qa_dataset(8),
        eval_dataset=eval_dataset(),
        processing_class=tokenizer,
    )


def eval_callback(trainer) -> QASetEvalCallback:
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, QASetEvalCallback)]
    return callback


def test_metrics_logged_during_training_and_by_evaluate(trainer):
    trainer.train()
    metrics = trainer.evaluate()
    logged = [e for e in trainer.state.log_history if "eval_set_f1" in e]
    assert [e["step"] for e in logged] == [2, 2]  # the evaluation at step 2 of training, then `evaluate()`
    for key in KEYS:
        assert math.isfinite(metrics[f"eval_{key}"]) and logged[-1][f"eval_{key}"] == metrics[f"eval_{key}"]
    assert metrics["eval_num_examples"] == 4 and 0 <= metrics["eval_parse_failures"] <= 4
    assert "eval_loss" in metrics and "eval_set_loss" in metrics
    # The logged values are the scores of the greedy completions against the references, not just present.
    callback = eval_callback(trainer)
    prompts, references, _ = callback._samples(trainer.eval_dataset)
    with torch.no_grad():
        expected = answer_set_scores(callback._generate(prompts), references)
    for key in KEYS:
        assert metrics[f"eval_{key}"] == pytest.approx(expected[key])


def test_match_questions_text_scores_the_same_completions_by_question_text(trainer):
    callback = eval_callback(trainer)
    prompts, references, _ = callback._samples(trainer.eval_dataset)
    with torch.no_grad():
        predictions = callback._generate(prompts)
    callback.match_questions = "text"
    try:
        metrics = {"eval_runtime": 0.0}
        callback.on_evaluate(trainer.args, trainer.state, trainer.control, metrics=metrics)
    finally:
        callback.match_questions = "position"
    expected = answer_set_scores(predictions, references, match_questions="text")
    for key in KEYS:
        assert metrics[f"eval_{key}"] == pytest.approx(expected[key])


def test_prompts_and_references_come_from_the_tokenized_rows(trainer, tokenizer):
    prompts, references, _ = eval_callback(trainer)._samples(trainer.eval_dataset)
    assert len(prompts) == len(references) == 4
    for prompt, reference, row in zip(prompts, references, eval_dataset(), strict=False):
        assert tokenizer.decode(prompt) == row["prompt"]
        assert " ".join(reference.split()) == " ".join(row["completion"].split())  # EOS left out


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(trainer):
    callback = eval_callback(trainer)
    prompts, _, _ = callback._samples(trainer.eval_dataset)
    assert len({len(p) for p in prompts}) > 1  # the batches really are padded
    trainer.model.train()
    batched = callback._generate(prompts)
    callback.batch_size = 1
    try:
        single = callback._generate(prompts)
    finally:
        callback.batch_size = 3
    assert batched == single and any(batched)
    # on_evaluate restores the mode it found
    callback.on_evaluate(trainer.args, trainer.state, trainer.control, metrics={"eval_runtime": 0.0})
    assert trainer.model.training


def test_peft_conversational_and_named_eval_datasets(tokenizer, tmp_path):
    from peft import LoraConfig

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    rows = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "completion": [{"role": "assistant", "content": r["completion"]}],
        }
        for r in qa_dataset(8)
    ]
    eval_sets = {"a": Dataset.from_list(rows[:3]), "b": Dataset.from_list(rows[3:])}
    trainer = QALossSFTTrainer(
        model=tiny_llama(len(tokenizer)),
        args=eval_args(tmp_path),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=eval_sets,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, QASetEvalCallback))
    prompts, _, _ = callback._samples(trainer.eval_dataset["a"])
    # Exactly the context the model is trained on: this template renders no header before an assistant turn, so the
    # prompt is the user turn (re-rendering with `add_generation_prompt` would add an unseen "assistant: ").
    assert tokenizer.decode(prompts[0]) == f"user: {rows[0]['prompt'][0]['content']}\n"
    metrics = trainer.evaluate()
    assert metrics["eval_a_num_examples"] == 3 and metrics["eval_b_num_examples"] == 4
    logged = {k for e in trainer.state.log_history for k in e}
    assert {f"eval_{name}_{key}" for name in "ab" for key in KEYS} <= logged


def test_errors(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer))
    with pytest.raises(ValueError, match="eval_dataset"):
        QALossSFTTrainer(
            model=model,
            args=eval_args(tmp_path, eval_strategy="steps"),
            train_dataset=qa_dataset(4),
            processing_class=tokenizer,
        )
    # Evaluation turned off altogether (a recipe run with `--eval_strategy no`): no callback, no error.
    trainer = QALossSFTTrainer(
        model=model, args=eval_args(tmp_path), train_dataset=qa_dataset(4), processing_class=tokenizer
    )
    assert not any(isinstance(cb, QASetEvalCallback) for cb in trainer.callback_handler.callbacks)
    text = Dataset.from_list([{"text": r["prompt"] + r["completion"]} for r in qa_dataset(4)])
    with pytest.raises(ValueError, match="no prompt"):
        QALossSFTTrainer(
            model=model, args=eval_args(tmp_path), train_dataset=text, eval_dataset=text, processing_class=tokenizer
        )


@pytest.mark.parametrize(
    "field, value",
    [
        ("eval_generate_samples", -1),
        ("eval_max_new_tokens", 0),
        ("eval_generate_batch_size", 0),
        ("eval_match_questions", "order"),
    ],
)
def test_config_validation(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        qa_config(tmp_path, **{field: value})


def test_warns_at_start_up_when_no_reference_parses(tokenizer, tmp_path, caplog):
    """Data written with other separators, trained as plain SFT (nothing else reads the items): every answer-set
    metric would be 0, and the run says so before it starts, naming the separators and a reference."""
    row = {"prompt": "Tell me about valdor.", "completion": " <Q> who rules valdor? ann; bob"}
    wrong = Dataset.from_list([row] * 4)

    def build(eval_rows):
        return QALossSFTTrainer(
            model=tiny_llama(len(tokenizer)),
            args=eval_args(tmp_path, lambda_set=0.0, answer_order="data"),
            train_dataset=wrong,
            eval_dataset=eval_rows,
            processing_class=tokenizer,
        )

    with caplog.at_level("WARNING", logger="trl_qaloss"):
        build(wrong)
    (message,) = [r.getMessage() for r in caplog.records if "answer-set metrics will be 0" in r.getMessage()]
    assert "No reference completion of the 4 eval rows" in message and "qa_token='<QA>'" in message
    assert "' <Q> who rules valdor? ann; bob" in message
    assert "Set `qa_token`, `answer_token` and `question_end`" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="trl_qaloss"):
        build(eval_dataset())  # references that parse: no warning
    assert not [r for r in caplog.records if "answer-set metrics will be 0" in r.getMessage()]


def test_references_cut_by_max_length_are_flagged(tokenizer, tmp_path):
    """The summary marks a reference that truncation cut: flagged exactly for the rows that lost their tail."""
    rows = eval_dataset()
    full_lengths = [len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in rows]  # + EOS
    max_length = sorted(full_lengths)[len(full_lengths) // 2]  # cuts about half of them
    trainer = QALossSFTTrainer(
        model=tiny_llama(len(tokenizer)),
        args=eval_args(tmp_path, max_length=max_length, eval_generate_samples=6),
        train_dataset=qa_dataset(8),
        eval_dataset=rows,
        processing_class=tokenizer,
    )
    _, references, cut = eval_callback(trainer)._samples(trainer.eval_dataset)
    assert cut == [length > max_length for length in full_lengths] and 0 < sum(cut) < len(cut)
    for reference, row, was_cut in zip(references, rows, cut, strict=True):
        assert (reference.strip() == row["completion"].strip()) != was_cut
