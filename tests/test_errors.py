"""Invalid configs and datasets fail at start-up, in `QALossConfig` or `QALossSFTTrainer.__init__`, naming the fix."""

from __future__ import annotations

import math
import re

import pytest
from datasets import Dataset

from tests.testing_utils import build_tokenizer, qa_config, qa_dataset, tiny_llama
from trl_qaloss import QALossSFTTrainer


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"lambda_ce": math.nan}, r"`lambda_ce` must be a finite non-negative number"),
        ({"lambda_ce": math.inf}, r"`lambda_ce` must be a finite"),
        ({"lambda_set": -math.inf}, r"`lambda_set` must be a finite"),
        ({"lambda_set": "1.0"}, r"`lambda_set` must be a finite non-negative number, got '1.0'"),
        ({"lambda_set": True}, r"`lambda_set`"),
        ({"qa_token": 5}, r"`qa_token` must be a non-empty string"),
        ({"answer_token": ""}, r"`answer_token` must be a non-empty string"),
        ({"qa_token": "<A>"}, r"`qa_token` and `answer_token` must differ"),
        ({"question_end": "<QA>"}, r"`question_end`='<QA>' is a separator.*'\?'"),
        # the answer separator too, not only `qa_token`
        ({"question_end": "<A>"}, r"`question_end`='<A>' is a separator"),
        # bool is an int: True would complete one prompt at each evaluation
        ({"eval_generate_samples": True}, r"`eval_generate_samples` must be an integer >= 0, got True"),
        ({"set_loss_reduction": "none"}, r"`set_loss_reduction` must be one of \('mean', 'sum'\)"),
        # each evaluation count at its own minimum: 0 samples turns the evaluation off, 0 tokens would generate nothing
        ({"eval_generate_samples": -1}, r"`eval_generate_samples` must be an integer >= 0, got -1"),
        ({"eval_max_new_tokens": 0}, r"`eval_max_new_tokens` must be an integer >= 1, got 0"),
        ({"eval_generate_batch_size": 0}, r"`eval_generate_batch_size` must be an integer >= 1, got 0"),
        # numbers no run can use: before, a negative `max_steps` trained `num_train_epochs` silently, and a
        # negative `num_train_epochs` trained nothing
        ({"max_steps": -5}, r"`max_steps` must be a positive number of steps, or -1 to train `num_train_epochs`"),
        ({"max_steps": 0}, r"`max_steps` must be a positive number of steps.*; got 0\."),
        ({"max_steps": 2.5}, r"`max_steps` must be a positive number of steps.*; got 2\.5\."),
        ({"num_train_epochs": -2}, r"`num_train_epochs` must be a number > 0; got -2\."),
        ({"num_train_epochs": 0}, r"`num_train_epochs` must be a number > 0; got 0\."),
        ({"per_device_train_batch_size": 0}, r"`per_device_train_batch_size` must be a whole number >= 1; got 0"),
        ({"per_device_eval_batch_size": -1}, r"`per_device_eval_batch_size` must be a whole number >= 1; got -1"),
        ({"gradient_accumulation_steps": 0}, r"`gradient_accumulation_steps` must be a whole number >= 1; got 0"),
        ({"max_length": 0}, r"`max_length` must be a whole number >= 1 or unset; got 0"),
        ({"learning_rate": -1e-4}, r"`learning_rate` must be a number >= 0; got -0\.0001"),
        ({"learning_rate": math.nan}, r"`learning_rate` must be a number >= 0; got nan"),
        ({"eval_steps": -1, "eval_strategy": "steps"}, r"`eval_steps` must be a number > 0 or unset; got -1"),
        ({"eval_accumulation_steps": 0}, r"`eval_accumulation_steps` must be a whole number >= 1 or unset; got 0"),
        ({"save_steps": 0}, r"`save_steps` must be a number > 0; got 0"),
    ],
)
def test_invalid_config_fields(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        qa_config(tmp_path, **overrides)


@pytest.mark.parametrize(
    "overrides",
    [{"max_steps": -1}, {"max_steps": 3}, {"max_length": None}, {"learning_rate": 0.0}, {"eval_steps": 0.25}],
)
def test_numbers_at_their_limits_are_accepted(tmp_path, overrides):
    args = qa_config(tmp_path, **overrides)
    assert all(getattr(args, name) == value for name, value in overrides.items())


@pytest.fixture()
def make_trainer(tmp_path):
    tokenizer = build_tokenizer()

    def make(dataset=None, tokenizer=tokenizer, **config):
        args = qa_config(tmp_path, **config)
        return QALossSFTTrainer(
            model=tiny_llama(len(tokenizer)),
            args=args,
            train_dataset=qa_dataset(4) if dataset is None else dataset,
            processing_class=tokenizer,
        )

    return make


@pytest.mark.parametrize(
    "config, match",
    [
        ({"loss_type": "dft"}, r"loss_type='dft'.*use 'nll'"),
        ({"label_smoothing_factor": 0.1}, r"label_smoothing_factor.*set it to 0"),
        ({"question_end": "\u00bf"}, r"`question_end`='\u00bf'.*Set `question_end` to text the tokenizer has"),
    ],
)
def test_unsupported_trainer_settings(make_trainer, config, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(**config)


def test_compute_loss_func_is_refused(tmp_path):
    tokenizer = build_tokenizer()
    for positional, keyword in (((lambda *a, **k: 0.0,), {}), ((), {"compute_loss_func": lambda *a, **k: 0.0})):
        with pytest.raises(ValueError, match="compute_loss_func"):
            QALossSFTTrainer(
                tiny_llama(len(tokenizer)),
                qa_config(tmp_path),
                None,
                qa_dataset(4),
                None,
                tokenizer,
                *positional,
                **keyword,
            )


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"prompt": "who wrote it?"}], r"`train_dataset` has a `prompt` column but no `completion` column"),
        (
            [{"question": "who?", "answers": ["ann"]}],
            r"`train_dataset` has none of the fields.*\['question', 'answers'\]",
        ),
    ],
)
def test_dataset_without_the_fields_it_needs(make_trainer, rows, match):
    with pytest.raises(ValueError, match=match + r".*`completion` column holding the `<QA> question\? <A> answer"):
        make_trainer(Dataset.from_list(rows * 4))


def test_eval_dataset_without_the_fields_it_needs(tmp_path):
    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match=r"`eval_dataset\['dev'\]` has a `prompt` column but no `completion`"):
        QALossSFTTrainer(
            model=tiny_llama(len(tokenizer)),
            args=qa_config(tmp_path),
            train_dataset=qa_dataset(4),
            eval_dataset={"dev": Dataset.from_list([{"prompt": "x"}])},
            processing_class=tokenizer,
        )


@pytest.mark.parametrize(
    "config, offered, not_offered",
    [
        ({"lambda_set": 1.0, "answer_order": "data"}, r"or set `lambda_set=0` to train", "answer_order=data"),
        ({"lambda_set": 0.0, "answer_order": "canonical"}, r"or set `answer_order=data` to train", "lambda_set=0"),
        ({"lambda_set": 1.0, "answer_order": "canonical"}, r"or set `lambda_set=0` and `answer_order=data`", None),
    ],
)
def test_completions_without_items(make_trainer, config, offered, not_offered):
    """One line naming the separator fields, their values and a row; it offers only the settings that would work."""
    rows = [{"prompt": "who wrote it?", "completion": " ann and bob"}] * 4
    with pytest.raises(ValueError) as error:
        make_trainer(Dataset.from_list(rows), **config)
    message = str(error.value)
    assert "\n" not in message
    assert re.search(
        r"No row of `train_dataset` has a question/answer item.*rows without '<QA>' in their trained "
        r"tokens, e.g\. row 0: ' ann and bob<eos>'",
        message,
    ), message
    assert re.search(
        r"set `qa_token` \(now '<QA>'\), `answer_token` \(now '<A>'\) and `question_end` \(now '\?'\)", message
    ), message
    assert re.search(offered, message), message
    assert not_offered is None or not_offered not in message, message


def test_items_without_question_end(make_trainer):
    rows = [{"prompt": "quiz:", "completion": " <QA> who wrote it <A> ann <A> bob"}] * 4
    with pytest.raises(
        ValueError, match=r"items but no answer \(no '\?' followed by '<A>'.*row 0: ' <QA> who wrote it"
    ):
        make_trainer(Dataset.from_list(rows))


def test_items_only_in_user_turns(make_trainer):
    """With `assistant_only_loss`, items in the user's turns are not targets."""
    from tests.testing_utils import CHAT_TEMPLATE

    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "user", "content": "<QA> who? <A> ann"}, {"role": "assistant", "content": "no idea"}]
    with pytest.raises(ValueError, match=r"without '<QA>' in their trained tokens.*'no idea<eos>'"):
        make_trainer(Dataset.from_list([{"messages": messages}] * 4), tokenizer=tokenizer, assistant_only_loss=True)


def test_prompts_that_fill_max_length(make_trainer):
    """TRL drops rows whose labels truncation masked entirely; none left is an error, not an empty run."""
    rows = [{"prompt": "context " * 40, "completion": " <QA> who? <A> ann"}] * 4
    with pytest.raises(ValueError, match=r"`train_dataset` has no rows left.*Raise `max_length`"):
        make_trainer(Dataset.from_list(rows), max_length=16)


def test_all_labels_masked(make_trainer):
    """Packed rows are not filtered by TRL: rows whose labels are all -100 are caught here."""
    tokenizer = build_tokenizer()
    ids = tokenizer.encode("<QA> who? <A> ann <A> bob", add_special_tokens=False)
    rows = [{"input_ids": ids, "labels": [-100] * len(ids)}] * 4
    with pytest.raises(ValueError, match=r"labels are all masked \(-100\), e\.g\. row 0"):
        make_trainer(Dataset.from_list(rows), packing=True, max_length=32)
