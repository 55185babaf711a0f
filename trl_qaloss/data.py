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

from ._log_filters import quiet_dataset_preparation

STRUCTURED_FIELDS = ("context", "prompt", "qas")
# Rows with these columns are in one of TRL's own formats and are passed to the trainer as they are.
TRL_FORMATS = ({"prompt", "completion"}, {"messages"}, {"text"})


STRUCTURED_EXAMPLE = '{"context": "...", "qas": [{"question": "...?", "answers": ["...", "..."]}]}'


def row_location(index: int | None, source: str | None, line: int | None = None) -> str:
    """Where a row is, for errors: `my.jsonl, line 6` when the row's line in its file is known, else `Row 5 of ...`
    (its index in the dataset)."""
    if line is not None and source:
        return f"{source}, line {line}"
    row = "Row" if index is None else f"Row {index}"
    return f"{row} of {source}" if source else row


def _json(value: Any) -> str:
    """`value` written as JSON, the syntax of the files users write; `repr` for what JSON cannot hold."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def answers_hint(answers) -> str:
    """How to write `answers`, given as something other than a list, as one: a string listing several answers is
    split into them (`"A, B"` -> `["A", "B"]`), any other string kept as one answer."""
    if isinstance(answers, str):
        for separator in (";", ",", "|", "/"):
            parts = [part.strip() for part in answers.split(separator)]
            if len(parts) > 1 and all(parts):
                return f" (one string per answer: write {_json(parts)})"
        return f" (write {_json([answers])} for one answer)"
    return ""


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
            f'{where}: field `qas` must be a non-empty list of {{"question": ..., "answers": [...]}} objects, got '
            f"{_json(qas)}."
        )
    parts = []
    for i, qa in enumerate(qas):
        name = f"qas[{i}]"
        if not isinstance(qa, Mapping):
            raise ValueError(
                f'{where}: field `{name}` must be an object with "question" and "answers", got {_json(qa)}.'
            )
        for key in ("question", "answers"):
            if qa.get(key) is None:
                raise ValueError(
                    f'{where}: field `{name}.{key}` is missing. Each item needs "question" (a string) '
                    'and "answers" (a list of strings).'
                )
        question = _clean(qa["question"], f"{name}.question", where, (qa_token, answer_token))
        if question_end in question.removesuffix(question_end):
            raise ValueError(
                f"{where}: field `{name}.question` contains {_json(question_end)} before its end: the set "
                f"loss ends the question there. Rephrase it: {_json(question)}."
            )
        if not question.endswith(question_end):
            question += question_end
        answers = qa["answers"]
        if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence):
            raise ValueError(
                f"{where}: field `{name}.answers` must be a list of strings{answers_hint(answers)}, got "
                f"{_json(answers)}."
            )
        answers = [_clean(a, f"{name}.answers[{j}]", where, (qa_token, answer_token)) for j, a in enumerate(answers)]
        parts.append(" ".join([f"{qa_token} {question}", *(f"{answer_token} {a}" for a in answers)]))
    return " " + " ".join(parts)


def _clean(value: Any, name: str, where: str, separators: tuple[str, str]) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field `{name}` must be a string, got {_json(value)}.")
    text = " ".join(value.split())  # the loss never reads whitespace, so runs of it are written as one space
    if not text:
        raise ValueError(f"{where}: field `{name}` is empty; the set loss would drop it. Remove it or fill it in.")
    for sep in separators:
        if sep in text:
            raise ValueError(
                f"{where}: field `{name}` contains the separator {_json(sep)}, which would split it: {_json(text)}."
            )
    return text


def format_qas(
    row: Mapping[str, Any],
    index: int | None = None,
    *,
    qa_token: str = "<QA>",
    answer_token: str = "<A>",
    question_end: str = "?",
    source: str | None = None,
    line: int | None = None,
) -> dict[str, Any]:
    """Convert one structured row into TRL's prompt/completion format.

    Args:
        row: `{"context" or "prompt": str | list[message], "qas": [{"question": str, "answers": [str, ...]}, ...]}`.
        index: the row's index, named in errors.
        qa_token, answer_token, question_end: the separators, as in `QALossConfig`.
        source: where the row comes from (a file, a split), named in errors.
        line: the row's 1-based line number in `source`, a JSONL file, named in errors instead of `index`.

    Returns:
        `{"prompt": ..., "completion": " <QA> question? <A> answer ..."}`; with a list of chat messages as prompt, the
        completion is `[{"role": "assistant", "content": ...}]` (TRL's conversational prompt/completion format).

    Raises:
        ValueError: naming the row and the field, if the row cannot be converted exactly.
    """
    where = row_location(index, source, line)
    if "context" in row and "prompt" in row and row["context"] is not None and row["prompt"] is not None:
        raise ValueError(f"{where}: has both `context` and `prompt`; give one of them.")
    key = "context" if row.get("context") is not None else "prompt"
    prompt = row.get(key)
    if prompt is None:
        raise ValueError(
            f"{where}: field `context` (or `prompt`) is missing. Structured rows are {STRUCTURED_EXAMPLE}."
        )
    if "qas" not in row or row["qas"] is None:
        raise ValueError(f"{where}: field `qas` is missing.")
    completion = qa_completion(row["qas"], qa_token, answer_token, question_end, where=where)
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": completion}
    if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) and "role" in m for m in prompt):
        return {"prompt": list(prompt), "completion": [{"role": "assistant", "content": completion.lstrip()}]}
    raise ValueError(f"{where}: field `{key}` must be a string or a list of chat messages, got {_json(prompt)}.")


def is_structured(column_names: Sequence[str]) -> bool:
    """Whether a dataset with these columns is in the structured `qas` format."""
    return "qas" in column_names


@quiet_dataset_preparation()
def format_qas_dataset(
    dataset,
    *,
    qa_token: str = "<QA>",
    answer_token: str = "<A>",
    question_end: str = "?",
    source: str | None = None,
    line_numbers: Sequence[int] | None = None,
):
    """`format_qas` over a `datasets.Dataset`; rows already in one of TRL's formats are returned as they are.

    `line_numbers`, when `source` is one JSONL file, holds each row's line in it: errors name the line.

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
        lines = list(line_numbers) if line_numbers is not None else None

        def convert(row, i):
            return format_qas(row, i, line=lines[i] if lines is not None else None, **kwargs)

        return dataset.map(convert, with_indices=True, remove_columns=drop)
    if any(fmt <= columns for fmt in TRL_FORMATS):
        return dataset
    raise ValueError(
        f"{source or 'The dataset'} has columns {_json(sorted(columns))}, in no format trl-qaloss reads. Use "
        f'structured rows {STRUCTURED_EXAMPLE}, or TRL\'s {{"prompt", "completion"}}, {{"messages"}} or {{"text"}}.'
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


def check_json_file(path: str) -> list[int] | None:
    """Raise a ValueError naming `path` if it holds no rows, or (a `.jsonl` file) the first line that is not JSON.

    Returns the 1-based line number of each row of a `.jsonl` file (blank lines hold none), `None` for a `.json` file.

    Run before `datasets` reads the file, whose own errors are a bare `StopIteration` for an empty file and a
    pyarrow parse error without the line for a broken one.
    """
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as file:
            if not file.read().strip():
                raise ValueError(f"{path} is empty: it has no rows. Write one JSON object per row.")
        return None
    lines = []
    for number, row in read_jsonl(path):
        if len(lines) + 1 != number:  # `datasets` fails on blank lines with a parse error that names no line
            raise ValueError(f"{path}, line {len(lines) + 1}: a blank line. Remove it: every line holds one row.")
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: a row must be a JSON object, got {_json(row)}.")
        lines.append(number)
    with open(path, encoding="utf-8") as file:
        blank = next((n for n, text in enumerate(file, start=1) if n > len(lines) and not text.strip()), None)
    if blank is not None and lines:
        raise ValueError(f"{path}, line {blank}: a blank line. Remove it: every line holds one row.")
    if not lines:
        raise ValueError(f"{path} is empty: it has no rows. Write one JSON object per line, e.g. {STRUCTURED_EXAMPLE}.")
    return lines


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


@quiet_dataset_preparation()
def load_qa_dataset(name_or_path: str, config: str | None = None, streaming: bool = False, **kwargs):
    """Load a dataset from the hub, a local directory, or a local `.json`/`.jsonl` file, and convert structured rows.

    A file becomes the `train` split. A directory is read by `datasets.load_dataset`, which names splits after the
    files (`train.jsonl` -> `train`, `eval.jsonl` or `test.jsonl` -> `test`). `kwargs` go to `format_qas_dataset`.

    Returns:
        a `datasets.DatasetDict` (or `IterableDatasetDict` with `streaming=True`).
    """
    dataset, sources = load_dataset_rows(name_or_path, config, streaming)
    for split in list(dataset):
        dataset[split] = format_qas_dataset(dataset[split], **sources[split], **kwargs)
    return dataset


@quiet_dataset_preparation()
def load_dataset_rows(name_or_path: str, config: str | None = None, streaming: bool = False):
    """The rows of a dataset as `load_qa_dataset` reads them, not yet converted, and where each split's rows are.

    Returns:
        `(dataset, sources)`: a `datasets.DatasetDict` (or `IterableDatasetDict`), and for each split the keyword
        arguments `format_qas_dataset` names its rows with in errors: `{"source": ..., "line_numbers": ...}` (the
        line numbers when the split is one local JSONL file, else None).
    """
    from datasets import load_dataset

    split_files = {}  # split -> its one local file, whose line numbers errors name
    lines = {}  # local file -> the line number of each of its rows
    if os.path.isfile(name_or_path):
        if not name_or_path.endswith((".json", ".jsonl")):
            raise ValueError(f"Local dataset files must be .json or .jsonl, got {name_or_path!r}.")
        split_files["train"] = os.path.realpath(name_or_path)
        lines[split_files["train"]] = check_json_file(name_or_path)
        dataset = load_json_files({"train": name_or_path}, streaming)
    elif os.path.isdir(name_or_path):
        for file in sorted(os.listdir(name_or_path)):
            if file.endswith((".json", ".jsonl")):
                path = os.path.join(name_or_path, file)
                lines[os.path.realpath(path)] = check_json_file(path)
        split_files = directory_split_files(name_or_path)
        dataset = load_json_files(
            split_files, streaming, lambda: load_dataset(name_or_path, name=config, streaming=streaming)
        )
    elif name_or_path.endswith((".json", ".jsonl")) or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"Dataset file not found: {name_or_path!r} (from `dataset_name`).")
    else:
        dataset = load_dataset(name_or_path, name=config, streaming=streaming)
    sources = {}
    for split in list(dataset):
        file = split_files.get(split)
        numbers = lines.get(file)
        if numbers is not None and not streaming and len(numbers) == len(dataset[split]):
            source = (
                name_or_path if os.path.isfile(name_or_path) else os.path.join(name_or_path, os.path.basename(file))
            )
            sources[split] = {"source": source, "line_numbers": numbers}
        else:
            sources[split] = {"source": f"{name_or_path} [{split}]", "line_numbers": None}
    return dataset, sources


def load_json_files(split_files: dict[str, str], streaming: bool, load=None):
    """`datasets.load_dataset` of local JSON files (`load`, by default the "json" builder on `split_files`), or, when
    it cannot infer one schema for rows whose fields differ (datasets 4.x stops with a KeyError when a row lacks a
    field that others have), the same `.jsonl` rows read here, each missing field None, so that the row checks name
    the row and the field instead."""
    from datasets import Dataset, DatasetDict, load_dataset

    try:
        if load is not None:
            return load()
        return load_dataset("json", data_files=split_files, streaming=streaming)
    except Exception:  # noqa: BLE001  (datasets' and pyarrow's schema errors have no common type)
        if streaming or not split_files or not all(f.endswith(".jsonl") for f in split_files.values()):
            raise
        splits = {}
        for split, path in split_files.items():
            rows = [row for _, row in read_jsonl(path)]
            if not all(isinstance(row, dict) for row in rows):
                raise
            fields = list(dict.fromkeys(key for row in rows for key in row))
            splits[split] = Dataset.from_dict({key: [row.get(key) for row in rows] for key in fields})
        return DatasetDict(splits)


def directory_split_files(directory: str) -> dict[str, str]:
    """`{split: file}` for each split that `datasets` reads from exactly one file of a local directory."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        files = DataFilesDict.from_patterns(get_data_patterns(directory), base_path=directory)
    except Exception:  # no pattern `datasets` knows: it reports the problem itself when loading
        return {}
    return {str(split): os.path.realpath(paths[0]) for split, paths in files.items() if len(paths) == 1}
