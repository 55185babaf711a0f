"""The similarity of a predicted and a target answer: the one place to change how answers are compared.

`token_iou` is a pure function of overlap counts. The vectorized matcher (`matching.AnswerSetMatcher`) and the plain
reference (`reference.py`) both count the overlaps their own way and call it, so a new similarity is one function
with the same signature, passed as `AnswerSetMatcher(similarity=...)` (and called by the reference).

Dimension letters: I items, N answers per item after padding with empty answers.
"""

from __future__ import annotations

import torch


def token_iou(intersection: torch.Tensor, pred_sizes: torch.Tensor, target_sizes: torch.Tensor) -> torch.Tensor:
    """Token IoU of every (predicted, target) answer pair of every item: `|a & b| / |a | b|` over token sets.

    Args:
        intersection: `[I, N, N]` number of distinct tokens predicted answer i and target answer j share.
        pred_sizes: `[I, N]` number of distinct tokens of each predicted answer (0 for padding).
        target_sizes: `[I, N]` the same for each target answer.
    Returns:
        `[I, N, N]` float64; 0 where both answers are empty (padding against padding).
    """
    intersection = intersection.double()
    union = pred_sizes.double()[:, :, None] + target_sizes.double()[:, None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1), 0.0)
