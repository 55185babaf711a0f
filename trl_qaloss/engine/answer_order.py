"""Reordering each item's target answers before training on them: in data order, a canonical order, or the model's.

A causal LM trained with teacher forcing reads answer k in a context that already holds the target's answers
1..k-1. Any rule that decides which answer is trained where must therefore rewrite the *target sequence* itself, so
that every position's context stays consistent with what it is trained to predict. `reorder_answers` does that:

- `"data"`: the answers as given.
- `"canonical"`: sorted by the tuples of their non-skip token ids (a prefix sorts before its extensions; ties keep
  data order). Needs no model.
- `"appearance"`: the answers that occur in the item's prompt first, in the order of their first occurrence there,
  then the others in `"canonical"` order (ties of either kind: `"canonical"` order). "Occurs": the answer's text,
  normalized as the metrics normalize answers, appears in the prompt's normalized text on word boundaries; the
  prompt is everything before the item's completion (see `appearance.py`). Needs the tokenizer, no model.
- `"preferred"`: by descending log-probability of each answer's first non-skip token at the position that predicts
  the first non-skip token of the item's first answer (ties keep data order): the answer the model would start with
  comes first.
- `"aligned"`: the model's teacher-forced argmax is parsed into answers and aligned with the target answers by token
  IoU and the Hungarian algorithm, exactly as `set_matching_loss` aligns them; a target answer matched with IoU > 0
  to predicted answer i takes i's place in the order, the others follow in data order.

Rewriting rule, for every mode. Items and answers are parsed from the labelled tokens as the loss parses them. The
*core* of an answer runs from its `answer_id` token to its last non-skip token; an answer without a non-skip token
has no core and stays in place. Cores are permuted; the tokens between consecutive cores (whitespace, empty
answers) stay where they are. Row lengths, prompts, questions, other items, padding, `position_ids` and packed
sequence boundaries are unchanged, and `input_ids` and `labels` move together. An item whose answers span an
unlabelled token (a masked turn inside an item) keeps its order.

Dimension letters as in `loss.py`: B rows, T positions (un-shifted), P = T - 1 target positions, V vocabulary, A
target answers of the batch, I items, K kept scoring positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .appearance import TokenText, appearance_ranks, as_token_text
from .matching import Alignment, AnswerSets, align_answers, group_answers
from .options import MODEL_ORDERS, TEXT_ORDERS, check_answer_order
from .parsing import AnswerTokens, parse_answer_tokens, seq_starts_from
from .scoring import LogitsScorer
from .separators import QASeparators


@dataclass
class AnswerCores:
    """The target answers of a batch that have a core, in (row, item, answer) order: A answers, I items.

    Positions are shifted: target position p is token `p + 1` of the row, and `logits[:, p]` predicts it.

    Attributes:
        tokens: the parsed target answer tokens; sets: those tokens grouped into answers (`sets.item` `[A]` global
            item, `sets.index` `[A]` data index within the item, `sets.per_item` `[I]`).
        row, start, end: `[A]` row, position of the `answer_id` token and of the last non-skip token.
        frozen: `[I]` bool, items that keep their order because their answers span an unlabelled position.
    """

    tokens: AnswerTokens
    sets: AnswerSets
    row: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    frozen: torch.Tensor

    @property
    def first_token_pos(self) -> torch.Tensor:
        """`[A]` position of each answer's first non-skip token."""
        return self.tokens.pos[self.sets.entry_start]

    @property
    def first_token(self) -> torch.Tensor:
        """`[A]` id of each answer's first non-skip token."""
        return self.tokens.token[self.sets.entry_start]

    @property
    def first_of_item(self) -> torch.Tensor:
        """`[I]` index of each item's first answer (meaningless for an item without answers)."""
        return self.sets.per_item.cumsum(0) - self.sets.per_item


def cores_of(tokens: AnswerTokens, sets: AnswerSets, valid: torch.Tensor) -> AnswerCores:
    """The cores of parsed target answers. `tokens` must carry `start`; `valid`: `[B, P]` labelled positions."""
    last = sets.entry_start + sets.length - 1
    row, start, end = tokens.row[sets.entry_start], tokens.start[sets.entry_start], tokens.pos[last]
    # Labelled positions counted over the span from an item's first core start to its last core end.
    labelled_before = torch.nn.functional.pad(valid.long().cumsum(1), (1, 0))  # [B, P + 1]
    per_item = sets.per_item
    has_answers = (per_item > 0).nonzero().flatten()
    first = (per_item.cumsum(0) - per_item)[has_answers]
    last_answer = first + per_item[has_answers] - 1
    span_row, span_start, span_end = row[first], start[first], end[last_answer]
    labelled = labelled_before[span_row, span_end + 1] - labelled_before[span_row, span_start]
    frozen = torch.zeros_like(per_item, dtype=torch.bool)
    frozen[has_answers] = labelled != span_end + 1 - span_start
    return AnswerCores(tokens, sets, row, start, end, frozen)


def parse_cores(
    targets: torch.Tensor, seps: QASeparators, num_ids: int, seq_starts: torch.Tensor | None = None
) -> AnswerCores:
    """Parse shifted `targets` `[B, P]` (-100 where ignored) into their answer cores, items numbered like the loss's."""
    valid = targets != -100
    tokens = parse_answer_tokens(targets, valid, seps, num_ids, seq_starts)
    num_items = tokens.num_items
    item_offset = num_items.cumsum(0) - num_items  # [S]
    sets = group_answers(tokens, item_offset[tokens.seq] + tokens.item - 1, int(num_items.sum()))
    return cores_of(tokens, sets, valid)


def canonical_keys(cores: AnswerCores) -> np.ndarray:
    """`[A, L]` sort keys: each answer's non-skip token ids padded with -1, so that a prefix sorts first."""
    sets = cores.sets
    num_answers = sets.length.numel()
    width = int(sets.length.max()) if num_answers else 0
    keys = torch.full((num_answers, width), -1, dtype=torch.long, device=sets.length.device)
    answer_of = torch.repeat_interleave(torch.arange(num_answers, device=keys.device), sets.length)
    offset = torch.arange(answer_of.numel(), device=keys.device) - sets.entry_start[answer_of]
    keys[answer_of, offset] = cores.tokens.token
    return keys.cpu().numpy()


def appearance_keys(
    cores: AnswerCores, input_ids: torch.Tensor, targets: torch.Tensor, seps: QASeparators, seq_starts, text: TokenText
) -> np.ndarray:
    """`[A, 2 + L]` sort keys: each answer's rank in its item's prompt (`appearance.appearance_ranks`: present answers
    by first occurrence, then the absent ones), then its `canonical_keys`."""
    per_item = cores.sets.per_item
    ordered = ((per_item >= 2) & ~cores.frozen)[cores.sets.item]
    answers = (cores.row, cores.sets.item, cores.start, cores.end)
    ranks = appearance_ranks(input_ids, targets, seps, seq_starts, answers, ordered, text)
    return np.concatenate([ranks, canonical_keys(cores)], 1)


def preferred_score_positions(cores: AnswerCores) -> tuple[torch.Tensor, torch.Tensor]:
    """`([A], [A])` row and logits position that scores each answer: the position that predicts the first non-skip
    token of its item's first answer (the same position for every answer of an item)."""
    return cores.row, cores.first_token_pos[cores.first_of_item[cores.sets.item]]


def preferred_keys(scores: torch.Tensor) -> np.ndarray:
    """`[A, 1]` sort keys from `scores` `[A]`, each answer's first-token log-probability (or logit: the same order)
    at its scoring position: the highest score sorts first."""
    return (-scores.detach().float()).cpu().numpy()[:, None]


def aligned_keys(alignment: Alignment) -> np.ndarray:
    """`[A, 2]` sort keys: `(0, i)` for a target answer matched with IoU > 0 to predicted answer i of its item, and
    `(1, j)` for the others, j their data index."""
    target, matching = alignment.target_answers, alignment.matching
    placed = matching.matched_similarity > 0
    keys = torch.stack([torch.ones_like(target.index), target.index], 1)
    placed_pred = matching.matched_pred[placed]
    keys[matching.matched_target[placed]] = torch.stack(
        [torch.zeros_like(placed_pred), alignment.pred_answers.index[placed_pred]], 1
    )
    return keys.cpu().numpy()


def new_answer_order(cores: AnswerCores, keys: np.ndarray) -> torch.Tensor:
    """`[A]` the answer that goes to each answer slot: a stable sort by (item, keys), frozen items left as they are."""
    item = cores.sets.item.cpu().numpy()
    if item.size == 0:
        return cores.sets.item.clone()
    order = np.lexsort((*(keys[:, k] for k in range(keys.shape[1] - 1, -1, -1)), item))
    # The sort is by item first, so each item keeps its own range of slots; a frozen item takes back its order.
    frozen = cores.frozen.cpu().numpy()[item]
    order[frozen] = np.arange(item.size)[frozen]
    return torch.as_tensor(order, device=cores.sets.item.device)


def apply_answer_order(
    input_ids: torch.Tensor, labels: torch.Tensor, cores: AnswerCores, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the answer cores of each item into the slots `order` gives them; everything else stays in place.

    Args:
        input_ids, labels: `[B, T]` un-shifted.
        cores: the cores of `labels[:, 1:]`.
        order: `[A]`, `order[k]` is the answer whose core goes to answer slot k (slots and answers of an item
            numbered alike, in data order).
    Returns:
        New `(input_ids, labels)`, `[B, T]` each.
    """
    device = input_ids.device
    sets = cores.sets
    num_answers = sets.item.numel()
    if num_answers == 0:
        return input_ids.clone(), labels.clone()
    # Per slot k of an item with n answers: the core moved there, then (k < n - 1) the gap that followed slot k.
    last_of_item = torch.ones(num_answers, dtype=torch.bool, device=device)
    last_of_item[:-1] = sets.item[1:] != sets.item[:-1]
    next_start = torch.cat([cores.start[1:], cores.start[-1:]])
    gap_length = torch.where(last_of_item, 0, next_start - cores.end - 1)
    segment_source = torch.stack([cores.start[order], cores.end + 1], 1).flatten()  # [2A]
    segment_length = torch.stack([(cores.end - cores.start + 1)[order], gap_length], 1).flatten()
    segment_item = sets.item.repeat_interleave(2)
    # Segments of an item are laid out one after the other from its first core's start.
    ends = segment_length.cumsum(0)
    first_segment = 2 * cores.first_of_item[segment_item]
    segment_dest = (
        cores.start[cores.first_of_item[segment_item]]
        + (ends - segment_length)
        - (ends[first_segment] - segment_length[first_segment])
    )
    token_segment = torch.repeat_interleave(torch.arange(segment_length.numel(), device=device), segment_length)
    offset = torch.arange(token_segment.numel(), device=device) - (ends - segment_length)[token_segment]
    row = cores.row.repeat_interleave(2)[token_segment]
    # Shifted positions p are tokens p + 1 of the un-shifted rows.
    source = torch.arange(input_ids.size(1), device=device).expand_as(input_ids).clone()
    source[row, segment_dest[token_segment] + offset + 1] = segment_source[token_segment] + offset + 1
    return input_ids.gather(1, source), labels.gather(1, source.to(labels.device))


def check_reorder_inputs(
    input_ids, labels, order: str, logits=None, position_ids=None, scorer=None, tokenizer=None
) -> None:
    """Raise a ValueError naming the argument when the inputs of `reorder_answers` do not fit together."""
    check_answer_order(order)
    if order in TEXT_ORDERS and tokenizer is None:
        raise ValueError(f"`answer_order={order!r}` reads text: it needs the `tokenizer` that made `input_ids`.")
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(
            f"`input_ids` and `labels` must both be [B, T]; got {tuple(input_ids.shape)} and {tuple(labels.shape)}."
        )
    if position_ids is not None and position_ids.shape != labels.shape:
        raise ValueError(
            f"`position_ids` must have the labels' shape {tuple(labels.shape)}, got {tuple(position_ids.shape)}."
        )
    if order in MODEL_ORDERS and scorer is None:
        if logits is None:
            raise ValueError(f"`answer_order={order!r}` needs the `logits` of a forward on `input_ids`.")
        if logits.dim() != 3 or logits.shape[:2] != labels.shape or not logits.is_floating_point():
            raise ValueError(
                f"`logits` must be float [B, T, V] with [B, T] = {tuple(labels.shape)}; got {logits.dtype} "
                f"{tuple(logits.shape)}."
            )


def answer_keys(
    order: str,
    targets: torch.Tensor,
    seps: QASeparators,
    seq_starts: torch.Tensor | None,
    scorer,
    input_ids: torch.Tensor | None = None,
    text: TokenText | None = None,
) -> tuple[AnswerCores, np.ndarray] | None:
    """The answer cores of shifted `targets` `[B, P]` and their sort keys `[A, L]` under `order` (not "data"), or
    None when no item has two answers to order (then the scorer is never asked). `scorer`: see `scoring.py`;
    `input_ids` `[B, T]` and `text`: what `"appearance"` reads."""
    cores = parse_cores(targets, seps, seps.num_ids(targets), seq_starts)
    if not cores.sets.per_item.numel() or int(cores.sets.per_item.max()) < 2:
        return None
    if order == "canonical":
        return cores, canonical_keys(cores)
    if order == "appearance":
        return cores, appearance_keys(cores, input_ids, targets, seps, seq_starts, text)
    if order == "preferred":
        rows, positions = preferred_score_positions(cores)
        kept, index = positions.unique(return_inverse=True)
        return cores, preferred_keys(scorer.logits_at(kept)[rows, index, cores.first_token])
    predictions = scorer.argmax(targets)
    valid = targets != -100
    # Models often have more output rows than the tokenizer has tokens; those ids are skip tokens.
    alignment = align_answers(targets, predictions, valid, seps, seps.num_ids(targets, predictions), seq_starts)
    return cores_of(alignment.target_tokens, alignment.target_answers, valid), aligned_keys(alignment)


def plan_answer_order(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    seps: QASeparators,
    order: str,
    logits: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    scorer=None,
    tokenizer=None,
) -> tuple[AnswerCores, torch.Tensor] | None:
    """The answer cores of a batch and the new order of their slots (`new_answer_order`), or None when nothing moves.
    Arguments as in `reorder_answers`, checked by it."""
    if order == "data":
        return None
    if scorer is None and order in MODEL_ORDERS:
        scorer = LogitsScorer(logits)
    text = as_token_text(tokenizer) if order in TEXT_ORDERS else None
    ordered = answer_keys(order, labels[:, 1:], seps, seq_starts_from(position_ids), scorer, input_ids, text)
    if ordered is None:
        return None
    cores, keys = ordered
    return cores, new_answer_order(cores, keys)


def reorder_answers(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    seps: QASeparators,
    order: str = "data",
    logits: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    scorer=None,
    tokenizer=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder the answers of every item of a batch, rewriting `input_ids` and `labels` together.

    Args:
        input_ids: `[B, T]` token ids, as passed to a causal LM.
        labels: `[B, T]` un-shifted labels, -100 where ignored; items and answers are read from them.
        seps: from `QASeparators.from_tokenizer`.
        order: `"data"`, `"canonical"`, `"appearance"`, `"preferred"` or `"aligned"` (see the module docstring).
        logits: `[B, T, V]` un-shifted logits of a forward on `input_ids`, any float dtype; what `"preferred"` and
            `"aligned"` read unless `scorer` is given, ignored by the others.
        position_ids: optional `[B, T]`; in packed rows each 0 starts a sequence, and no item spans two.
        scorer: instead of `logits`, where `"preferred"` and `"aligned"` get the model's scores: a
            `scoring.ModelScorer` runs the model for only what they read (as `QALossSFTTrainer` does).
        tokenizer: what `"appearance"` decodes the prompts and answers with: the tokenizer that made `input_ids`
            (or an `appearance.TokenText` of it); ignored by the others.
    Returns:
        New `(input_ids, labels)` tensors of the same shapes; the inputs are never modified.
    """
    check_reorder_inputs(input_ids, labels, order, logits, position_ids, scorer, tokenizer)
    planned = plan_answer_order(input_ids, labels, seps, order, logits, position_ids, scorer, tokenizer)
    if planned is None:
        return input_ids.clone(), labels.clone()
    return apply_answer_order(input_ids, labels, *planned)


def item_answer_orders(
    input_ids: torch.Tensor, labels: torch.Tensor, seps: QASeparators, order: str, tokenizer=None
) -> list[list[int]]:
    """Where each answer of each item goes under a model-free `order`, as `reorder_answers` moves it.

    Returns one list per item of the batch (numbered as the loss numbers them: by row, then position): the data
    indices of its answers that have a core, in their new order. Arguments as in `reorder_answers`.
    """
    if order in MODEL_ORDERS:
        raise ValueError(f"`answer_order={order!r}` reads the model: its order exists only while training.")
    check_reorder_inputs(input_ids, labels, order, tokenizer=tokenizer)
    planned = plan_answer_order(input_ids, labels, seps, order, tokenizer=tokenizer)
    if planned is None:  # nothing moves: every answer stays in its slot
        cores = parse_cores(labels[:, 1:], seps, seps.num_ids(labels[:, 1:]))
        planned = cores, torch.arange(cores.sets.item.numel(), device=cores.sets.item.device)
    cores, new_order = planned
    orders: list[list[int]] = [[] for _ in range(cores.sets.per_item.numel())]
    for item, index in zip(cores.sets.item.tolist(), cores.sets.index[new_order].tolist(), strict=True):
        orders[item].append(index)
    return orders
