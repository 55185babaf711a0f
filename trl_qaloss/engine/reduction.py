"""How a batch's set sum becomes the set loss: the one place to change or add a reduction.

A reduction is one branch in `reduction_count` (what a batch adds to the divisor) and one in `reduce_set_loss`, and
its name in `options.REDUCTIONS`.
Everything that reduces goes through these two: `set_matching_loss`, the reference, the trainer's loss (which sums
`reduction_count` over the accumulation window and the processes) and the trainer's logged `set_loss`.
"""

from __future__ import annotations

import torch


def reduction_count(reduction: str, stats: dict[str, float]) -> float:
    """What one batch adds to the divisor of `reduction`, from its counts (`SetLossOutput.stats` or `target_counts`).

    "mean": its target answer tokens. "sum": nothing (a sum is not divided).
    """
    if reduction == "sum":
        return 0.0
    return stats["target_tokens"]


def reduce_set_loss(
    set_sum: torch.Tensor, count: float | torch.Tensor, reduction: str, num_batches: int = 1
) -> torch.Tensor:
    """The set loss from `set_sum`, the sum of the pair costs of `num_batches` batches, and `count`, the sum of their
    `reduction_count`s (a number or a 0-dim tensor, e.g. gathered across processes).

    "mean": `set_sum / count` (a batch without answers gives a zero that is still part of the graph). "sum": the sum
    of one batch, `set_sum / num_batches` (the mean over processes when `set_sum` gathers several).
    """
    if reduction == "sum":
        return set_sum / num_batches if num_batches != 1 else set_sum
    count = torch.as_tensor(count, dtype=torch.float32, device=set_sum.device)
    return set_sum / count.clamp(min=1)
