"""The seed's naive set-matching loss: per example, per item, per pair, one cross-entropy call per pair.

Kept as the executable specification the vectorized `set_matching_loss` is tested and benchmarked against.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .loss import SetLossOutput, _check_inputs, reduce_set_loss
from .parsing import parse_row
from .separators import QASeparators


def _iou(a: set[int], b: set[int]) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 0.0


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
            iou = np.zeros((n, n))
            for i, p in enumerate(padded_preds):
                for j, t in enumerate(padded_targets):
                    iou[i, j] = _iou({tok for _, tok in p}, {tok for _, tok in t})
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
    return SetLossOutput(reduce_set_loss(total, target_tokens, reduction), stats)
