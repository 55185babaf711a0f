"""The chunked vocabulary passes against plain torch, and the set loss's restricted-rows path against the full one."""

from __future__ import annotations

import pytest
import torch

from tests.testing_utils import random_batch
from trl_qaloss import set_matching_loss
from trl_qaloss.engine import logprobs
from trl_qaloss.engine.logprobs import log_sum_exp, selected_log_probs, vocab_stats
from trl_qaloss.engine.loss import set_loss_terms
from trl_qaloss.engine.reference import set_matching_loss_reference


@pytest.fixture(params=[None, 3], ids=["one-chunk", "3-row-chunks"])
def chunk_rows(request, monkeypatch):
    """Runs a test with the default chunks and with chunks of 3 rows, so chunk edges are crossed."""
    if request.param is not None:
        monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 3 * 50)
    return request.param


def logits_and_rows(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(3, 7, 50, generator=gen)).to(dtype)
    logits[0, 2, :10] = float("-inf")  # masked tokens: the entropy must stay finite
    logits[1, 4] = 0.0  # a tie everywhere: the argmax is the first index, like torch.argmax
    rows = torch.tensor([0, 2, 3, 9, 11, 12, 15, 20])  # rows of logits.view(-1, 50), with gaps
    return logits, rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_stats_match_torch(chunk_rows, dtype):
    logits, rows = logits_and_rows(dtype)
    x = logits.view(-1, 50)[rows].float()
    stats = vocab_stats(logits, rows, with_entropy=True)
    assert torch.equal(stats.argmax, x.argmax(-1))
    torch.testing.assert_close(stats.max, x.max(-1).values)
    torch.testing.assert_close(stats.lse, torch.logsumexp(x, -1))
    logp = torch.log_softmax(x, -1)
    expected_entropy = -torch.where(logp.exp() > 0, logp.exp() * logp, 0.0).sum(-1)
    assert torch.isfinite(stats.entropy).all()
    torch.testing.assert_close(stats.entropy, expected_entropy, rtol=1e-5, atol=1e-5)

    argmax_only = vocab_stats(logits, rows, with_lse=False)
    assert argmax_only.lse is None and argmax_only.entropy is None
    assert torch.equal(argmax_only.argmax, stats.argmax)
    subset = rows[[1, 4, 6]]
    torch.testing.assert_close(log_sum_exp(logits, subset, stats.max[[1, 4, 6]]), stats.lse[[1, 4, 6]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_selected_log_probs_value_and_gradient(chunk_rows, dtype, layout):
    base, rows = logits_and_rows(dtype, seed=1)
    base[0, 2, :10] = -30.0  # finite, so the plain log_softmax gradient is defined everywhere
    if layout == "strided":  # a layout whose batch and time dims do not merge: read through one copy
        base = torch.cat([base, base], dim=-1)[..., :50]
    logits = base.detach().clone().requires_grad_(True) if layout == "contiguous" else base.requires_grad_(True)
    lse = vocab_stats(logits, rows).lse
    # Several entries per row (also twice the same token), rows without entries, and entries on the last row.
    entry_row = torch.tensor([0, 0, 0, 2, 5, 5, 7, 3])
    entry_token = torch.tensor([4, 4, 17, 0, 49, 3, 8, 11])
    weights = torch.linspace(0.5, 2.0, entry_row.numel())
    out = selected_log_probs(logits, rows, lse, entry_row, entry_token)
    (out * weights).sum().backward()

    plain = logits.detach().float().clone().requires_grad_(True)
    expected = torch.log_softmax(plain.view(-1, 50)[rows], -1)[entry_row, entry_token]
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        logits.grad.float(), plain.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3
    )
    untouched = torch.ones(21, dtype=torch.bool)
    untouched[rows[entry_row]] = False
    assert (logits.grad.reshape(-1, 50)[untouched] == 0).all()


def test_selected_log_probs_without_entries_is_a_connected_zero():
    logits, rows = logits_and_rows()
    logits.requires_grad_(True)
    none = torch.zeros(0, dtype=torch.long)
    out = selected_log_probs(logits, rows, vocab_stats(logits, rows).lse, none, none)
    out.sum().backward()
    assert out.numel() == 0 and (logits.grad == 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_restricted_rows_path_equals_the_full_one(seps, tokenizer, chunk_rows, seed):
    """The set loss alone computes the log-sum-exp of its pairs' rows only; with the entropy it has every row's."""
    logits, labels = random_batch(seps, len(tokenizer), batch=3, length=40, seed=seed, agree=0.8)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    restricted = set_loss_terms(a, labels[:, 1:], seps)
    full = set_loss_terms(b, labels[:, 1:], seps, with_entropy=True)
    assert restricted.lse is None and full.lse is not None
    assert restricted.stats == full.stats
    torch.testing.assert_close(restricted.set_sum, full.set_sum)
    restricted.set_sum.backward()
    full.set_sum.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_chunked_loss_and_gradient_match_reference(seps, tokenizer, chunk_rows):
    logits, labels = random_batch(seps, len(tokenizer), batch=3, length=50, seed=7, agree=0.9)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    out = set_matching_loss(a, labels, seps, reduction="sum")
    ref = set_matching_loss_reference(b, labels, seps, reduction="sum")
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
