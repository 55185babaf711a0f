"""Grouping parsed answers into per-item sets, similarity matrices, and the Hungarian assignment.

Dimension letters as in `loss.py`: A answers of one side, E their tokens, I items, N answers per item after padding,
M matched pairs, U missing target answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch.profiler import record_function

from .parsing import AnswerTokens, parse_answer_tokens
from .separators import QASeparators
from .similarity import token_iou


@dataclass
class AnswerSets:
    """The answers of a batch, one entry per answer, in (row, item, answer) order.

    Attributes:
        item: `[A]` global item index (items of all rows numbered in order, only the target's items).
        index: `[A]` index of the answer within its item.
        entry_start: `[A]` index of the answer's first token in the `AnswerTokens` it was grouped from.
        length: `[A]` number of tokens.
        per_item: `[I]` number of answers of each item.
    """

    item: torch.Tensor
    index: torch.Tensor
    entry_start: torch.Tensor
    length: torch.Tensor
    per_item: torch.Tensor


def group_answers(tokens: AnswerTokens, global_item: torch.Tensor, num_items: int) -> AnswerSets:
    """Group answer tokens (sorted by row and position) into answers. `global_item`: `[E]` item index of each token."""
    # Tokens are sorted by (row, position) and answer numbers grow along a row, so each answer is a run of tokens.
    key = tokens.row * (int(tokens.answer.max()) + 1 if tokens.answer.numel() else 1) + tokens.answer
    _, length = torch.unique_consecutive(key, return_counts=True)
    entry_start = length.cumsum(0) - length
    item = global_item[entry_start]
    per_item = torch.bincount(item, minlength=num_items)
    first_of_item = per_item.cumsum(0) - per_item
    index = torch.arange(item.numel(), device=item.device) - first_of_item[item]
    return AnswerSets(item, index, entry_start, length, per_item)


@dataclass
class Matching:
    """The Hungarian assignment of every item pair, as flat arrays.

    Attributes:
        matched_pred, matched_target: `[M]` answer indices (into the predicted / target `AnswerSets`) of pairs whose
            both sides are real answers; matched_similarity: `[M]` their similarity (float64).
        missing_target: `[U]` target answers assigned to an empty predicted answer.
        num_extra: predicted answers assigned to an empty target answer.
    """

    matched_pred: torch.Tensor
    matched_target: torch.Tensor
    matched_similarity: torch.Tensor
    missing_target: torch.Tensor
    num_extra: int


class AnswerSetMatcher:
    """Aligns predicted and target answers of each item pair by maximal similarity.

    For an item with m predicted and n target answers, both lists are padded with empty answers to N = max(m, n)
    and `linear_sum_assignment` solves the N x N matrix `-similarity`. The similarity (`token_iou` unless another is
    passed) is computed for all items at once from overlap counts, which come from one batched product of multi-hot
    token matrices; all matrices are copied to the host once, and the per-item assignment is the only loop.

    Args:
        similarity: `(intersection [I, N, N], pred_sizes [I, N], target_sizes [I, N]) -> [I, N, N]` float64, counts
            of distinct tokens (see `similarity.token_iou`).
    """

    def __init__(self, similarity=token_iou):
        self.similarity = similarity

    def __call__(
        self, pred_tokens: AnswerTokens, pred: AnswerSets, target_tokens: AnswerTokens, target: AnswerSets
    ) -> Matching:
        device = target.per_item.device
        num_items = target.per_item.numel()
        sizes = torch.maximum(pred.per_item, target.per_item)  # [I]
        with record_function("qaloss.iou"):
            counts = overlap_counts(pred_tokens, pred, target_tokens, target, int(sizes.max()) if num_items else 0)
            similarity = self.similarity(*counts)
            cost = (-similarity).cpu().numpy()

        with record_function("qaloss.assignment"):
            # Items where one side is empty have nothing to align: every answer there is missing or extra.
            to_solve = ((pred.per_item > 0) & (target.per_item > 0)).nonzero().flatten().tolist()
            sizes_host = sizes.tolist()
            items, rows, cols = [], [], []
            for i in to_solve:
                n = sizes_host[i]
                r, c = linear_sum_assignment(cost[i, :n, :n]) if n > 1 else (np.zeros(1, int), np.zeros(1, int))
                items.append(np.full(n, i))
                rows.append(r)
                cols.append(c)
            item, row, col = (
                torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0, int), device=device)
                for parts in (items, rows, cols)
            )

        m, n = pred.per_item[item], target.per_item[item]
        both = (row < m) & (col < n)
        pred_first = pred.per_item.cumsum(0) - pred.per_item
        target_first = target.per_item.cumsum(0) - target.per_item
        matched_pred = pred_first[item[both]] + row[both]
        matched_target = target_first[item[both]] + col[both]
        missing_in_solved = target_first[item[(row >= m)]] + col[row >= m]
        # Target answers of items without any predicted answer are missing as well.
        unsolved_target = pred.per_item[target.item] == 0
        missing = torch.cat([missing_in_solved, unsolved_target.nonzero().flatten()]).sort().values
        num_extra = int((col >= n).sum()) + int(pred.per_item[target.per_item == 0].sum())
        matched_similarity = similarity[item[both], row[both], col[both]]
        return Matching(matched_pred, matched_target, matched_similarity, missing, num_extra)


def overlap_counts(
    pred_tokens: AnswerTokens, pred: AnswerSets, target_tokens: AnswerTokens, target: AnswerSets, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct-token counts of every item's answers, padded with empty answers to `size` (N) per item.

    Returns:
        `(intersection [I, N, N], pred_sizes [I, N], target_sizes [I, N])`, float32 (small integers, exact):
        `intersection[i, a, b]` tokens predicted answer a and target answer b of item i share; the sizes, each
        answer's distinct tokens (0 on padding).
    """
    device = target.per_item.device
    num_items = target.per_item.numel()
    if size == 0:
        empty = torch.zeros(num_items, 0, device=device)
        return torch.zeros(num_items, 0, 0, device=device), empty, empty

    def answer_of_tokens(sets: AnswerSets) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(sets.length.numel(), device=device), sets.length)

    pred_answer, target_answer = answer_of_tokens(pred), answer_of_tokens(target)
    pred_item, target_item = pred.item[pred_answer], target.item[target_answer]
    # Number the distinct tokens of each item 0, 1, ... over both sides, so the multi-hot matrices stay small.
    vocab = int(torch.cat([pred_tokens.token, target_tokens.token]).max()) + 1
    keys = torch.cat([pred_item * vocab + pred_tokens.token, target_item * vocab + target_tokens.token])
    unique_keys, slot = torch.unique(keys, return_inverse=True)
    per_item = torch.bincount(unique_keys // vocab, minlength=num_items)
    slot = slot - (per_item.cumsum(0) - per_item)[keys // vocab]
    width = int(per_item.max())
    pred_slot, target_slot = slot[: pred_item.numel()], slot[pred_item.numel() :]

    pred_hot = torch.zeros(num_items, size, width, device=device)
    target_hot = torch.zeros(num_items, size, width, device=device)
    pred_hot[pred_item, pred.index[pred_answer], pred_slot] = 1.0
    target_hot[target_item, target.index[target_answer], target_slot] = 1.0
    intersection = torch.bmm(pred_hot, target_hot.transpose(1, 2))
    return intersection, pred_hot.sum(-1), target_hot.sum(-1)


@dataclass
class Alignment:
    """Parsed target and predicted answers of a batch and their assignment (see `align_answers`)."""

    target_tokens: AnswerTokens
    pred_tokens: AnswerTokens
    target_answers: AnswerSets
    pred_answers: AnswerSets
    matching: Matching


def align_answers(
    targets: torch.Tensor,
    predictions: torch.Tensor,
    valid: torch.Tensor,
    seps: QASeparators,
    num_ids: int,
    seq_starts: torch.Tensor | None = None,
    matcher: AnswerSetMatcher | None = None,
) -> Alignment:
    """Parse targets and predictions into answer sets and align every item's answers by their similarity.

    The k-th predicted item of a sequence is paired with its k-th target item; extra predicted items are ignored.

    Args:
        targets, predictions: `[B, P]` token ids (predictions: the argmax at each target's position).
        valid: `[B, P]` bool, the positions to read (labels != -100).
        seps: the separators and token classes. num_ids: vocabulary size.
        seq_starts: optional `[B, P]` bool sequence starts of packed rows.
        matcher: the `AnswerSetMatcher` (token IoU by default).
    """
    with record_function("qaloss.parse"):
        target_tokens = parse_answer_tokens(targets, valid, seps, num_ids, seq_starts)
        pred_tokens = parse_answer_tokens(predictions, valid, seps, num_ids, seq_starts)
        num_items = target_tokens.num_items
        item_offset = num_items.cumsum(0) - num_items  # [S]
        pred_tokens = pred_tokens.select(pred_tokens.item <= num_items[pred_tokens.seq])
        total_items = int(num_items.sum())
        target_answers = group_answers(
            target_tokens, item_offset[target_tokens.seq] + target_tokens.item - 1, total_items
        )
        pred_answers = group_answers(pred_tokens, item_offset[pred_tokens.seq] + pred_tokens.item - 1, total_items)
    matching = (matcher or AnswerSetMatcher())(pred_tokens, pred_answers, target_tokens, target_answers)
    return Alignment(
        target_tokens=target_tokens,
        pred_tokens=pred_tokens,
        target_answers=target_answers,
        pred_answers=pred_answers,
        matching=matching,
    )
