"""Datasets for `QALossSFTTrainer`: the structured question/answer-set format and loading from the hub or local files.

The structured format is one JSON object per row:

    {"context": "Facts about valdor:", "qas": [{"question": "which rivers flow through valdor?",
                                                "answers": ["oru", "pell"]}, ...]}

(`"prompt"` may replace `"context"`; a list of chat messages there makes a conversational row). `format_qas` turns it
into TRL's prompt/completion format, the completion being the text the set loss parses:

    {"prompt": "Facts about valdor:", "completion": " <QA> which rivers flow through valdor? <A> oru <A> pell"}

Rows already in TRL's prompt/completion, language-modeling or conversational formats pass through unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

STRUCTURED_FIELDS = ("context", "prompt", "qas")
# Rows with these columns are in one of TRL's own formats and are passed to the trainer as they are.
TRL_FORMATS = ({"prompt", "completion"}, {"messages"}, {"text"})


def _where(index: int | None, source: str | None) -> str:
    row = "Row" if index is None else f"Row {index}"
    return f"{row} of {source}" if source else row


def qa_completion(
    qas: Sequence[Mapping[str, Any]],
    qa_token: str = "<QA>",
    answer_token: str = "<A>",
    question_end: str = "?",
    *,
    where: str = "Row",
) -> str:
    """The completion text of a list of `{"question": str, "answers": [str, ...]}` items.

    Returns `" <QA> question? <A> answer <A> answer <QA> ..."`. A question that does not end with `question_end` gets
    it appended. Raises `ValueError` naming `where` and the field (`qas[1].answers[0]`) for anything the set loss
    could not read back exactly: a missing or non-string field, an empty answer, a separator inside the text, or
    `question_end` inside a question (the question would end there).
    """
    if isinstance(qas, (str, bytes)) or not isinstance(qas, Sequence) or not qas:
        raise ValueError(
            f"{where}: field `qas` must be a non-empty list of {{'question', 'answers'}} objects, got {qas!r}."
        )
    parts = []
    for i, qa in enumerate(qas):
        name = f"qas[{i}]"
        if not isinstance(qa, Mapping):
            raise ValueError(f"{where}: field `{name}` must be an object with 'question' and 'answers', got {qa!r}.")
        for key in ("question", "answers"):
            if qa.get(key) is None:
                raise ValueError(
                    f"{where}: field `{name}.{key}` is missing. Each item needs 'question' (a string) "
                    "and 'answers' (a list of strings)."
                )
        question = _clean(qa["question"], f"{name}.question", where, (qa_token, answer_token))
        if question_end in question[: -len(question_end)]:
            raise ValueError(
                f"{where}: field `{name}.question` contains {question_end!r} before its end: the set "
                f"loss ends the question there. Rephrase it: {question!r}."
            )
        if not question.endswith(question_end):
            question += question_end
        answers = qa["answers"]
        if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence):
            raise ValueError(
                f"{where}: field `{name}.answers` must be a list of strings (write [{answers!r}] for "
                f"one answer), got {type(answers).__name__}."
            )
        answers = [_clean(a, f"{name}.answers[{j}]", where, (qa_token, answer_token)) for j, a in enumerate(answers)]
        parts.append(" ".join([f"{qa_token} {question}", *(f"{answer_token} {a}" for a in answers)]))
    return " " + " ".join(parts)


def _clean(value: Any, name: str, where: str, separators: tuple[str, str]) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field `{name}` must be a string, got {type(value).__name__} {value!r}.")
    text = " ".join(value.split())  # the loss never reads whitespace, so runs of it are written as one space
    if not text:
        raise ValueError(f"{where}: field `{name}` is empty; the set loss would drop it. Remove it or fill it in.")
    for sep in separators:
        if sep in text:
            raise ValueError(f"{where}: field `{name}` contains the separator {sep!r}, which would split it: {text!r}.")
    return text


def format_qas(
    row: Mapping[str, Any],
    index: int | None = None,
    *,
    qa_token: str = "<QA>",
    answer_token: str = "<A>",
    question_end: str = "?",
    source: str | None = None,
) -> dict[str, Any]:
    """Convert one structured row into TRL's prompt/completion format.

    Args:
        row: `{"context" or "prompt": str | list[message], "qas": [{"question": str, "answers": [str, ...]}, ...]}`.
        index: the row's index, named in errors.
        qa_token, answer_token, question_end: the separators, as in `QALossConfig`.
        source: where the row comes from (a file, a split), named in errors.

    Returns:
        `{"prompt": ..., "completion": " <QA> question? <A> answer ..."}`; with a list of chat messages as prompt, the
        completion is `[{"role": "assistant", "content": ...}]` (TRL's conversational prompt/completion format).

    Raises:
        ValueError: naming the row and the field, if the row cannot be converted exactly.
    """
    where = _where(index, source)
    if "context" in row and "prompt" in row and row["context"] is not None and row["prompt"] is not None:
        raise ValueError(f"{where}: has both `context` and `prompt`; give one of them.")
    key = "context" if row.get("context") is not None else "prompt"
    prompt = row.get(key)
    if prompt is None:
        raise ValueError(
            f"{where}: field `context` (or `prompt`) is missing. Structured rows are "
            "{'context': str, 'qas': [{'question': str, 'answers': [str, ...]}, ...]}."
        )
    if "qas" not in row or row["qas"] is None:
        raise ValueError(f"{where}: field `qas` is missing.")
    completion = qa_completion(row["qas"], qa_token, answer_token, question_end, where=where)
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": completion}
    if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) and "role" in m for m in prompt):
        return {"prompt": list(prompt), "completion": [{"role": "assistant", "content": completion.lstrip()}]}
    raise ValueError(f"{where}: field `{key}` must be a string or a list of chat messages, got {prompt!r}.")


def is_structured(column_names: Sequence[str]) -> bool:
    """Whether a dataset with these columns is in the structured `qas` format."""
    return "qas" in column_names


def format_qas_dataset(
    dataset, *, qa_token: str = "<QA>", answer_token: str = "<A>", question_end: str = "?", source: str | None = None
):
    """`format_qas` over a `datasets.Dataset`; rows already in one of TRL's formats are returned as they are.

    Raises:
        ValueError: if the columns are in no known format, or a row cannot be converted (naming the row and field).
    """
    columns = dataset.column_names
    if columns is None:  # a streamed dataset whose features are unknown: read them off its first row
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError(f"{source or 'The dataset'} is empty: it has no rows.")
        columns = first.keys()
    columns = set(columns)
    if is_structured(columns):
        kwargs = dict(qa_token=qa_token, answer_token=answer_token, question_end=question_end, source=source)
        drop = [c for c in STRUCTURED_FIELDS if c in columns]
        return dataset.map(lambda row, i: format_qas(row, i, **kwargs), with_indices=True, remove_columns=drop)
    if any(fmt <= columns for fmt in TRL_FORMATS):
        return dataset
    raise ValueError(
        f"{source or 'The dataset'} has columns {sorted(columns)}, in no format trl-qaloss reads. Use structured rows "
        "{'context', 'qas'}, or TRL's {'prompt', 'completion'}, {'messages'} or {'text'}."
    )


def read_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    """`(line number, value)` of each non-blank line of a JSONL file; a ValueError names the first invalid line."""
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {number}: not valid JSON ({error.msg}, column {error.colno}). Each "
                    "line must be one JSON value."
                ) from error


def check_json_file(path: str) -> None:
    """Raise a ValueError naming `path` if it holds no rows, or (a `.jsonl` file) the first line that is not JSON.

    Run before `datasets` reads the file, whose own errors are a bare `StopIteration` for an empty file and a
    pyarrow parse error without the line for a broken one.
    """
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as file:
            if not file.read().strip():
                raise ValueError(f"{path} is empty: it has no rows. Write one JSON object per row.")
        return
    rows = 0
    for number, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: a row must be a JSON object, got {type(row).__name__}.")
        rows += 1
    if rows == 0:
        raise ValueError(
            f"{path} is empty: it has no rows. Write one JSON object per line, e.g. "
            '{"context": "...", "qas": [{"question": "...?", "answers": ["..."]}]}.'
        )


def format_structured(
    dataset, *, source: str, qa_token: str = "<QA>", answer_token: str = "<A>", question_end: str = "?"
):
    """`format_qas_dataset(dataset)` if its rows are structured `{"context", "qas"}` rows, else `dataset` unchanged."""
    columns = getattr(dataset, "column_names", None)
    if not isinstance(columns, list) or not is_structured(columns):
        return dataset
    return format_qas_dataset(
        dataset, qa_token=qa_token, answer_token=answer_token, question_end=question_end, source=source
    )


def load_qa_dataset(name_or_path: str, config: str | None = None, streaming: bool = False, **kwargs):
    """Load a dataset from the hub, a local directory, or a local `.json`/`.jsonl` file, and convert structured rows.

    A file becomes the `train` split. A directory is read by `datasets.load_dataset`, which names splits after the
    files (`train.jsonl` -> `train`, `eval.jsonl` or `test.jsonl` -> `test`). `kwargs` go to `format_qas_dataset`.

    Returns:
        a `datasets.DatasetDict` (or `IterableDatasetDict` with `streaming=True`).
    """
    from datasets import load_dataset

    if os.path.isfile(name_or_path):
        if not name_or_path.endswith((".json", ".jsonl")):
            raise ValueError(f"Local dataset files must be .json or .jsonl, got {name_or_path!r}.")
        check_json_file(name_or_path)
        dataset = load_dataset("json", data_files={"train": name_or_path}, streaming=streaming)
    elif os.path.isdir(name_or_path):
        for file in sorted(os.listdir(name_or_path)):
            if file.endswith((".json", ".jsonl")):
                check_json_file(os.path.join(name_or_path, file))
        dataset = load_dataset(name_or_path, name=config, streaming=streaming)
    elif name_or_path.endswith((".json", ".jsonl")) or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"Dataset file not found: {name_or_path!r} (from `dataset_name`).")
    else:
        dataset = load_dataset(name_or_path, name=config, streaming=streaming)
    for split in list(dataset):
        dataset[split] = format_qas_dataset(dataset[split], source=f"{name_or_path} [{split}]", **kwargs)
    return dataset
