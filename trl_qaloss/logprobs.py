"""Log-probabilities of selected (position, token) entries, with one pass over the vocabulary each way.

Both the SFT cross-entropy and the set loss need `log_softmax(logits)[b, p, y]` at a few entries. Computing them
with `log_softmax` or per-pair `cross_entropy` copies vocabulary-sized rows per entry; here the forward reads each
needed row once (log-sum-exp and argmax in the same chunk) and the backward writes each row's gradient once.
Rows are processed in chunks so the extra memory is one chunk of float32 rows, whatever the logits' dtype.
"""

from __future__ import annotations

import torch

# Elements per float32 chunk of rows (32 MiB): large enough to amortize the loop, small next to real logits.
CHUNK_ELEMENTS = 1 << 23


def _row_chunks(num_rows: int, vocab_size: int):
    step = max(1, CHUNK_ELEMENTS // vocab_size)
    for start in range(0, num_rows, step):
        yield start, min(start + step, num_rows)


@torch.no_grad()
def vocab_stats(
    logits: torch.Tensor, rows_b: torch.Tensor, rows_p: torch.Tensor, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Log-sum-exp, argmax and (optionally) entropy of the rows `logits[rows_b, rows_p]`, computed in float32.

    Args:
        logits: `[B, T, V]`, any float dtype.
        rows_b, rows_p: `[R]` row coordinates.
    Returns:
        `lse` `[R]` float32, `argmax` `[R]` long, `entropy` `[R]` float32 or None.
    """
    num_rows, vocab_size = rows_b.numel(), logits.size(-1)
    lse = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    argmax = torch.empty(num_rows, dtype=torch.long, device=logits.device)
    entropy = torch.empty(num_rows, dtype=torch.float32, device=logits.device) if with_entropy else None
    for start, end in _row_chunks(num_rows, vocab_size):
        x = logits[rows_b[start:end], rows_p[start:end]].float()
        lse[start:end] = torch.logsumexp(x, dim=-1)
        argmax[start:end] = x.argmax(dim=-1)
        if with_entropy:
            logp = x - lse[start:end, None]
            p = logp.exp()
            # p * logp is 0 where p is 0, also for -inf logits (masked tokens), where the product would be NaN.
            entropy[start:end] = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    return lse, argmax, entropy


class _SelectedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows_b, rows_p, lse, entry_row, entry_token):
        eb, ep = rows_b[entry_row], rows_p[entry_row]
        ctx.save_for_backward(logits, rows_b, rows_p, lse, entry_row, entry_token)
        return logits[eb, ep, entry_token].float() - lse[entry_row]

    @staticmethod
    def backward(ctx, grad_out):
        logits, rows_b, rows_p, lse, entry_row, entry_token = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        if entry_row.numel() == 0:
            return grad, None, None, None, None, None
        # d logp[e] / d logits[row(e), v] = [v == y_e] - softmax(row)_v: each active row is written once.
        active, local = torch.unique(entry_row, return_inverse=True)
        order = torch.argsort(local)
        local, tokens, g = local[order], entry_token[order], grad_out[order].float()
        row_weight = torch.zeros(active.numel(), dtype=torch.float32, device=logits.device).index_add_(0, local, g)
        bounds = torch.searchsorted(local, torch.arange(active.numel() + 1, device=local.device)).tolist()
        for start, end in _row_chunks(active.numel(), logits.size(-1)):
            b, p = rows_b[active[start:end]], rows_p[active[start:end]]
            block = (logits[b, p].float() - lse[active[start:end], None]).exp_().mul_(-row_weight[start:end, None])
            lo, hi = bounds[start], bounds[end]
            block.index_put_((local[lo:hi] - start, tokens[lo:hi]), g[lo:hi], accumulate=True)
            grad[b, p] = block.to(grad.dtype)
        return grad, None, None, None, None, None


def selected_log_probs(
    logits: torch.Tensor,
    rows_b: torch.Tensor,
    rows_p: torch.Tensor,
    lse: torch.Tensor,
    entry_row: torch.Tensor,
    entry_token: torch.Tensor,
) -> torch.Tensor:
    """`log_softmax(logits[rows_b[r], rows_p[r]])[y]` for each entry (r, y), in float32, differentiable w.r.t. logits.

    Args:
        logits: `[B, T, V]`.
        rows_b, rows_p: `[R]` coordinates of the rows that entries may read; `lse` `[R]` their log-sum-exp
            (from `vocab_stats`).
        entry_row: `[E]` index into the rows; entry_token: `[E]` vocabulary index.
    Returns:
        `[E]` float32 log-probabilities. Always part of the graph, also when E == 0.
    """
    return _SelectedLogProbs.apply(logits, rows_b, rows_p, lse, entry_row, entry_token)
