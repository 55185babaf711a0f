"""A user's own data: one JSONL file without an eval split, structured rows from Python, truncation, TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from datasets import Dataset

from tests.testing_utils import DEMO_RECIPE, ROOT, SHORT_RUN, build_tokenizer, qa_config, run_cli, slow, tiny_llama
from trl_qaloss import QALossSFTTrainer

DEMO_ROWS = Path(ROOT, "trl_qaloss", "demo", "data", "train.jsonl").read_text().splitlines()


def own_jsonl(directory: Path, rows: int = 40) -> str:
    (directory / "my.jsonl").write_text("\n".join(DEMO_ROWS[:rows]) + "\n")
    return "my.jsonl"


@slow
def test_own_jsonl_without_eval_split_trains_and_evaluates(tmp_path):
    """`--dataset_name my.jsonl` with the demo recipe, which evaluates: an eval split is split off, as logged."""
    data = own_jsonl(tmp_path)
    result = run_cli(
        "train",
        "--config",
        DEMO_RECIPE,
        "--dataset_name",
        data,
        "--output_dir",
        "out",
        *SHORT_RUN,
        "--eval_steps",
        "2",
        "--eval_generate_samples",
        "2",
        "--test_split_size",
        "0.25",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "The dataset has no 'test' split: evaluating on 10 of its 40 'train' rows (test_split_size=0.25, seed=0), "
        "training on the other 30." in result.stderr
    )
    # no warning a user cannot act on: deprecated field names, a CPU kernel hint of bitsandbytes
    assert "FutureWarning" not in result.stderr and "kernels-community" not in result.stderr
    assert "Traceback" not in result.stderr
    logs = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert any("eval_loss" in log for log in logs) and any("eval_set_f1" in log for log in logs)


def test_the_default_eval_split_is_a_tenth_drawn_with_the_seed(tmp_path):
    from trl_qaloss.cli.training import load_datasets, parse_args

    data = tmp_path / own_jsonl(tmp_path)
    splits = []
    for _ in range(2):
        script_args, training_args, _, dataset_args = parse_args(["--dataset_name", str(data)])
        train, evaluation, _ = load_datasets(script_args, training_args, dataset_args)
        splits.append((list(train["completion"]), list(evaluation["completion"])))
    assert len(splits[0][0]) == 36 and len(splits[0][1]) == 4
    assert splits[0] == splits[1] and not set(splits[0][0]) & set(splits[0][1])


def test_the_split_off_eval_rows_follow_the_seed(tmp_path):
    """`--seed` draws the eval rows split off: the same seed the same rows, another seed others."""
    from trl_qaloss.cli.training import load_datasets, parse_args

    data = tmp_path / own_jsonl(tmp_path)
    held_out = {}
    for seed in ("1", "1", "2"):
        script_args, training_args, _, dataset_args = parse_args(["--dataset_name", str(data), "--seed", seed])
        _, evaluation, _ = load_datasets(script_args, training_args, dataset_args)
        held_out.setdefault(seed, []).append(sorted(evaluation["completion"]))
    assert held_out["1"][0] == held_out["1"][1] != held_out["2"][0]
    assert len(held_out["2"][0]) == 4


def test_a_one_row_dataset_trains_without_evaluation(tmp_path, caplog):
    from trl_qaloss.cli.training import load_datasets, parse_args

    data = tmp_path / own_jsonl(tmp_path, rows=1)
    script_args, training_args, _, dataset_args = parse_args(["--dataset_name", str(data)])
    with caplog.at_level(logging.WARNING):
        train, evaluation, _ = load_datasets(script_args, training_args, dataset_args)
    assert len(train) == 1 and evaluation is None and training_args.eval_strategy == "no"
    assert "none can be split off its 'train' split (it has 1 row): evaluation is off" in caplog.text


STRUCTURED = [
    {
        "context": "context ann bob",
        "qas": [{"question": "who wrote it?", "answers": ["ann", "bob"]}, {"question": "where?", "answers": ["paris"]}],
    }
] * 8


def test_structured_rows_passed_from_python_are_converted(tmp_path):
    from trl_qaloss.data import format_qas

    tokenizer = build_tokenizer()
    trainer = QALossSFTTrainer(
        model=tiny_llama(len(tokenizer)),
        args=qa_config(tmp_path),
        train_dataset=Dataset.from_list(STRUCTURED),
        processing_class=tokenizer,
    )
    expected = tokenizer(format_qas(STRUCTURED[0])["completion"], add_special_tokens=False)["input_ids"]
    first = trainer.train_dataset[0]
    trained = [t for t, label in zip(first["input_ids"], first["labels"], strict=True) if label != -100]
    assert trained[: len(expected)] == expected
    trainer.train()


def test_a_dict_of_structured_eval_datasets_is_converted_each(tmp_path):
    """`eval_dataset={"a": ..., "b": ...}` of structured rows: each one is converted with the config's separators,
    as the train dataset is (TRL would refuse the `qas` column of any left as it is)."""
    from trl_qaloss.data import format_qas

    tokenizer = build_tokenizer()
    other = [{"context": "context carl", "qas": [{"question": "who?", "answers": ["carl"]}]}] * 4
    trainer = QALossSFTTrainer(
        model=tiny_llama(len(tokenizer)),
        args=qa_config(tmp_path, eval_strategy="steps", eval_steps=1),
        train_dataset=Dataset.from_list(STRUCTURED),
        eval_dataset={"a": Dataset.from_list(STRUCTURED), "b": Dataset.from_list(other)},
        processing_class=tokenizer,
    )
    assert set(trainer.eval_dataset) == {"a", "b"}
    for name, rows in (("a", STRUCTURED), ("b", other)):
        expected = tokenizer(format_qas(rows[0])["completion"], add_special_tokens=False)["input_ids"]
        first = trainer.eval_dataset[name][0]
        evaluated = [t for t, label in zip(first["input_ids"], first["labels"], strict=True) if label != -100]
        assert evaluated[: len(expected)] == expected, name
        assert "qas" not in trainer.eval_dataset[name].column_names


def test_max_length_that_cuts_answers_warns_with_the_counts(tmp_path, caplog):
    tokenizer = build_tokenizer()
    with caplog.at_level(logging.WARNING, logger="trl_qaloss"):
        QALossSFTTrainer(
            model=tiny_llama(len(tokenizer)),
            args=qa_config(tmp_path, max_length=20),
            train_dataset=Dataset.from_list(STRUCTURED),
            processing_class=tokenizer,
        )
    assert "`max_length=20` truncates 8 of 8 rows of `train_dataset` and cuts 16 of their 24 target answers" in (
        caplog.text
    )


def test_max_length_that_cuts_nothing_is_silent(tmp_path, caplog):
    tokenizer = build_tokenizer()
    with caplog.at_level(logging.WARNING, logger="trl_qaloss"):
        QALossSFTTrainer(
            model=tiny_llama(len(tokenizer)),
            args=qa_config(tmp_path, max_length=128),
            train_dataset=Dataset.from_list(STRUCTURED),
            processing_class=tokenizer,
        )
    assert "max_length" not in caplog.text


def test_max_length_that_cuts_only_the_end_of_sequence_is_silent(tmp_path, caplog):
    """Rows are truncated, but only past their last answer (the EOS): no target answer is cut, so no warning."""
    tokenizer = build_tokenizer()

    def trainer(max_length):
        return QALossSFTTrainer(
            model=tiny_llama(len(tokenizer)),
            args=qa_config(tmp_path, max_length=max_length),
            train_dataset=Dataset.from_list(STRUCTURED),
            processing_class=tokenizer,
        )

    whole = trainer(128).train_dataset
    longest = max(len(row["input_ids"]) for row in whole)
    assert tokenizer.decode(whole[0]["input_ids"][-1:]) == tokenizer.eos_token
    with caplog.at_level(logging.WARNING, logger="trl_qaloss"):
        truncated = trainer(longest - 1).train_dataset
    assert max(len(row["input_ids"]) for row in truncated) == longest - 1  # a row was truncated
    assert "max_length" not in caplog.text


@slow
def test_report_to_tensorboard_writes_the_set_metrics(tmp_path):
    pytest.importorskip("tensorboard", reason="the `tracking` extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_cli(
        "train",
        "--output_dir",
        "out",
        *SHORT_RUN,
        "--lambda_set",  # the set loss on, so that its metrics are logged too
        "1",
        "--report_to",
        "tensorboard",
        "--eval_steps",
        "2",
        "--eval_generate_samples",
        "2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    events = sorted((tmp_path / "out").rglob("events.out.tfevents.*"))
    assert events, list((tmp_path / "out").rglob("*"))
    tags = set()
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/set_loss", "eval/set_f1"} <= tags, sorted(tags)


def test_own_data_gets_its_own_output_dir_and_a_word_about_the_demo_model(tmp_path, caplog):
    """`--dataset_name my.jsonl` on the demo recipe does not overwrite the demo's adapter, and says that the demo's
    model is not the one to train on other data."""
    from trl_qaloss.cli.training import parse_args

    data = str(tmp_path / own_jsonl(tmp_path))
    with caplog.at_level(logging.WARNING, logger="trl_qaloss"):
        _, training_args, _, _ = parse_args(["--config", DEMO_RECIPE, "--dataset_name", data])
    assert training_args.output_dir == "outputs/demo-cpu-my"
    assert "knows only the demo's fictional world" in caplog.text
    assert "recipes/qwen2.5-0.5b-instruct-lora.yaml" in caplog.text
    _, training_args, _, _ = parse_args(["--config", DEMO_RECIPE, "--dataset_name", data, "--output_dir", "mine"])
    assert training_args.output_dir == "mine"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_qaloss"):
        _, training_args, _, _ = parse_args([])  # the demo itself
    assert training_args.output_dir == "outputs/demo-cpu" and not caplog.text


def test_own_data_output_dir_from_a_recipe_output_dir_ending_in_a_slash(tmp_path):
    """A recipe's `output_dir: outputs/mine/` gets the dataset's name after the folder's (`outputs/mine-my`), not
    inside it (`outputs/mine/-my`, a hidden-looking folder within the recipe's own output)."""
    from trl_qaloss.cli.training import parse_args

    data = str(tmp_path / own_jsonl(tmp_path))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        Path(DEMO_RECIPE).read_text().replace("output_dir: outputs/demo-cpu\n", "output_dir: outputs/mine/\n")
    )
    _, training_args, _, _ = parse_args(["--config", str(recipe), "--dataset_name", data])
    assert training_args.output_dir == "outputs/mine-my"
