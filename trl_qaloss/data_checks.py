"""Start-up checks that a dataset gives the set loss something to train on, so that a bad dataset fails at once.

Two checks: `check_columns` on the raw dataset, before TRL prepares it (a missing field otherwise surfaces as a bare
`KeyError` from TRL's tokenization), and `check_set_targets` on the prepared one: at least one row must have a
target answer in its trained tokens, or the set loss would be 0 at every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from datasets import Dataset

from .engine.loss import count_target_answer_tokens
from .engine.parsing import parse_answer_tokens
from .engine.separators import QASeparators

# Rows parsed at a time; the scan stops at the first batch with a target answer, so a good dataset costs one batch.
SCAN_ROWS = 256


def check_columns(dataset, name: str, text_field: str, has_formatting_func: bool) -> None:
    """Raise a ValueError if `dataset` (a `datasets.Dataset`) has no field TRL can build trained tokens from.

    Accepted: `input_ids` (pre-tokenized), `messages` (conversations), `prompt` + `completion`, or `text_field`
    (plain text), or any columns when a formatting function builds the text.
    """
    columns = getattr(dataset, "column_names", None)
    if not isinstance(columns, list) or has_formatting_func:
        return  # an IterableDataset may not know its columns before iterating
    if "input_ids" in columns or "messages" in columns or text_field in columns:
        return
    if "prompt" in columns and "completion" in columns:
        return
    fix = (
        "Give it a `completion` column holding the `<QA> question? <A> answer ...` text next to `prompt`, a "
        f"`messages` column with assistant turns holding it, or a `{text_field}` column (`dataset_text_field`) with "
        "the whole text."
    )
    if "prompt" in columns:
        raise ValueError(f"`{name}` has a `prompt` column but no `completion` column (columns: {columns}). {fix}")
    raise ValueError(f"`{name}` has none of the fields SFTTrainer reads (its columns: {columns}). {fix}")


def check_chat_template(dataset, name: str, tokenizer, chat_template_path: str | None) -> None:
    """Raise a ValueError if `dataset`'s rows are chat messages and neither the tokenizer nor `chat_template_path`
    gives a chat template to turn them into text (TRL would fail deep inside transformers on the first row)."""
    from trl.data_utils import is_conversational

    if chat_template_path is not None or getattr(tokenizer, "chat_template", None) is not None:
        return
    if not isinstance(dataset, Dataset) or len(dataset) == 0 or not is_conversational(dataset[0]):
        return
    model = getattr(tokenizer, "name_or_path", "") or "the model"
    raise ValueError(
        f"`{name}` holds chat messages, but the tokenizer of {model} has no chat template to turn them into text. "
        "Set `chat_template_path` (a .jinja file, or a tokenizer directory whose template to use), or use a model "
        "whose tokenizer has one (e.g. an -Instruct model)."
    )


def answer_spans(labels: list[list[int]], seps: QASeparators) -> list[list[tuple[int, int]]]:
    """For each row of un-shifted `labels` (-100 where not trained), the `(first, last)` token positions of each
    target answer, read as the set loss reads them."""
    length = max((len(r) for r in labels), default=0)
    if length < 2:
        return [[] for _ in labels]
    padded = torch.full((len(labels), length), -100, dtype=torch.long)
    for i, r in enumerate(labels):
        padded[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    targets = padded[:, 1:]
    num_ids = seps.num_ids(targets)
    parsed = parse_answer_tokens(targets, targets != -100, seps, num_ids)
    spans: dict[tuple[int, int], tuple[int, int]] = {}
    for row, pos, answer in zip(parsed.row.tolist(), parsed.pos.tolist(), parsed.answer.tolist(), strict=True):
        first = spans.get((row, answer), (pos + 1, pos + 1))[0]  # target p is token p + 1
        spans[(row, answer)] = (first, pos + 1)
    rows: list[list[tuple[int, int]]] = [[] for _ in labels]
    for (row, _), span in sorted(spans.items()):
        rows[row].append(span)
    return rows


@dataclass
class TruncationReport:
    """What `max_length` cut from a prepared dataset: rows longer than it, and target answers not wholly kept."""

    rows: int = 0
    truncated_rows: int = 0
    answers: int = 0
    cut_answers: int = 0
    examples: list[int] = field(default_factory=list)  # indices of the first rows that lost an answer

    def message(self, name: str, max_length: int) -> str:
        rows = ", ".join(map(str, self.examples))
        return (
            f"`max_length={max_length}` truncates {self.truncated_rows} of {self.rows} rows of `{name}` and cuts "
            f"{self.cut_answers} of their {self.answers} target answers (e.g. rows {rows}): the set loss and the "
            "cross-entropy never see those answers. Raise `max_length`, or shorten the prompts."
        )


def truncation_report(dataset: Dataset, max_length: int, keep_end: bool, seps: QASeparators) -> TruncationReport:
    """Count, in an untruncated prepared dataset (`labels`), what truncating it to `max_length` cuts.

    An answer is cut when any of its tokens falls outside the kept `max_length` tokens (the first ones, or the last
    ones with `keep_end`).
    """
    report = TruncationReport(rows=len(dataset))
    start = 0
    for batch in dataset.select_columns(["labels"]).iter(SCAN_ROWS):
        for offset, (row, spans) in enumerate(zip(batch["labels"], answer_spans(batch["labels"], seps), strict=True)):
            report.answers += len(spans)
            if len(row) <= max_length:
                continue
            report.truncated_rows += 1
            first_kept = len(row) - max_length if keep_end else 0
            cut = sum(1 for first, last in spans if first < first_kept or last >= first_kept + max_length)
            if cut:
                report.cut_answers += cut
                if len(report.examples) < 3:
                    report.examples.append(start + offset)
        start += len(batch["labels"])
    return report


def _trained_text(row: list[int], tokenizer, limit: int = 120) -> str:
    text = tokenizer.decode([t for t in row if t != -100])
    return repr(text if len(text) <= limit else text[:limit] + "...")


def batch_targets(
    rows: list[list[int]], seq_lengths: list[list[int]] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The targets `[N, T-1]` of `N` prepared rows (their labels, -100 where not trained), shifted as a causal LM reads
    them, and with packed rows (`seq_lengths`: each row's sequence lengths) the bool `[N, T-1]` where a sequence
    starts, else None."""
    length = max(len(r) for r in rows)
    labels = torch.full((len(rows), max(length, 2)), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        labels[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    if seq_lengths is None:
        return labels[:, 1:], None
    seq_starts = torch.zeros_like(labels, dtype=torch.bool)
    for i, lengths in enumerate(seq_lengths):
        seq_starts[i, torch.tensor(lengths[:-1], dtype=torch.long).cumsum(0)] = True
    labels[seq_starts] = -100  # the collator masks each sequence's first token
    return labels[:, 1:], seq_starts[:, 1:]


def reasons_without_answer(targets: torch.Tensor, seps: QASeparators) -> list[str]:
    """Why each row of `targets` `[N, T]`, rows without a target answer, has none: `"all_masked"` (no trained token),
    `"no_qa"` (no `qa_token` among its trained tokens) or `"no_answer"` (items, but no answer)."""
    valid = targets != -100
    has_qa = (valid & (targets == seps.qa_id)).any(1)
    return ["all_masked" if not valid[i].any() else "no_answer" if has_qa[i] else "no_qa" for i in range(len(targets))]


def no_target_message(name: str, first: dict[str, tuple[int, list[int]]], tokenizer, args) -> str:
    """One line for when no row of `name` has a target answer: an example row (`first`: index and labels) of each
    reason found, and the fixes that work with the settings of `args` (the `QALossConfig`)."""
    qa_token, answer_token, question_end = args.qa_token, args.answer_token, args.question_end
    found = []
    if "all_masked" in first:
        found.append(f"rows whose labels are all masked (-100), e.g. row {first['all_masked'][0]}")
    if "no_qa" in first:
        index, row = first["no_qa"]
        found.append(
            f"rows without {qa_token!r} in their trained tokens, e.g. row {index}: {_trained_text(row, tokenizer)}"
        )
    if "no_answer" in first:
        index, row = first["no_answer"]
        found.append(
            f"rows with items but no answer (no {question_end!r} followed by {answer_token!r} and an answer), e.g. row "
            f"{index}: {_trained_text(row, tokenizer)}"
        )
    # What reads the items: the set loss (`lambda_set > 0`) and every answer order but "data".
    readers = [f"the set loss (lambda_set={args.lambda_set:g})"] if args.lambda_set > 0 else []
    readers += [f"answer_order={args.answer_order!r}"] if args.answer_order != "data" else []
    plain = " and ".join(
        ["`lambda_set=0`"] * (args.lambda_set > 0) + ["`answer_order=data`"] * (args.answer_order != "data")
    )
    return (
        f"No row of `{name}` has a question/answer item with an answer among its trained tokens, which "
        f"{' and '.join(readers)} need{'s' if len(readers) == 1 else ''}: {'; '.join(found)}. Fix: set `qa_token` "
        f"(now {qa_token!r}), `answer_token` (now {answer_token!r}) and `question_end` (now {question_end!r}) to the "
        f"separators the data uses, or write the completions as `{qa_token} question{question_end} {answer_token} "
        f"answer {answer_token} answer`; or set {plain} to train with the plain SFT loss on the data as it is."
    )


def check_set_targets(dataset, seps: QASeparators, tokenizer, name: str, args, hint: str | None = None) -> None:
    """Raise a ValueError if no row of the prepared `dataset` has a target answer among its trained tokens.

    `hint`: what truncation to `max_length` cut, if it cut target answers; it becomes the message.

    Reads `labels` (or `input_ids` when there are none), shifted as a causal LM reads them, with packed rows split at
    their `seq_lengths`. Stops at the first batch of rows that has an answer. `args`: the `QALossConfig`.
    """
    if not isinstance(dataset, Dataset):
        return  # an IterableDataset cannot be scanned without consuming it
    if len(dataset) == 0:
        raise ValueError(
            f"`{name}` has no rows left after preparation: TRL drops rows whose labels are all masked, e.g. when "
            f"the prompt alone fills `max_length={args.max_length}`. Raise `max_length` or shorten the prompts."
        )
    column = "labels" if "labels" in dataset.column_names else "input_ids"
    first: dict[str, tuple[int, list[int]]] = {}  # the first row of each reason, with its index
    start = 0
    for batch in dataset.select_columns([c for c in (column, "seq_lengths") if c in dataset.column_names]).iter(
        SCAN_ROWS
    ):
        rows = batch[column]
        targets, seq_starts = batch_targets(rows, batch.get("seq_lengths"))
        if count_target_answer_tokens(targets, seps, seq_starts):
            return
        for i, reason in enumerate(reasons_without_answer(targets, seps)):
            first.setdefault(reason, (start + i, rows[i]))
        start += len(rows)
    if hint:  # truncation cut the answers: that is the fix to name
        raise ValueError(f"No target answer of `{name}` is left after truncation to `max_length`. {hint}")
    raise ValueError(no_target_message(name, first, tokenizer, args))
