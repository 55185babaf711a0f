"""Plain per-row references: the set-matching loss (per example, per item, per pair, one cross-entropy call per
pair) and the answer reordering.

Kept as the executable specification the vectorized `set_matching_loss` and `reorder_answers` are tested and
benchmarked against.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .answer_order import check_reorder_inputs
from .appearance import ABSENT, as_token_text
from .loss import SetLossOutput, _check_inputs
from .normalization import first_occurrence
from .parsing import parse_row, parse_row_answers
from .reduction import reduce_set_loss, reduction_count
from .separators import QASeparators
from .similarity import token_iou


def _similarity(preds: list[set[int]], targets: list[set[int]]) -> np.ndarray:
    """`[n, m]` `token_iou` of every (predicted, target) pair of one item, its counts taken with Python sets."""
    intersection = torch.tensor([[len(p & t) for t in targets] for p in preds], dtype=torch.float64)
    pred_sizes = torch.tensor([len(p) for p in preds], dtype=torch.float64)
    target_sizes = torch.tensor([len(t) for t in targets], dtype=torch.float64)
    shape = (1, len(preds), len(targets))
    return token_iou(intersection.reshape(shape), pred_sizes.reshape(shape[:2]), target_sizes.reshape(1, -1)).numpy()[0]


def _sequences(positions: list[int], starts: list[bool] | None) -> list[list[int]]:
    """Split the valid positions of a row into its packed sequences; `starts[p]`: target p starts a sequence."""
    if starts is None:
        return [positions]
    valid = set(positions)
    groups: dict[int, list[int]] = {}
    seq = 0
    for p, start in enumerate(starts):
        seq += bool(start and p > 0)
        groups.setdefault(seq, [])
        if p in valid:
            groups[seq].append(p)
    return list(groups.values())


def set_matching_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    seps: QASeparators,
    reduction: str = "mean",
    position_ids: torch.Tensor | None = None,
) -> SetLossOutput:
    """Same contract and result as `trl_qaloss.set_matching_loss`, computed with plain Python loops.

    Packed rows (`position_ids`) are split into their sequences, each parsed and scored on its own.
    """
    _check_inputs(logits, labels, reduction, position_ids)
    lg, tg = logits[:, :-1], labels[:, 1:].to(logits.device)
    vocab_size = logits.size(-1)
    log_v = math.log(vocab_size)
    # An empty slice keeps the sum part of the graph even when no pair reads the logits.
    total = logits[:0].float().sum()
    target_answers = target_tokens = matched = missing = extra = 0
    ious = []
    rows = []
    for b in range(tg.size(0)):
        starts = None if position_ids is None else (position_ids[b, 1:] == 0).tolist()
        rows += [(b, seq) for seq in _sequences((tg[b] != -100).nonzero().flatten().tolist(), starts)]
    for b, positions in rows:
        valid = set(positions)
        target_items = parse_row(tg[b, positions].tolist(), positions, seps)
        pred_items = parse_row(lg[b, positions].argmax(-1).tolist(), positions, seps)
        for k, targets in enumerate(target_items):
            preds = pred_items[k] if k < len(pred_items) else []
            target_answers += len(targets)
            target_tokens += sum(len(t) for t in targets)
            n = max(len(preds), len(targets))
            padded_preds = preds + [[]] * (n - len(preds))
            padded_targets = targets + [[]] * (n - len(targets))
            iou = _similarity(
                [{tok for _, tok in p} for p in padded_preds], [{tok for _, tok in t} for t in padded_targets]
            )
            for i, j in zip(*linear_sum_assignment(-iou), strict=True):
                p, t = padded_preds[i], padded_targets[j]
                if not t:
                    extra += bool(p)
                elif not p:
                    missing += 1
                    total = total + len(t) * log_v
                else:
                    matched += 1
                    ious.append(iou[i, j])
                    start = p[0][0]
                    read = [(start + s, tok) for s, (_, tok) in enumerate(t) if start + s in valid]
                    if read:
                        pos = torch.tensor([q for q, _ in read], device=logits.device)
                        y = torch.tensor([tok for _, tok in read], device=logits.device)
                        total = total + F.cross_entropy(lg[b, pos].float(), y, reduction="sum")
                    total = total + (len(t) - len(read)) * log_v
    stats = {
        "target_answers": float(target_answers),
        "target_tokens": float(target_tokens),
        "matched": float(matched),
        "missing": float(missing),
        "extra": float(extra),
        "mean_iou": float(np.mean(ious)) if ious else 0.0,
    }
    return SetLossOutput(reduce_set_loss(total, reduction_count(reduction, stats), reduction), stats)


def _prompt_tokens(ids: list[int], targets: list[int], starts: list[bool] | None, qa_pos: int, qa_id: int) -> list[int]:
    """The tokens of the prompt of the item whose `qa_token` is target `qa_pos` of a row: from the start of its
    sequence to the first `qa_token` of the labelled run that holds it. `targets`: the row's shifted labels."""
    run = qa_pos  # back to the first labelled position of the run, which a sequence start also begins
    while run > 0 and targets[run - 1] != -100 and not (starts and starts[run]):
        run -= 1
    first_qa = next(p for p in range(run, qa_pos + 1) if targets[p] == qa_id)
    seq_starts = [p for p in range(qa_pos + 1) if starts and starts[p]]
    # Target p is token p + 1.
    return ids[(seq_starts[-1] + 1 if seq_starts else 0) : first_qa + 1]


def _appearance_key(answer_text: str, prompt_text: str, tokens: tuple) -> tuple:
    offset = first_occurrence(answer_text, prompt_text)
    return (ABSENT, 0, tokens) if offset is None else (0, offset, tokens)


def _item_order(order: str, answers: list, logits_row, pred_answers: list | None, texts=None) -> list[int]:
    """The data indices of an item's answers in their new order. `answers`: `[(start, [(pos, tok), ...]), ...]`;
    `texts`: for "appearance", the normalized prompt and the normalized text of each answer."""
    tuples = [tuple(tok for _, tok in a) for _, a in answers]
    if order == "canonical":
        return sorted(range(len(answers)), key=lambda j: tuples[j])
    if order == "appearance":
        prompt, answer_texts = texts
        return sorted(range(len(answers)), key=lambda j: _appearance_key(answer_texts[j], prompt, tuples[j]))
    if order == "preferred":
        scoring_pos = answers[0][1][0][0]
        scores = [float(logits_row[scoring_pos, t[0]].float()) for t in tuples]
        return sorted(range(len(answers)), key=lambda j: -scores[j])
    preds = [{tok for _, tok in p} for p in pred_answers]
    targets = [set(t) for t in tuples]
    n = max(len(preds), len(targets))
    preds, targets_padded = preds + [set()] * (n - len(preds)), targets + [set()] * (n - len(targets))
    iou = _similarity(preds, targets_padded)
    placed = {}
    for i, j in zip(*linear_sum_assignment(-iou), strict=True):
        if i < len(pred_answers) and j < len(targets) and iou[i, j] > 0:
            placed[j] = i
    return sorted(range(len(targets)), key=lambda j: (0, placed[j]) if j in placed else (1, j))


def reorder_answers_reference(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    seps: QASeparators,
    order: str = "data",
    logits: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    tokenizer=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and result as `trl_qaloss.reorder_answers`, item by item with plain Python lists."""
    check_reorder_inputs(input_ids, labels, order, logits, position_ids, tokenizer=tokenizer)
    new_ids, new_labels = input_ids.clone(), labels.clone()
    if order == "data":
        return new_ids, new_labels
    targets = labels[:, 1:]
    for b in range(targets.size(0)):
        starts = None if position_ids is None else (position_ids[b, 1:] == 0).tolist()
        row_ids, row_targets = input_ids[b].tolist(), targets[b].tolist()
        for positions in _sequences((targets[b] != -100).nonzero().flatten().tolist(), starts):
            valid = set(positions)
            items = parse_row_answers(targets[b, positions].tolist(), positions, seps)
            qa_positions = [p for p in positions if row_targets[p] == seps.qa_id]
            pred_items = []
            if order == "aligned":
                pred_items = parse_row(logits[b, positions].argmax(-1).tolist(), positions, seps)
            for k, answers in enumerate(items):
                spans = [(start, a[-1][0]) for start, a in answers]
                if not spans or any(p not in valid for p in range(spans[0][0], spans[-1][1] + 1)):
                    continue  # an item whose answers span an unlabelled position keeps its order
                preds = pred_items[k] if k < len(pred_items) else []
                texts = None
                if order == "appearance":
                    text = as_token_text(tokenizer)
                    prompt_ids = _prompt_tokens(row_ids, row_targets, starts, qa_positions[k], seps.qa_id)
                    (prompt,) = text.normalized([prompt_ids])
                    # An answer's text: its tokens after its `answer_id` token (target p is token p + 1).
                    texts = prompt, text.normalized([row_ids[start + 2 : a[-1][0] + 2] for start, a in answers])
                new_order = _item_order(order, answers, logits[b] if logits is not None else None, preds, texts)
                source = []
                for slot, j in enumerate(new_order):
                    source += range(spans[j][0], spans[j][1] + 1)
                    if slot + 1 < len(spans):
                        source += range(spans[slot][1] + 1, spans[slot + 1][0])
                # Shifted positions p are tokens p + 1 of the un-shifted rows.
                dest = torch.arange(spans[0][0], spans[-1][1] + 1) + 1
                source = torch.tensor(source, dtype=torch.long) + 1
                new_ids[b, dest] = input_ids[b, source]
                new_labels[b, dest] = labels[b, source]
    return new_ids, new_labels
