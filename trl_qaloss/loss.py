"""The order-invariant answer-set loss, batched: parsing, IoU and pair cross-entropy as tensor operations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from .logprobs import log_sum_exp, selected_log_probs, vocab_stats
from .matching import AnswerSets, align_answers
from .parsing import AnswerTokens, parse_answer_tokens, sequence_index
from .separators import QASeparators

REDUCTIONS = ("mean", "sum")


@dataclass
class SetLossOutput:
    """Result of `set_matching_loss`.

    Attributes:
        loss: 0-dim float32 tensor, differentiable w.r.t. the logits.
        stats: `target_answers`, `target_tokens`, `matched`, `missing`, `extra` (counts) and `mean_iou` (over matched
            pairs, 0 if none).
    """

    loss: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class SetLossTerms:
    """The set loss of a batch before reduction, plus the per-position statistics computed on the way.

    Attributes:
        set_sum: 0-dim float32, sum of all pair costs.
        stats: as in `SetLossOutput`.
        rows_b, rows_p: `[R]` coordinates of the valid positions; argmax `[R]`; lse `[R]` their log-sum-exp (None
            unless `with_sft` or `with_entropy`: the set term alone reads only its pairs' rows); entropy `[R]` or
            None. Callers reuse them for the SFT term instead of another pass over the logits.
    """

    set_sum: torch.Tensor
    stats: dict[str, float]
    rows_b: torch.Tensor
    rows_p: torch.Tensor
    lse: torch.Tensor | None
    argmax: torch.Tensor
    entropy: torch.Tensor | None
    sft_log_probs: torch.Tensor | None = None


def _check_inputs(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str, position_ids: torch.Tensor | None = None
) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")
    if logits.dim() != 3 or targets.dim() != 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"Expected logits [B, T, V] and labels [B, T]; got {tuple(logits.shape)} and {tuple(targets.shape)}."
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}.")
    if position_ids is not None and position_ids.shape != targets.shape:
        raise ValueError(
            f"`position_ids` must have the labels' shape {tuple(targets.shape)}, got {tuple(position_ids.shape)}."
        )


def set_loss_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    seps: QASeparators,
    with_sft: bool = False,
    with_entropy: bool = False,
    seq_starts: torch.Tensor | None = None,
) -> SetLossTerms:
    """The set loss of a batch whose rows are already shifted: `logits[b, p]` predicts `targets[b, p]`.

    Args:
        logits: `[B, T, V]` with T >= P; positions p >= P are never read.
        targets: `[B, P]` target ids, -100 where ignored.
        seps: separators and token classes.
        with_sft: also return the log-probabilities of every valid target token (`sft_log_probs`, `[R]`), from the
            same pass over the logits and the same backward.
        with_entropy: also compute the entropy of every valid position (no gradient).
        seq_starts: optional `[B, P]` bool, True at the targets that start a packed sequence (see `seq_starts_from`):
            items never span two sequences, and are paired per sequence.
    """
    batch, num_pos = targets.shape
    vocab_size = logits.size(-1)
    device = logits.device
    targets = targets.to(device)
    valid = targets != -100
    rows_b, rows_p = valid.nonzero(as_tuple=True)  # [R]
    rows = rows_b * logits.size(1) + rows_p  # rows of logits.view(-1, V)
    with record_function("qaloss.vocab_stats"):
        # The SFT term and the entropy need every row's log-sum-exp; the set term alone only that of the rows its
        # pairs read, computed once those are known.
        stats_of_rows = vocab_stats(logits, rows, with_lse=with_sft or with_entropy, with_entropy=with_entropy)
    predictions = torch.zeros_like(targets)
    predictions[rows_b, rows_p] = stats_of_rows.argmax

    alignment = align_answers(targets, predictions, valid, seps, vocab_size, seq_starts)
    target_tokens, pred_tokens = alignment.target_tokens, alignment.pred_tokens
    target, pred, matching = alignment.target, alignment.pred, alignment.matching

    with record_function("qaloss.pair_ce"):
        seq_of = None if seq_starts is None else sequence_index(seq_starts, valid.shape, device)
        entry_b, entry_p, entry_y, num_uniform = _pair_entries(
            matching.matched_pred, matching.matched_target, pred_tokens, pred, target_tokens, target, valid, seq_of
        )
        # A pair token read at an invalid position, and every token of a missing answer, costs log(V): a uniform
        # guess.
        num_uniform = num_uniform + int(target.length[matching.missing_target].sum())

        # Map each entry to its row among the valid positions (entries are all at valid positions).
        row_of = torch.full((batch, num_pos), -1, dtype=torch.long, device=device)
        row_of[rows_b, rows_p] = torch.arange(rows_b.numel(), device=device)
        entry_row, entry_token = row_of[entry_b, entry_p], entry_y
        if with_sft:
            entry_row = torch.cat([torch.arange(rows_b.numel(), device=device), entry_row])
            entry_token = torch.cat([targets[rows_b, rows_p], entry_token])
        read_rows, lse = rows, stats_of_rows.lse
        if lse is None:
            read, entry_row = torch.unique(entry_row, return_inverse=True)
            read_rows = rows[read]
            lse = log_sum_exp(logits, read_rows, stats_of_rows.max[read])
        log_probs = selected_log_probs(logits, read_rows, lse, entry_row, entry_token)
        num_sft = rows_b.numel() if with_sft else 0
        set_sum = -log_probs[num_sft:].sum() + num_uniform * math.log(vocab_size)

    num_matched = matching.matched_pred.numel()
    stats = {
        "target_answers": float(target.length.numel()),
        "target_tokens": float(target_tokens.token.numel()),
        "matched": float(num_matched),
        "missing": float(matching.missing_target.numel()),
        "extra": float(matching.num_extra),
        "mean_iou": float(matching.matched_iou.mean()) if num_matched else 0.0,
    }
    return SetLossTerms(
        set_sum,
        stats,
        rows_b,
        rows_p,
        stats_of_rows.lse,
        stats_of_rows.argmax,
        stats_of_rows.entropy,
        log_probs[:num_sft] if with_sft else None,
    )


def _pair_entries(
    matched_pred: torch.Tensor,
    matched_target: torch.Tensor,
    pred_tokens: AnswerTokens,
    pred: AnswerSets,
    target_tokens: AnswerTokens,
    target: AnswerSets,
    valid: torch.Tensor,
    seq_of: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The (row, position, target token) read by every matched pair, and how many pair tokens fall off valid positions.

    Target answer j (tokens y_0..y_{L-1}) matched with predicted answer i starting at position s reads position s + t
    for y_t: the prediction is scored against the target's tokens from where it started. With `seq_of` (`[B, P]`
    sequence index of every position), a position of another sequence counts as off the valid positions.
    """
    device = target.length.device
    lengths = target.length[matched_target]  # [M]
    pair_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)  # [N_pair_tokens]
    offset = torch.arange(pair_of.numel(), device=device) - (lengths.cumsum(0) - lengths)[pair_of]
    target_entry = target.entry_start[matched_target][pair_of] + offset
    row = target_tokens.row[target_entry]
    start = pred_tokens.pos[pred.entry_start[matched_pred]][pair_of]
    pos = start + offset
    clamped = pos.clamp(max=valid.size(1) - 1)
    at_valid = (pos < valid.size(1)) & valid[row, clamped]
    if seq_of is not None:
        at_valid &= seq_of[row, clamped] == seq_of[row, start]
    return row[at_valid], pos[at_valid], target_tokens.token[target_entry][at_valid], int((~at_valid).sum())


def set_matching_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    seps: QASeparators,
    reduction: str = "mean",
    position_ids: torch.Tensor | None = None,
) -> SetLossOutput:
    """Order-invariant set-matching loss of a causal LM's teacher-forced predictions.

    Args:
        logits: `[B, T, V]` un-shifted logits (float32, bfloat16 or float16); the loss is computed in float32.
        labels: `[B, T]` un-shifted labels, -100 where ignored, as passed to a causal LM's forward.
        seps: from `QASeparators.from_tokenizer`.
        reduction: `"sum"` of all pair costs, or `"mean"`: that sum over the number of target answer tokens
            (0 when there are none).
        position_ids: optional `[B, T]`, as passed to the model; for packed (padding-free) rows, each 0 starts a new
            sequence: the loss is then the sum of the sequences' losses (for "sum").
    """
    _check_inputs(logits, labels, reduction, position_ids)
    terms = set_loss_terms(logits, labels[:, 1:], seps, seq_starts=seq_starts_from(position_ids))
    return SetLossOutput(reduce_set_loss(terms.set_sum, terms.stats["target_tokens"], reduction), terms.stats)


def reduce_set_loss(set_sum: torch.Tensor, num_target_tokens: float | torch.Tensor, reduction: str) -> torch.Tensor:
    """`set_sum` itself, or over `num_target_tokens` (a count or a 0-dim tensor, e.g. gathered across processes)."""
    if reduction == "sum":
        return set_sum
    # Clamped so that a batch without answers gives a zero that is still part of the graph.
    count = torch.as_tensor(num_target_tokens, dtype=torch.float32, device=set_sum.device)
    return set_sum / count.clamp(min=1)


def count_target_answer_tokens(
    targets: torch.Tensor, seps: QASeparators, seq_starts: torch.Tensor | None = None
) -> int:
    """Number of target answer tokens in shifted `targets` `[B, P]`: the denominator of the "mean" reduction."""
    valid = targets != -100
    num_ids = max(seps.vocab_size or 0, int(targets.max()) + 1 if targets.numel() else 1)
    return parse_answer_tokens(targets, valid, seps, num_ids, seq_starts).token.numel()


def seq_starts_from(position_ids: torch.Tensor | None, first: int = 0) -> torch.Tensor | None:
    """`[B, P]` bool sequence starts of the shifted targets `labels[:, first + 1:]`, from un-shifted `position_ids`.

    Target p is token `first + 1 + p`; a packed sequence starts where its position id is 0.
    """
    return None if position_ids is None else position_ids[:, first + 1 :] == 0
