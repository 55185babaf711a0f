"""Rows written with each item's answers in a training order, for any trainer: what `trl-qaloss prepare` writes.

Each row is tokenized as `SFTTrainer` tokenizes it (`sft_tokens`), its answers are ordered by the function
`QALossSFTTrainer` reorders its batches with (`item_answer_orders`, the plan of `reorder_answers`), and the new order
is written back into the row, in the row's own format: the `answers` lists of a structured row, the completion text of
a prompt/completion row, the text of a chat's messages, a `text` row's text. The written row is then tokenized again
and must give exactly the tokens `QALossSFTTrainer` trains on (`reorder_answers` on the row as read); a row that
does not is an error that names it. Plain SFT on the written rows therefore trains on what `QALossSFTTrainer`, with
that `answer_order` and `lambda_set=0`, trains on.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import format_qas, is_structured, row_location
from .engine.answer_order import item_answer_orders, reorder_answers
from .engine.appearance import TokenText
from .engine.parsing import QASpans, qa_text_spans
from .engine.separators import QASeparators


def with_eos(text: str, eos_token: str) -> str:
    """`text` ending with `eos_token`, as `SFTTrainer` appends it to rows that are not chats."""
    return text if text.endswith(eos_token) else text + eos_token


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    """How many leading tokens `ids` and `other` share: where `SFTTrainer` starts the completion."""
    length = 0
    while length < min(len(ids), len(other)) and ids[length] == other[length]:
        length += 1
    return length


def sft_tokens(tokenizer, row: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """`(input_ids, labels)` of a row in one of TRL's formats, tokenized as `SFTTrainer` tokenizes it by default.

    A prompt/completion row has its prompt unlabelled (completion-only loss), the completion starting where the
    tokenized prompt and prompt + completion part; a `messages` or `text` row has every token labelled; EOS is
    appended to text that is not a chat. Nothing is truncated.
    """
    from trl.data_utils import is_conversational

    template = {"tools": row.get("tools"), **(row.get("chat_template_kwargs") or {})}

    def chat(messages, **kwargs) -> list[int]:
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **template, **kwargs)
        return list(encoded["input_ids"])

    def text(value: str) -> list[int]:
        return list(tokenizer(text=value)["input_ids"])

    if "prompt" in row:
        if is_conversational(row):
            prompt_ids = chat(row["prompt"], add_generation_prompt=True)
            ids = chat(list(row["prompt"]) + list(row["completion"]))
        else:
            prompt_ids = text(row["prompt"])
            ids = text(row["prompt"] + with_eos(row["completion"], tokenizer.eos_token))
        prompt_length = common_prefix_length(prompt_ids, ids)
        return ids, [-100] * prompt_length + ids[prompt_length:]
    ids = chat(row["messages"]) if "messages" in row else text(with_eos(row["text"], tokenizer.eos_token))
    return ids, list(ids)


def permuted_answers(text: str, items: list[QASpans], orders: list[list[int]]) -> str:
    """`text` with the answers of each item moved: slot k of item i takes the answer `orders[i][k]`; everything
    between the answers stays in place."""
    pieces, end = [], 0
    for item, order in zip(items, orders, strict=True):
        for (start, stop), j in zip(item.answers, order, strict=True):
            pieces += [text[end:start], text[slice(*item.answers[j])]]
            end = stop
    return "".join([*pieces, text[end:]])


def text_holders(row: dict) -> list[tuple[dict, str]]:
    """`(container, key)` of each text of a row in one of TRL's formats that `SFTTrainer` trains on, in order."""
    if "prompt" in row:
        completion = row["completion"]
        return [(row, "completion")] if isinstance(completion, str) else [(m, "content") for m in completion]
    if "messages" in row:
        return [(m, "content") for m in row["messages"]]
    return [(row, "text")]


def reordered_row(row: dict, orders: list[list[int]], separators: tuple[str, str, str], where: str) -> dict:
    """A copy of `row` (structured, or in one of TRL's formats) with the answers of its items, the items
    `orders` numbers, in the order `orders` gives (see `item_answer_orders`)."""
    row = copy.deepcopy(row)
    mismatch = ValueError(
        f"{where}: its items and answers read differently as text and as tokens, so their order cannot be written "
        "back. Check that no answer is made only of special tokens or whitespace."
    )
    if is_structured(row.keys()):
        if [len(qa["answers"]) for qa in row["qas"]] != [len(o) for o in orders]:
            raise mismatch
        for qa, order in zip(row["qas"], orders, strict=True):
            qa["answers"] = [qa["answers"][j] for j in order]
        return row
    remaining = list(orders)
    for container, key in text_holders(row):
        if not isinstance(container.get(key), str):
            continue  # content that is not text (images, tool calls) holds no answers
        items = qa_text_spans(container[key], *separators)
        if [len(item.answers) for item in items] != [len(o) for o in remaining[: len(items)]]:
            raise mismatch
        container[key] = permuted_answers(container[key], items, remaining[: len(items)])
        remaining = remaining[len(items) :]
    if remaining:
        raise mismatch
    return row


def without_nulls(value):
    """`value` with every `null` left out of its objects: `datasets` fills the fields a row lacks with them."""
    if isinstance(value, Mapping):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def as_trl_row(row: dict, separators: tuple[str, str, str], index: int, source: str | None, line: int | None) -> dict:
    """A structured row converted by `format_qas` (its errors naming the row); a row in TRL's formats as it is."""
    if not is_structured(row.keys()):
        return row
    qa_token, answer_token, question_end = separators
    kwargs = dict(qa_token=qa_token, answer_token=answer_token, question_end=question_end)
    return format_qas(row, index, source=source, line=line, **kwargs)


@dataclass
class ReorderedRows:
    """Rows with their answers reordered, and how many items had an order to change and changed it."""

    rows: list[dict] = field(default_factory=list)
    items: int = 0  # items with two answers or more
    moved: int = 0  # of those, the items whose answers changed places


def reorder_rows(
    rows,
    order: str,
    tokenizer=None,
    separators: tuple[str, str, str] = ("<QA>", "<A>", "?"),
    source: str | None = None,
    line_numbers: list[int] | None = None,
    prompt_completion: bool = False,
) -> ReorderedRows:
    """Each of `rows` (structured, or in one of TRL's formats, all in one format) with its answers in `order`.

    Args:
        rows: an iterable of row dicts, e.g. a `datasets.Dataset` split as read.
        order: a model-free answer order: `"data"`, `"canonical"` or `"appearance"`.
        tokenizer: the tokenizer of the model to train, with the separators as single tokens; not read for "data".
        separators: `(qa_token, answer_token, question_end)`.
        source, line_numbers: where the rows come from, named in errors (as `format_qas_dataset` takes them).
        prompt_completion: return structured rows converted to TRL's prompt/completion rows (by `format_qas`, as
            `trl-qaloss train` converts them), instead of structured.
    Raises:
        ValueError: naming the row, for a row `format_qas` cannot convert, or whose written order does not tokenize
            to the tokens `QALossSFTTrainer` trains on.
    """
    seps = None if order == "data" else QASeparators.from_tokenizer(tokenizer, *separators)
    text = None if seps is None else TokenText(tokenizer)  # what "appearance" reads, built once
    result = ReorderedRows()
    for index, raw in enumerate(rows):
        row = without_nulls(raw)
        line = line_numbers[index] if line_numbers is not None else None
        where = row_location(index, source, line)
        trl_row = as_trl_row(row, separators, index, source, line)
        if seps is None:
            result.rows.append(trl_row if prompt_completion else row)
            continue
        ids, labels = (torch.tensor([t]) for t in sft_tokens(tokenizer, trl_row))
        orders = item_answer_orders(ids, labels, seps, order, tokenizer=text)
        new_row = reordered_row(row, orders, separators, where)
        expected = reorder_answers(ids, labels, seps, order, tokenizer=text)
        new_trl_row = as_trl_row(new_row, separators, index, source, line)
        if list(sft_tokens(tokenizer, new_trl_row)) != [t[0].tolist() for t in expected]:
            raise ValueError(
                f"{where}: with its answers reordered, the row tokenizes to other tokens than those "
                f"QALossSFTTrainer trains on (the tokenizer joins an answer with the text around it), so plain SFT "
                "on it would not train the same targets. Put whitespace between each answer and the separators."
            )
        result.items += sum(len(o) >= 2 for o in orders)
        result.moved += sum(o != sorted(o) for o in orders)
        result.rows.append(new_trl_row if prompt_completion else new_row)
    return result
