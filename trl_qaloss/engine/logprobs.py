"""Log-probabilities of selected (position, token) entries, reading each needed row of the logits once per pass.

Both the SFT cross-entropy and the set loss need `log_softmax(logits)[b, p, y]` at a few entries. Computing them
with `log_softmax` or per-pair `cross_entropy` copies vocabulary-sized rows per entry; here the forward reads each
needed row once (max and argmax in one reduction, the log-sum-exp from the same cached chunk) and the backward
writes each row's gradient once. Rows are gathered in small chunks that stay in the CPU cache (or are one small
block on a GPU) between the ops that read them: the extra memory is one chunk of float32 rows, whatever the logits'
dtype, and the logits are read from main memory once per pass.

Rows are addressed by their index in `logits.view(-1, V)`, i.e. `b * T + p` for `logits` `[B, T, V]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Elements per float32 chunk of rows. CPU (4 MiB): small enough to stay in cache between the ops on it, large enough
# that the per-chunk Python overhead stays far below the time to read it. GPU (128 MiB): few enough chunks that kernel
# launches do not dominate, a few percent of real logits (4 GiB at B=8, T=2048, V=128256 in bf16).
CHUNK_ELEMENTS = 1 << 20
CUDA_CHUNK_ELEMENTS = 1 << 25
# exp() of a float32 below this is 0; clamping there keeps 0 * (-inf) out of the entropy of masked logits.
_MIN_SHIFTED_LOGIT = -200.0


def rows_per_chunk(vocab_size: int, device: torch.device) -> int:
    return max(1, (CHUNK_ELEMENTS if device.type == "cpu" else CUDA_CHUNK_ELEMENTS) // vocab_size)


def row_chunks(num_rows: int, step: int):
    for start in range(0, num_rows, step):
        yield start, min(start + step, num_rows)


def rows_view(logits: torch.Tensor) -> torch.Tensor:
    """`logits` `[B, T, V]` as `[B * T, V]`: a view for any layout whose batch and time dims merge (model outputs
    always do); one copy otherwise."""
    try:
        return logits.view(-1, logits.size(-1))
    except RuntimeError:
        return logits.reshape(-1, logits.size(-1))


def _gather(flat: torch.Tensor, rows: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """`flat[rows]` as float32, written into (the first rows of) the reusable `buffer`."""
    out = buffer[: rows.numel()]
    if flat.dtype == torch.float32:
        return torch.index_select(flat, 0, rows, out=out)
    return out.copy_(flat.index_select(0, rows))


def _gathered_chunks(logits: torch.Tensor, rows: torch.Tensor):
    """Yield `(start, end, x)` over `rows` in cache-sized chunks, `x` `[end - start, V]` the float32 rows
    `logits.view(-1, V)[rows[start:end]]`, written into one reused buffer (valid until the next chunk)."""
    flat = rows_view(logits)
    step = rows_per_chunk(logits.size(-1), logits.device)
    buffer = torch.empty(min(step, rows.numel()), logits.size(-1), dtype=torch.float32, device=logits.device)
    for start, end in row_chunks(rows.numel(), step):
        yield start, end, _gather(flat, rows[start:end], buffer)


@dataclass
class VocabStats:
    """Per-row statistics over the vocabulary, float32 whatever the logits' dtype.

    Attributes:
        max: `[R]` largest logit; argmax: `[R]` its index (the first one on ties, like `argmax`).
        lse: `[R]` log-sum-exp, or None if not asked for. entropy: `[R]` or None.
    """

    max: torch.Tensor
    argmax: torch.Tensor
    lse: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


@torch.no_grad()
def vocab_stats(
    logits: torch.Tensor, rows: torch.Tensor, with_lse: bool = True, with_entropy: bool = False
) -> VocabStats:
    """Max, argmax and, optionally, log-sum-exp and entropy of the rows `logits.view(-1, V)[rows]`, in one read.

    Args:
        logits: `[B, T, V]`, any float dtype.
        rows: `[R]` row indices (`b * T + p`).
        with_lse, with_entropy: also compute the log-sum-exp (`with_entropy` implies it) and the entropy.
    """
    with_lse = with_lse or with_entropy
    num_rows = rows.numel()
    new = lambda dtype=torch.float32: torch.empty(num_rows, dtype=dtype, device=logits.device)  # noqa: E731
    stats = VocabStats(new(), new(torch.long), new() if with_lse else None, new() if with_entropy else None)
    exp_buffer = None
    for start, end, x in _gathered_chunks(logits, rows):
        row_max, row_argmax = x.max(dim=-1)
        stats.max[start:end], stats.argmax[start:end] = row_max, row_argmax
        if not with_lse:
            continue
        shifted = x.sub_(row_max[:, None])  # <= 0
        if with_entropy:
            if exp_buffer is None:  # the first chunk is the largest
                exp_buffer = torch.empty_like(x)
            e = torch.exp(shifted, out=exp_buffer[: end - start])
            total = e.sum(-1)
            # H = -sum p log p = log(total) - sum(e * shifted) / total, with p = e / total.
            weighted = e.mul_(shifted.clamp_(min=_MIN_SHIFTED_LOGIT)).sum(-1)
            stats.entropy[start:end] = total.log() - weighted / total
        else:
            total = shifted.exp_().sum(-1)
        stats.lse[start:end] = total.log_().add_(row_max)
    return stats


@torch.no_grad()
def log_sum_exp(logits: torch.Tensor, rows: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """`[R]` float32 log-sum-exp of the rows `logits.view(-1, V)[rows]`, given their `row_max` `[R]` (from
    `vocab_stats`): one read of each row, no second max reduction."""
    lse = torch.empty(rows.numel(), dtype=torch.float32, device=logits.device)
    for start, end, x in _gathered_chunks(logits, rows):
        m = row_max[start:end]
        lse[start:end] = x.sub_(m[:, None]).exp_().sum(-1).log_().add_(m)
    return lse


class _SelectedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows, lse, entry_row, entry_token):
        ctx.save_for_backward(logits, rows, lse, entry_row, entry_token)
        return rows_view(logits)[rows[entry_row], entry_token].float() - lse[entry_row]

    @staticmethod
    def backward(ctx, grad_out):
        logits, rows, lse, entry_row, entry_token = ctx.saved_tensors
        with torch.profiler.record_function("qaloss.log_probs_backward"):
            vocab_size = logits.size(-1)
            # Not zeros_like: every row an entry reads is written exactly once below, only the others are zeroed.
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            flat_grad = grad.view(-1, vocab_size)
            if entry_row.numel() == 0:
                return grad.zero_(), None, None, None, None
            # d logp[e] / d logits[row(e), v] = [v == y_e] - softmax(row)_v: each active row is written once.
            active, local = torch.unique(entry_row, return_inverse=True)
            untouched = torch.ones(flat_grad.size(0), dtype=torch.bool, device=grad.device)
            untouched[rows[active]] = False
            flat_grad.index_fill_(0, untouched.nonzero().flatten(), 0)
            order = torch.argsort(local)
            local, tokens, g = local[order], entry_token[order], grad_out[order].float()
            row_weight = torch.zeros(active.numel(), dtype=torch.float32, device=grad.device).index_add_(0, local, g)
            bounds = torch.searchsorted(local, torch.arange(active.numel() + 1, device=local.device)).tolist()
            read_rows = rows[active]
            for start, end, block in _gathered_chunks(logits, read_rows):
                block.sub_(lse[active[start:end], None]).exp_().mul_(-row_weight[start:end, None])
                lo, hi = bounds[start], bounds[end]
                block.index_put_((local[lo:hi] - start, tokens[lo:hi]), g[lo:hi], accumulate=True)
                flat_grad.index_copy_(0, read_rows[start:end], block.to(grad.dtype))
        return grad, None, None, None, None


def selected_log_probs(
    logits: torch.Tensor, rows: torch.Tensor, lse: torch.Tensor, entry_row: torch.Tensor, entry_token: torch.Tensor
) -> torch.Tensor:
    """`log_softmax(logits.view(-1, V)[rows[r]])[y]` for each entry (r, y), in float32, differentiable w.r.t. logits.

    Args:
        logits: `[B, T, V]`.
        rows: `[R]` distinct row indices (`b * T + p`) that entries may read; `lse` `[R]` their log-sum-exp.
        entry_row: `[E]` index into `rows`; entry_token: `[E]` vocabulary index.
    Returns:
        `[E]` float32 log-probabilities. Always part of the graph, also when E == 0. The gradient is dense (like any
        gradient of `logits`), zero on rows no entry reads.
    """
    return _SelectedLogProbs.apply(logits, rows, lse, entry_row, entry_token)
