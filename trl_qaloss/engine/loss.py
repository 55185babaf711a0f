"""The order-invariant answer-set loss, batched: parsing, matching, pair costs and log-probabilities as tensor steps.

Where each rule lives:
- parsing items and answers: `parsing.py`;
- the similarity of two answers: `similarity.token_iou`, used by `matching.AnswerSetMatcher`;
- what each target token costs once answers are matched: `pair_costs` (below);
- how the summed costs are reduced: `reduction.py`.

Dimension letters, here and in the modules above (each letter has one meaning):
    B rows of the batch            T positions of a row (un-shifted: logits and labels as the model sees them)
    P = T - 1 target positions     (shifted: `logits[:, p]` predicts `targets[:, p]`, which is label `p + 1`)
    V vocabulary                   R labelled positions of the batch (label != -100)
    S packed sequences (S = B without packing)
    I items of the batch           A answers of one side (target or predicted)
    E answer tokens of one side    L tokens of one answer
    N answers per item after padding with empty answers
    M matched pairs                U missing target answers
    C entries read by the matched pairs (one per target token of a pair read at a labelled position)
    K positions kept by a scoring forward (`scoring.py`)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from .logprobs import VocabStats, log_sum_exp, selected_log_probs, vocab_stats
from .matching import Alignment, align_answers
from .options import REDUCTIONS, check_choice
from .parsing import parse_answer_tokens, seq_starts_from, sequence_index
from .reduction import reduce_set_loss, reduction_count
from .separators import QASeparators


@dataclass
class SetLossOutput:
    """Result of `set_matching_loss`.

    Attributes:
        loss: 0-dim float32 tensor, differentiable w.r.t. the logits.
        stats: `target_answers`, `target_tokens`, `matched`, `missing`, `extra` (counts) and `mean_iou` (the mean
            similarity of the matched pairs, 0 if none).
    """

    loss: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class SetLossTerms:
    """The set loss of a batch before reduction, plus the per-position statistics computed on the way.

    Attributes:
        set_sum: 0-dim float32, sum of all pair costs.
        stats: as in `SetLossOutput`.
        rows_b, rows_p: `[R]` coordinates of the labelled positions; argmax `[R]`; lse `[R]` their log-sum-exp (None
            unless `with_sft` or `with_entropy`: the set term alone reads only its pairs' rows); entropy `[R]` or
            None. Callers reuse them for the SFT term instead of another pass over the logits.
        sft_log_probs: `[R]` log-probability of every labelled target token (with `with_sft`), else None.
    """

    set_sum: torch.Tensor
    stats: dict[str, float]
    rows_b: torch.Tensor
    rows_p: torch.Tensor
    lse: torch.Tensor | None
    argmax: torch.Tensor
    entropy: torch.Tensor | None
    sft_log_probs: torch.Tensor | None = None


@dataclass
class PairCosts:
    """What the set loss of a batch is made of, from `pair_costs`.

    Attributes:
        read_row, read_pos, read_token: `[C]` the entries whose `-log p(read_token | row, pos)` the loss adds.
        uniform_tokens: the number of target tokens that cost `log V` each.
    """

    read_row: torch.Tensor
    read_pos: torch.Tensor
    read_token: torch.Tensor
    uniform_tokens: int

    def total(self, read_log_probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """The set sum: `-sum(read_log_probs) + uniform_tokens * log V`, `read_log_probs` `[C]` those of the entries."""
        return -read_log_probs.sum() + self.uniform_tokens * math.log(vocab_size)


def pair_costs(alignment: Alignment, valid: torch.Tensor, seq_starts: torch.Tensor | None = None) -> PairCosts:
    """The pair-cost rule: what every target answer token costs once each item's answers are matched.

    - Matched pair: target answer j (tokens y_0..y_{L-1}) matched with a predicted answer whose first kept token sits
      at position s. Token y_t is read at position s + t and costs `-log p(y_t)` there: the prediction is scored
      against the target's tokens from where it started.
    - A read position s + t past the end of the row, unlabelled (label -100), or in another packed sequence than s
      costs `log V` instead: a uniform guess.
    - Missing target answer (matched with an empty predicted answer, or its item has no predicted answer): each of
      its L tokens costs `log V`.
    - Extra predicted answer (matched with an empty target answer): costs nothing; the loss counts target tokens.

    Args:
        alignment: from `align_answers`.
        valid: `[B, P]` bool, the labelled positions.
        seq_starts: optional `[B, P]` bool sequence starts of packed rows.
    """
    target_tokens, pred_tokens = alignment.target_tokens, alignment.pred_tokens
    target, pred, matching = alignment.target_answers, alignment.pred_answers, alignment.matching
    device = target.length.device
    lengths = target.length[matching.matched_target]  # [M]
    pair_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)  # [pair tokens]
    offset = torch.arange(pair_of.numel(), device=device) - (lengths.cumsum(0) - lengths)[pair_of]
    target_entry = target.entry_start[matching.matched_target][pair_of] + offset
    row = target_tokens.row[target_entry]
    start = pred_tokens.pos[pred.entry_start[matching.matched_pred]][pair_of]
    pos = start + offset
    clamped = pos.clamp(max=valid.size(1) - 1)
    readable = (pos < valid.size(1)) & valid[row, clamped]
    if seq_starts is not None:
        seq_of = sequence_index(seq_starts, valid.shape, valid.device)
        readable &= seq_of[row, clamped] == seq_of[row, start]
    missing_tokens = int(target.length[matching.missing_target].sum())
    return PairCosts(
        read_row=row[readable],
        read_pos=pos[readable],
        read_token=target_tokens.token[target_entry][readable],
        uniform_tokens=int((~readable).sum()) + missing_tokens,
    )


def _check_inputs(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str, position_ids: torch.Tensor | None = None
) -> None:
    check_choice("reduction", reduction, REDUCTIONS)
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Expected logits [B, T, V] and labels [B, T]; got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}.")
    if position_ids is not None and position_ids.shape != labels.shape:
        raise ValueError(
            f"`position_ids` must have the labels' shape {tuple(labels.shape)}, got {tuple(position_ids.shape)}."
        )


def _labelled_position_stats(
    logits: torch.Tensor, valid: torch.Tensor, with_lse: bool, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, VocabStats]:
    """`(rows_b [R], rows_p [R], stats)`: the labelled positions and their max, argmax (and log-sum-exp, entropy)."""
    rows_b, rows_p = valid.nonzero(as_tuple=True)
    with record_function("qaloss.vocab_stats"):
        stats = vocab_stats(logits, rows_b * logits.size(1) + rows_p, with_lse=with_lse, with_entropy=with_entropy)
    return rows_b, rows_p, stats


def _read_log_probs(
    logits: torch.Tensor,
    rows_b: torch.Tensor,
    rows_p: torch.Tensor,
    position_stats: VocabStats,
    entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """`[n]` log-probabilities of the `entries` `(row, position, token)`, each `[n]` at labelled positions, in one
    pass over the logits rows they read (reusing the labelled positions' log-sum-exp when it was computed)."""
    entry_b, entry_p, entry_token = entries
    rows = rows_b * logits.size(1) + rows_p  # rows of logits.view(-1, V)
    # Map each entry to its index among the labelled positions.
    index_of = torch.full(logits.shape[:2], -1, dtype=torch.long, device=logits.device)
    index_of[rows_b, rows_p] = torch.arange(rows_b.numel(), device=logits.device)
    entry_index = index_of[entry_b, entry_p]
    read_rows, lse = rows, position_stats.lse
    if lse is None:
        read, entry_index = torch.unique(entry_index, return_inverse=True)
        read_rows = rows[read]
        lse = log_sum_exp(logits, read_rows, position_stats.max[read])
    return selected_log_probs(logits, read_rows, lse, entry_index, entry_token)


def set_loss_terms(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    seps: QASeparators,
    with_sft: bool = False,
    with_entropy: bool = False,
    seq_starts: torch.Tensor | None = None,
) -> SetLossTerms:
    """The set loss of a batch whose rows are already shifted: `logits[b, p]` predicts `target_ids[b, p]`.

    Steps: statistics of the labelled positions (the argmax is the prediction), `align_answers` (parse and match),
    `pair_costs` (the rule), then one read of the log-probabilities the costs (and the SFT term) need.

    Args:
        logits: `[B, T, V]` with T >= P; positions p >= P are never read.
        target_ids: `[B, P]` target ids, -100 where ignored.
        seps: separators and token classes.
        with_sft: also return the log-probabilities of every labelled target token (`sft_log_probs`, `[R]`), from the
            same pass over the logits and the same backward.
        with_entropy: also compute the entropy of every labelled position (no gradient).
        seq_starts: optional `[B, P]` bool, True at the targets that start a packed sequence (see `seq_starts_from`):
            items never span two sequences, and are paired per sequence.
    """
    vocab_size = logits.size(-1)
    target_ids = target_ids.to(logits.device)
    valid = target_ids != -100
    # The SFT term and the entropy need every labelled row's log-sum-exp; the set term alone only that of the rows
    # its pairs read, computed once those are known.
    rows_b, rows_p, position_stats = _labelled_position_stats(logits, valid, with_sft or with_entropy, with_entropy)
    predictions = torch.zeros_like(target_ids)
    predictions[rows_b, rows_p] = position_stats.argmax

    alignment = align_answers(target_ids, predictions, valid, seps, vocab_size, seq_starts)

    with record_function("qaloss.pair_ce"):
        costs = pair_costs(alignment, valid, seq_starts)
        entries = (costs.read_row, costs.read_pos, costs.read_token)
        num_sft = rows_b.numel() if with_sft else 0
        if with_sft:
            entries = (
                torch.cat([rows_b, entries[0]]),
                torch.cat([rows_p, entries[1]]),
                torch.cat([target_ids[rows_b, rows_p], entries[2]]),
            )
        log_probs = _read_log_probs(logits, rows_b, rows_p, position_stats, entries)
        set_sum = costs.total(log_probs[num_sft:], vocab_size)

    return SetLossTerms(
        set_sum=set_sum,
        stats=alignment_stats(alignment),
        rows_b=rows_b,
        rows_p=rows_p,
        lse=position_stats.lse,
        argmax=position_stats.argmax,
        entropy=position_stats.entropy,
        sft_log_probs=log_probs[:num_sft] if with_sft else None,
    )


def alignment_stats(alignment: Alignment) -> dict[str, float]:
    """The counts of `SetLossOutput.stats` from an alignment."""
    matching, target = alignment.matching, alignment.target_answers
    num_matched = matching.matched_pred.numel()
    return {
        "target_answers": float(target.length.numel()),
        "target_tokens": float(alignment.target_tokens.token.numel()),
        "matched": float(num_matched),
        "missing": float(matching.missing_target.numel()),
        "extra": float(matching.num_extra),
        "mean_iou": float(matching.matched_similarity.mean()) if num_matched else 0.0,
    }


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
            (0 when there are none). See `reduction.py`.
        position_ids: optional `[B, T]`, as passed to the model; for packed (padding-free) rows, each 0 starts a new
            sequence: the loss is then the sum of the sequences' losses (for "sum").
    """
    _check_inputs(logits, labels, reduction, position_ids)
    terms = set_loss_terms(logits, labels[:, 1:], seps, seq_starts=seq_starts_from(position_ids))
    loss = reduce_set_loss(terms.set_sum, reduction_count(reduction, terms.stats), reduction)
    return SetLossOutput(loss, terms.stats)


def target_counts(
    target_ids: torch.Tensor, seps: QASeparators, seq_starts: torch.Tensor | None = None
) -> dict[str, float]:
    """`target_answers` and `target_tokens` of shifted `target_ids` `[B, P]`, as the loss counts them, without
    logits: what `reduction_count` reads."""
    valid = target_ids != -100
    num_ids = seps.num_ids(target_ids)
    tokens = parse_answer_tokens(target_ids, valid, seps, num_ids, seq_starts)
    # Tokens are sorted by (row, position): each answer is a run of equal (row, answer number).
    starts_answer = torch.ones_like(tokens.row, dtype=torch.bool)
    starts_answer[1:] = (tokens.row[1:] != tokens.row[:-1]) | (tokens.answer[1:] != tokens.answer[:-1])
    return {"target_answers": float(starts_answer.sum()), "target_tokens": float(tokens.token.numel())}


def count_target_answer_tokens(
    target_ids: torch.Tensor, seps: QASeparators, seq_starts: torch.Tensor | None = None
) -> int:
    """Number of target answer tokens in shifted `target_ids` `[B, P]`."""
    return int(target_counts(target_ids, seps, seq_starts)["target_tokens"])
