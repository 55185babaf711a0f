"""Parsing token rows into QA items and answers: a vectorized batch parser and the plain per-row one.

Both implement the same rules, on token ids:
1. each `qa_id` starts an item; tokens before the first one are ignored;
2. the question runs up to and including the first question-end token; an item without one has no answers;
3. after the question, each `answer_id` starts an answer, running to the next separator or the end of the row;
   tokens between the question end and the first `answer_id` are ignored; an answer keeps its non-skip tokens, and
   an answer with none is dropped.
Only valid positions (label != -100) are read, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .separators import QASeparators


@dataclass
class AnswerTokens:
    """Every kept answer token of a batch, one entry each, sorted by (row, position).

    Attributes:
        row, pos, token, item, answer: `[E]` long tensors. `item` is 1-based within the row; `answer` numbers the
            answers of the row from 1 in order (dropped empty answers leave gaps).
        num_items: `[B]` number of items in each row.
    """

    row: torch.Tensor
    pos: torch.Tensor
    token: torch.Tensor
    item: torch.Tensor
    answer: torch.Tensor
    num_items: torch.Tensor

    def select(self, keep: torch.Tensor) -> AnswerTokens:
        return AnswerTokens(
            self.row[keep], self.pos[keep], self.token[keep], self.item[keep], self.answer[keep], self.num_items
        )


def _count_since_last_qa(marks: torch.Tensor, is_qa: torch.Tensor) -> torch.Tensor:
    """Number of `marks` since the last QA token of the row, at every position. `marks`, `is_qa`: `[B, P]` bool."""
    total = marks.long().cumsum(1)
    # The running count is non-decreasing, so its value at the last QA token is a running max.
    at_last_qa = (total * is_qa).cummax(1).values
    return total - at_last_qa


def parse_answer_tokens(tokens: torch.Tensor, valid: torch.Tensor, seps: QASeparators, num_ids: int) -> AnswerTokens:
    """Parse a whole batch with cumulative sums over separator masks.

    Args:
        tokens: `[B, P]` token ids (any value where `valid` is False).
        valid: `[B, P]` bool, the positions to read.
        seps: the separators and token classes.
        num_ids: vocabulary size of the ids in `tokens`.
    """
    is_qend_table, is_skip_table = seps.masks(num_ids, tokens.device)
    tokens = torch.where(valid, tokens, 0)
    is_qa = valid & (tokens == seps.qa_id)
    is_answer = valid & (tokens == seps.answer_id)
    is_qend = valid & is_qend_table[tokens]
    item = is_qa.long().cumsum(1)
    after_question = _count_since_last_qa(is_qend, is_qa) > 0
    answer_start = is_answer & after_question & (item > 0)
    answer = answer_start.long().cumsum(1)
    # The count of answer starts since the last QA token is > 0 exactly inside an answer of the current item.
    in_answer = _count_since_last_qa(answer_start, is_qa) > 0
    keep = valid & in_answer & ~is_answer & ~is_qa & ~is_skip_table[tokens]
    row, pos = keep.nonzero(as_tuple=True)
    return AnswerTokens(row, pos, tokens[row, pos], item[row, pos], answer[row, pos], is_qa.sum(1))


Answer = list[tuple[int, int]]  # (position, token) pairs


def parse_row(tokens: list[int], positions: list[int], seps: QASeparators) -> list[list[Answer]]:
    """Parse one row, token by token: the items, each a list of answers, each a list of (position, token) pairs.

    `tokens[k]` sits at `positions[k]`; only the valid positions are passed.
    """
    items: list[list[Answer]] = []
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
            items[-1].append(answer)
        elif answer is not None and not seps.is_skip(tok):
            answer.append((pos, tok))
    return [[a for a in item if a] for item in items]


@dataclass
class QAItem:
    """One parsed item of a text completion: the question (without its end marker) and its answers, in order."""

    question: str
    answers: list[str]


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
    items = []
    for chunk in text.split(qa_token)[1:]:
        question, found, rest = chunk.partition(question_end)
        answers = [a.strip() for a in rest.split(answer_token)[1:]] if found else []
        items.append(QAItem(question.strip(), [a for a in answers if a]))
    return items
