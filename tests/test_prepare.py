"""`trl-qaloss prepare`: each item's answers written in the training order, in the format the rows were read in, so
that plain `SFTTrainer` on the written file trains on what `QALossSFTTrainer` trains on from the original file."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from tests.testing_utils import (
    CHAT_TEMPLATE,
    build_tokenizer,
    config_values,
    error_lines,
    grounded_rows,
    run_cli,
    slow,
    tiny_llama,
)
from trl_qaloss import QALossConfig, QALossSFTTrainer, QASeparators, reorder_answers
from trl_qaloss.cli import main
from trl_qaloss.data import format_qas, load_qa_dataset
from trl_qaloss.reordered_data import reorder_rows, sft_tokens

SEPARATORS = ("<QA>", "<A>", "?")


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """The tests' tokenizer with a chat template, and the directory it is saved in."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return tokenizer, str(path)


def rows_in(row_format: str, num_rows: int = 16) -> list[dict]:
    """`grounded_rows` in one of the formats `prepare` reads."""
    structured = grounded_rows(num_rows)
    if row_format == "structured":
        return structured
    converted = [format_qas(row) for row in structured]
    if row_format == "prompt_completion":
        return converted
    if row_format == "chat_prompt_completion":
        return [format_qas({**row, "context": [{"role": "user", "content": row["context"]}]}) for row in structured]
    if row_format == "messages":
        return [
            {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in converted
        ]
    return [{"text": r["prompt"] + r["completion"]} for r in converted]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def capture_main(argv: list[str]) -> tuple[int, str, str]:
    """`trl-qaloss ARGV` run in this process: `(exit code, stdout, stderr)`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exit_:
            return exit_.code, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def prepare(*args: str) -> tuple[int, str, str]:
    return capture_main(["prepare", *args])


ROW_FORMATS = ("structured", "prompt_completion", "chat_prompt_completion", "messages", "text")


@pytest.mark.parametrize("order", ("canonical", "appearance"))
@pytest.mark.parametrize("row_format", ROW_FORMATS)
def test_written_rows_tokenize_to_the_reordered_tokens(chat_tokenizer, row_format, order):
    """Each written row, tokenized as SFTTrainer tokenizes it, is the row as read reordered by `reorder_answers`;
    the rows keep their format and only their answers move."""
    tokenizer, _ = chat_tokenizer
    seps = QASeparators.from_tokenizer(tokenizer)
    rows = rows_in(row_format)
    result = reorder_rows(rows, order, tokenizer, SEPARATORS)
    assert result.moved > 0 and result.items >= result.moved
    for row, written in zip(rows, result.rows, strict=True):
        assert written.keys() == row.keys()
        as_trl = (lambda r: format_qas(r)) if row_format == "structured" else (lambda r: r)
        ids, labels = (torch.tensor([t]) for t in sft_tokens(tokenizer, as_trl(row)))
        expected = reorder_answers(ids, labels, seps, order, tokenizer=tokenizer)
        assert list(sft_tokens(tokenizer, as_trl(written))) == [t[0].tolist() for t in expected]
        if row_format == "structured":
            for qa, written_qa in zip(row["qas"], written["qas"], strict=True):
                assert sorted(written_qa["answers"]) == sorted(qa["answers"])
                assert written_qa["question"] == qa["question"]


@pytest.mark.parametrize("row_format", ("prompt_completion", "chat_prompt_completion", "messages", "text"))
def test_sft_tokens_are_the_tokens_sftrainer_trains_on(chat_tokenizer, tmp_path, row_format):
    tokenizer, _ = chat_tokenizer
    rows = rows_in(row_format, 4)
    trainer = SFTTrainer(
        model=tiny_llama(len(tokenizer)),
        args=SFTConfig(**config_values(tmp_path, max_length=None)),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    prepared = trainer.train_dataset
    trained = list(zip(prepared["input_ids"], prepared["labels"], strict=True))
    assert [sft_tokens(tokenizer, row) for row in rows] == trained


def train_losses(trainer_class, config_class, dataset, tokenizer, out_dir, **overrides) -> list[float]:
    """The logged loss of each of 4 steps of `trainer_class` on `dataset`, from the same tiny Llama and seed."""
    values = config_values(out_dir, max_steps=4, per_device_train_batch_size=4, **overrides)
    trainer = trainer_class(
        model=tiny_llama(len(tokenizer)),
        args=config_class(**values),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize(
    "order, row_format",
    [
        ("appearance", "structured"),
        pytest.param("canonical", "structured", marks=slow),
        pytest.param("appearance", "prompt_completion", marks=slow),
        pytest.param("canonical", "messages", marks=slow),
    ],
)
def test_sft_on_the_written_file_trains_like_qaloss_on_the_original(chat_tokenizer, tmp_path, order, row_format):
    """Plain SFTTrainer on the file `prepare` writes logs the per-step losses of QALossSFTTrainer with that
    `answer_order` and `lambda_set=0` on the file as given, and those differ from plain SFT on the file as given."""
    tokenizer, tokenizer_dir = chat_tokenizer
    original = write_jsonl(tmp_path / "original.jsonl", rows_in(row_format, 24))
    code, out, err = prepare(
        "--dataset_name", original, "--answer_order", order, "--tokenizer", tokenizer_dir, "--output",
        str(tmp_path / "prepared.jsonl"),
    )  # fmt: skip
    assert code == 0, err
    assert "Wrote 24 rows to" in out
    # Structured rows are read as `trl-qaloss train` reads them: converted to prompt/completion rows.
    read = {name: load_qa_dataset(str(tmp_path / f"{name}.jsonl"))["train"] for name in ("original", "prepared")}
    ours = train_losses(
        QALossSFTTrainer, QALossConfig, read["original"], copy.deepcopy(tokenizer), tmp_path / "qaloss",
        lambda_set=0.0, answer_order=order,
    )  # fmt: skip
    sft = train_losses(SFTTrainer, SFTConfig, read["prepared"], copy.deepcopy(tokenizer), tmp_path / "sft")
    assert len(ours) == 4 and ours == pytest.approx(sft, rel=1e-6, abs=0)
    data_order = train_losses(SFTTrainer, SFTConfig, read["original"], copy.deepcopy(tokenizer), tmp_path / "data")
    assert data_order != pytest.approx(sft, rel=1e-6, abs=0)


def test_data_order_writes_the_rows_as_read_without_a_tokenizer(tmp_path):
    rows = rows_in("structured", 4)
    code, out, err = prepare(
        "--dataset_name", write_jsonl(tmp_path / "in.jsonl", rows), "--answer_order", "data", "--output",
        str(tmp_path / "out" / "prepared.jsonl"),
    )  # fmt: skip
    assert code == 0, err
    assert read_jsonl(tmp_path / "out" / "prepared.jsonl") == rows
    assert out.strip().endswith("answers in data order.")


def test_a_directory_writes_the_split_asked_for(chat_tokenizer, tmp_path):
    _, tokenizer_dir = chat_tokenizer
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", rows_in("structured", 6))
    eval_rows = grounded_rows(3, seed=1)
    write_jsonl(tmp_path / "data" / "eval.jsonl", eval_rows)
    output = str(tmp_path / "eval.jsonl")
    args = ["--dataset_name", str(tmp_path / "data"), "--answer_order", "canonical", "--tokenizer", tokenizer_dir]
    code, _, err = prepare(*args, "--dataset_split", "test", "--output", output)
    assert code == 0, err
    assert [row["context"] for row in read_jsonl(output)] == [row["context"] for row in eval_rows]
    code, _, err = prepare(*args, "--dataset_split", "validation", "--output", output)
    assert code == 1 and "has no split 'validation' (it has ['test', 'train'])" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--answer_order", "canonical"], r"`--answer_order canonical` needs `--tokenizer`.*on token ids"),
        (["--answer_order", "appearance"], r"`--answer_order appearance` needs `--tokenizer`"),
        (["--answer_order", "aligned"], r"`--answer_order aligned` reads the model being trained"),
        (["--answer_order", "sorted"], r"`--answer_order` must be one of data, canonical, appearance, got 'sorted'"),
        (["--answer_order", "data", "--tokenizer", "./no-such-tokenizer"], None),
    ],
)
def test_mistakes_are_one_line_with_exit_code_1(tmp_path, args, message):
    rows = write_jsonl(tmp_path / "in.jsonl", rows_in("structured", 2))
    code, _, err = prepare("--dataset_name", rows, "--output", str(tmp_path / "out.jsonl"), *args)
    if message is None:  # "data" reads no tokenizer
        assert code == 0, err
        return
    assert code == 1 and "Traceback" not in err
    (line,) = error_lines(err)
    assert re.search(message, line), line


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            ['{"context": "c", "qas": [{"question": "who?", "answers": ["ann"]}]}', '{"context": "c"}'],
            "bad.jsonl, line 2: field `qas` is missing.",
        ),
        (
            ['{"context": "c", "qas": [{"question": "who?", "answers": "ann"}]}'],
            'bad.jsonl, line 1: field `qas[0].answers` must be a list of strings (write ["ann"] for one answer)',
        ),
        (['{"context": "c", "qas": []}', "{oops"], "bad.jsonl, line 2: not valid JSON"),
    ],
)
def test_bad_rows_get_the_errors_train_gives(chat_tokenizer, tmp_path, monkeypatch, rows, message):
    _, tokenizer_dir = chat_tokenizer
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text("\n".join(rows) + "\n")
    args = ["--answer_order", "canonical", "--tokenizer", tokenizer_dir, "--output", "o.jsonl"]
    code, _, err = prepare("--dataset_name", "bad.jsonl", *args)
    assert code == 1
    (line,) = error_lines(err)
    assert message in line
    # `train` stops on the same row with the same line, before it loads a model.
    code, _, err = capture_main(["train", "--dataset_name", "bad.jsonl", "--output_dir", "out"])
    assert code == 1 and error_lines(err) == [line]


def test_a_tokenizer_without_the_separators_gets_them_as_the_trainer_adds_them(tmp_path):
    """The separators `QALossSFTTrainer` would add as special tokens are added before the order is read."""
    rows = rows_in("prompt_completion", 4)
    rows = [{**r, "completion": r["completion"].replace("<QA>", "[Q]").replace("<A>", "[ans]")} for r in rows]
    code, out, err = prepare(
        "--dataset_name", write_jsonl(tmp_path / "in.jsonl", rows), "--answer_order", "appearance", "--tokenizer",
        "trl_qaloss/demo/model", "--qa_token", "[Q]", "--answer_token", "[ans]", "--output", str(tmp_path / "o.jsonl"),
    )  # fmt: skip
    assert code == 0, err
    assert "Added ['[Q]', '[ans]'] to the tokenizer as special tokens" in out
    assert read_jsonl(tmp_path / "o.jsonl") != rows


@slow
def test_the_command_writes_the_demo_in_canonical_order(tmp_path):
    result = run_cli(
        "prepare", "--dataset_name", "trl_qaloss/demo/data", "--answer_order", "canonical", "--tokenizer",
        "trl_qaloss/demo/model", "--output", "prepared.jsonl", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Wrote 400 rows to prepared.jsonl, answers in canonical order" in result.stdout
    rows = read_jsonl(tmp_path / "prepared.jsonl")
    demo = read_jsonl(Path(__file__).resolve().parents[1] / "trl_qaloss" / "demo" / "data" / "train.jsonl")
    assert [r["context"] for r in rows] == [r["context"] for r in demo] and rows != demo


def test_structured_rows_can_be_written_as_prompt_completion_rows(chat_tokenizer, tmp_path):
    """`--prompt_completion`: the rows `trl-qaloss train` converts the structured ones to, their answers reordered."""
    _, tokenizer_dir = chat_tokenizer
    source = write_jsonl(tmp_path / "in.jsonl", rows_in("structured", 6))
    args = ["--dataset_name", source, "--answer_order", "appearance", "--tokenizer", tokenizer_dir, "--output"]
    assert prepare(*args, str(tmp_path / "structured.jsonl"))[0] == 0
    assert prepare(*args, str(tmp_path / "converted.jsonl"), "--prompt_completion")[0] == 0
    converted = read_jsonl(tmp_path / "converted.jsonl")
    assert converted == [format_qas(row) for row in read_jsonl(tmp_path / "structured.jsonl")]
    assert converted != [format_qas(row) for row in read_jsonl(source)]
