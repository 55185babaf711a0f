"""Parsing token rows into QA items and answers: a vectorized batch parser and the plain per-row one.

Both implement the same rules, on token ids:
1. each `qa_id` starts an item; tokens before the first one are ignored;
2. the question runs up to and including the first question-end token; an item without one has no answers;
3. after the question, each `answer_id` starts an answer, running to the next separator or the end of the row;
   tokens between the question end and the first `answer_id` are ignored; an answer keeps its non-skip tokens, and
   an answer with none is dropped.
Only valid positions (label != -100) are read, in order. With sequence starts (packed rows), each start closes any
open item, and items are numbered per sequence, so that no item spans two sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .separators import QASeparators


@dataclass
class AnswerTokens:
    """Every kept answer token of a batch, one entry each, sorted by (row, position).

    Attributes:
        row, pos, token, item, answer, seq: `[E]` long tensors. `item` is 1-based within the sequence; `answer`
            numbers the answers of the row from 1 in order (dropped empty answers leave gaps); `seq` is the global
            index of the token's sequence (the row itself when rows are not packed).
        start: `[E]` position of the `answer_id` token that starts the token's answer (None when not computed).
        num_items: `[S]` number of items in each sequence (S = B when rows are not packed).
    """

    row: torch.Tensor
    pos: torch.Tensor
    token: torch.Tensor
    item: torch.Tensor
    answer: torch.Tensor
    num_items: torch.Tensor
    seq: torch.Tensor | None = None
    start: torch.Tensor | None = None

    def __post_init__(self):
        if self.seq is None:  # rows that are not packed: each row is one sequence
            self.seq = self.row

    def select(self, keep: torch.Tensor) -> AnswerTokens:
        return AnswerTokens(
            self.row[keep],
            self.pos[keep],
            self.token[keep],
            self.item[keep],
            self.answer[keep],
            self.num_items,
            self.seq[keep],
            None if self.start is None else self.start[keep],
        )


def _count_since_last_qa(marks: torch.Tensor, is_qa: torch.Tensor) -> torch.Tensor:
    """Number of `marks` since the last QA token (or other item boundary) of the row, at every position.

    `marks`, `is_qa`: `[B, P]` bool.
    """
    total = marks.long().cumsum(1)
    # The running count is non-decreasing, so its value at the last QA token is a running max.
    at_last_qa = (total * is_qa).cummax(1).values
    return total - at_last_qa


def sequence_index(seq_starts: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """`[B, P]` global index of the sequence of every position; each row starts a sequence. `seq_starts`: `[B, P]`."""
    if seq_starts is None or shape[1] == 0:
        return torch.arange(shape[0], device=device)[:, None].expand(shape)
    starts = seq_starts.to(device=device, dtype=torch.bool).clone()
    starts[:, 0] = True
    counts = starts.long().cumsum(1)
    return counts - 1 + (counts[:, -1].cumsum(0) - counts[:, -1])[:, None]


def parse_answer_tokens(
    tokens: torch.Tensor, valid: torch.Tensor, seps: QASeparators, num_ids: int, seq_starts: torch.Tensor | None = None
) -> AnswerTokens:
    """Parse a whole batch with cumulative sums over separator masks.

    Args:
        tokens: `[B, P]` token ids (any value where `valid` is False).
        valid: `[B, P]` bool, the positions to read.
        seps: the separators and token classes.
        num_ids: vocabulary size of the ids in `tokens`.
        seq_starts: optional `[B, P]` bool, True where a packed sequence starts (valid or not).
    """
    is_qend_table, is_skip_table = seps.masks(num_ids, tokens.device)
    tokens = torch.where(valid, tokens, 0)
    is_qa = valid & (tokens == seps.qa_id)
    is_answer = valid & (tokens == seps.answer_id)
    is_qend = valid & is_qend_table[tokens]
    item = is_qa.long().cumsum(1)
    starts = is_qa
    if seq_starts is not None:
        seq_starts = seq_starts.to(device=tokens.device, dtype=torch.bool)
        # A sequence start closes the open item, like a QA token that opens none.
        starts = is_qa | seq_starts
        # Items are numbered from 1 in each sequence: the QA tokens strictly before its start (a non-decreasing
        # count, so its value at the last start is a running max) are subtracted.
        item = item - ((item - is_qa.long()) * seq_starts).cummax(1).values
    after_question = _count_since_last_qa(is_qend, starts) > 0
    answer_start = is_answer & after_question & (item > 0)
    answer = answer_start.long().cumsum(1)
    # The count of answer starts since the last QA token is > 0 exactly inside an answer of the current item.
    in_answer = _count_since_last_qa(answer_start, starts) > 0
    keep = valid & in_answer & ~is_answer & ~is_qa & ~is_skip_table[tokens]
    row, pos = keep.nonzero(as_tuple=True)
    # Answer starts come in increasing positions, so the last one at or before p is a running max (shifted by 1 so
    # that a start at position 0 counts).
    positions = torch.arange(1, tokens.size(1) + 1, device=tokens.device)
    answer_pos = (positions * answer_start).cummax(1).values - 1
    seq = sequence_index(seq_starts, tokens.shape, tokens.device)
    num_seqs = int(seq[-1, -1]) + 1 if seq.numel() else tokens.size(0)
    num_items = torch.zeros(num_seqs, dtype=torch.long, device=tokens.device).index_add_(
        0, seq.flatten(), is_qa.long().flatten()
    )
    return AnswerTokens(
        row, pos, tokens[row, pos], item[row, pos], answer[row, pos], num_items, seq[row, pos], answer_pos[row, pos]
    )


Answer = list[tuple[int, int]]  # (position, token) pairs


def parse_row_answers(tokens: list[int], positions: list[int], seps: QASeparators) -> list[list[tuple[int, Answer]]]:
    """Parse one row, token by token: the items, each a list of `(start, answer)`: the position of the answer's
    `answer_id` token and its (position, token) pairs. Answers without a kept token are dropped.

    `tokens[k]` sits at `positions[k]`; only the valid positions are passed.
    """
    items: list[list[tuple[int, Answer]]] = []
    in_question = False
    answer: Answer | None = None
    for pos, tok in zip(positions, tokens, strict=True):
        if tok == seps.qa_id:
            items.append([])
            in_question, answer = True, None
        elif not items:
            continue
        elif in_question:
            in_question = not seps.is_question_end(tok)
        elif tok == seps.answer_id:
            answer = []
            items[-1].append((pos, answer))
        elif answer is not None and not seps.is_skip(tok):
            answer.append((pos, tok))
    return [[(start, a) for start, a in item if a] for item in items]


def parse_row(tokens: list[int], positions: list[int], seps: QASeparators) -> list[list[Answer]]:
    """Parse one row, token by token: the items, each a list of answers, each a list of (position, token) pairs.

    `tokens[k]` sits at `positions[k]`; only the valid positions are passed.
    """
    return [[a for _, a in item] for item in parse_row_answers(tokens, positions, seps)]


@dataclass
class QAItem:
    """One parsed item of a text completion: the question (without its end marker) and its answers, in order."""

    question: str
    answers: list[str]


@dataclass
class QASpans:
    """Where one item of a text completion is: character offsets `(start, end)` into the text.

    Attributes:
        question: the question, stripped, without its end marker.
        answers: each answer that is not empty, from just after its `answer_token` to its last non-whitespace
            character (so with the whitespace before it, as a token carries it, and without the whitespace after).
    """

    question: tuple[int, int]
    answers: list[tuple[int, int]]


def _find_all(text: str, sub: str, start: int, end: int) -> list[int]:
    """The offsets of the non-overlapping occurrences of `sub` in `text[start:end]`, left to right."""
    found = []
    at = text.find(sub, start, end)
    while at >= 0:
        found.append(at)
        at = text.find(sub, at + len(sub), end)
    return found


def qa_text_spans(
    text: str, qa_token: str = "<QA>", answer_token: str = "<A>", question_end: str = "?"
) -> list[QASpans]:
    """Where the items and answers of a text completion are, by the rules of `parse_qa_text`."""
    items = []
    item_starts = _find_all(text, qa_token, 0, len(text))
    for k, qa_at in enumerate(item_starts):
        start, end = qa_at + len(qa_token), item_starts[k + 1] if k + 1 < len(item_starts) else len(text)
        question_end_at = text.find(question_end, start, end)
        question = text[start : end if question_end_at < 0 else question_end_at]
        lead = len(question) - len(question.lstrip())
        answers = []
        if question_end_at >= 0:
            answer_starts = _find_all(text, answer_token, question_end_at + len(question_end), end)
            for j, answer_at in enumerate(answer_starts):
                first = answer_at + len(answer_token)
                last = first + len(text[first : answer_starts[j + 1] if j + 1 < len(answer_starts) else end].rstrip())
                if text[first:last].strip():
                    answers.append((first, last))
        items.append(QASpans((start + lead, start + len(question.rstrip())), answers))
    return items


def parse_qa_text(
    text: str, qa_token: str = "<QA>", answer_token: str = "<A>", question_end: str = "?"
) -> list[QAItem]:
    """Parse a text completion with the module's rules, read on characters instead of token ids.

    The text is what the tokens decode to, with the special tokens other than the separators left out (the token
    parser skips them). Rule for rule: each `qa_token` starts an item and text before the first one is ignored; the
    question runs to the first `question_end`, and an item without one has no answers; after it, each `answer_token`
    starts an answer running to the next separator or the end, text between the question end and the first
    `answer_token` is ignored; answers are stripped and an empty one is dropped (the token parser drops answers made
    only of whitespace tokens).

    Example: `parse_qa_text("<QA> Who? <A> Ann <A> <A> Bob")` -> `[QAItem("Who", ["Ann", "Bob"])]`.
    """
    return [
        QAItem(text[slice(*item.question)], [text[slice(*a)].strip() for a in item.answers])
        for item in qa_text_spans(text, qa_token, answer_token, question_end)
    ]


def seq_starts_from(position_ids: torch.Tensor | None, first: int = 0) -> torch.Tensor | None:
    """`[B, P]` bool sequence starts of the shifted targets `labels[:, first + 1:]`, from un-shifted `position_ids`.

    Target p is token `first + 1 + p`; a packed sequence starts where its position id is 0.
    """
    return None if position_ids is None else position_ids[:, first + 1 :] == 0
