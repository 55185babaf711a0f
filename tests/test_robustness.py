"""Malformed and adversarial input: property-based tests of the set loss, extreme logits, and garbage predictions.

Run with `--hypothesis-show-statistics` to see how many examples each property ran.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tests.strategies import ANS, PLAIN, PROFILE, QA, QEND, SEPS, SKIP, TOKENIZER, VOCAB, batches, packed_position_ids
from tests.testing_utils import STAT_KEYS, build_tokenizer, qa_config, qa_dataset, random_batch, tiny_llama
from trl_qaloss import QALossSFTTrainer, QASeparators, set_matching_loss
from trl_qaloss.engine.reference import set_matching_loss_reference


def sum_losses_agree(logits, labels, seps, position_ids):
    """`(out, ref, a, b)`: the vectorized and the reference "sum" losses of `a` and `b`, copies of `logits` that
    require grad, after checking that their losses and statistics agree."""
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    out = set_matching_loss(a, labels, seps, reduction="sum", position_ids=position_ids)
    ref = set_matching_loss_reference(b, labels, seps, reduction="sum", position_ids=position_ids)
    event(f"packed: {position_ids is not None}")
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-4)
    for key in STAT_KEYS:
        assert out.stats[key] == pytest.approx(ref.stats[key], rel=1e-9, abs=1e-12), key
    return out, ref, a, b


@settings(PROFILE, max_examples=60)
@given(batch=batches())
def test_adversarial_rows_match_reference(batch):
    """No exception, a finite loss, and vectorized == reference in loss, statistics and gradients."""
    logits, labels, position_ids = batch
    out, ref, a, b = sum_losses_agree(logits, labels, SEPS, position_ids)
    event(f"target answers: {'none' if not out.stats['target_answers'] else 'some'}")
    event(f"matched pairs: {'none' if not out.stats['matched'] else 'some'}")
    mean = set_matching_loss(logits, labels, SEPS, position_ids=position_ids).loss
    torch.testing.assert_close(mean, out.loss.detach() / max(out.stats["target_tokens"], 1), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert torch.isfinite(a.grad).all()
    # The reference builds a full-size gradient per pair: compared here where that stays cheap, and on items with
    # hundreds of answers with a small vocabulary below.
    if ref.stats["matched"] <= 40:
        ref.loss.backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


# A vocabulary of 24 ids keeps the reference's full-size gradient per pair cheap, so that the gradients of items with
# 100+ answers are compared too.
SMALL = QASeparators(qa_id=0, answer_id=1, question_end_ids=frozenset({2}), skip_ids=frozenset({3}), vocab_size=24)
SMALL_WORDS = list(range(4, 24))


@st.composite
def hundreds_of_answers(draw):
    """`(logits [B, T, 24], labels [B, T], position_ids or None)`: rows of one or two items with 100-160 answers each,
    predicted as a noisy copy (flipped tokens, separators among them), sometimes packed one item per sequence.

    Some 4-token answers are predicted split in two by an answer separator on their second token: the pairs of the
    two halves then read overlapping positions, in no position order."""
    rows, item_starts, long_answers = [], [], []
    for _ in range(draw(st.integers(1, 2))):
        row, starts, long_starts = [], [], []
        for _ in range(draw(st.integers(1, 2))):
            starts.append(1 + len(row))  # the skip token before the item: where a packed sequence may start
            row += [3, 0, draw(st.sampled_from(SMALL_WORDS)), 2]
            for k in range(draw(st.integers(100, 160))):
                if k % 4 == 3:
                    long_starts.append(len(row))
                row += [1] + [SMALL_WORDS[(k * 7 + j) % len(SMALL_WORDS)] for j in range(k % 4 + 1)]
        rows.append(row)
        item_starts.append(starts)
        long_answers.append(long_starts)
    length = max(map(len, rows)) + 1
    labels = torch.full((len(rows), length), -100)
    predicted = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        labels[b, 1 : 1 + len(row)] = torch.tensor(row)
        noisy = list(row)
        for pos, tok in draw(st.lists(st.tuples(st.integers(0, len(row) - 1), st.integers(1, 23)), max_size=60)):
            noisy[pos] = tok
        for k in draw(st.lists(st.integers(0, len(long_answers[b]) - 1), max_size=30)):
            noisy[long_answers[b][k] + 2] = 1
        predicted[b, 1 : 1 + len(row)] = torch.tensor(noisy)
    seed = draw(st.integers(0, 2**16))
    logits = torch.randn(len(rows), length, SMALL.vocab_size, generator=torch.Generator().manual_seed(seed))
    logits[:, :-1].scatter_(2, predicted[:, 1:, None], 6.0)
    position_ids = None
    if draw(st.booleans()):  # each item in a sequence of its own
        position_ids = packed_position_ids(labels.shape, [[c for c in starts if c > 1] for starts in item_starts])
        labels[position_ids == 0] = -100
    return logits, labels, position_ids


@settings(PROFILE, max_examples=6)
@given(batch=hundreds_of_answers())
def test_gradients_of_items_with_hundreds_of_answers_match_reference(batch):
    logits, labels, position_ids = batch
    out, ref, a, b = sum_losses_agree(logits, labels, SMALL, position_ids)
    assert out.stats["matched"] >= 100
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@st.composite
def permutable_rows(draw):
    """Target and predicted token rows with the same structure, and a permutation of the answer slots of each item.

    Each answer slot draws its tokens from its own pool, keeps its first token in the prediction and has the same
    length and whitespace positions on both sides: the Hungarian assignment is the slot identity, and each pair's cost
    depends only on the pair itself. Items may lack a `?`, carry `<A>` inside the question, empty or whitespace-only
    answers, and hundreds of answers.
    """
    pools = [PLAIN[i::40] for i in range(40)]  # disjoint pools of ~8 tokens
    items = []
    for _ in range(draw(st.integers(0, 3))):
        question = draw(st.lists(st.sampled_from([ANS, *PLAIN[:5], *SKIP[2:5]]), max_size=4))
        has_end = draw(st.booleans())
        num_answers = 120 if draw(st.integers(0, 9)) == 0 else draw(st.integers(0, 6))
        slots = []
        for k in range(num_answers):
            pool = pools[k % len(pools)] if num_answers <= len(pools) else [PLAIN[k % len(PLAIN)]]
            n = draw(st.integers(0, 4))
            kinds = draw(st.lists(st.sampled_from(["tok", "tok", "space"]), min_size=n, max_size=n))
            target, pred = [], []
            for kind in kinds:
                if kind == "space":
                    target.append(draw(st.sampled_from(SKIP)))
                    pred.append(draw(st.sampled_from(SKIP)))
                else:
                    target.append(draw(st.sampled_from(pool)))
                    first_kept = all(x in SEPS.skip_ids for x in target[:-1])
                    pred.append(target[-1] if first_kept else draw(st.sampled_from(pool)))
            slots.append((target, pred))
        items.append((question + ([draw(st.sampled_from(QEND))] if has_end else []), slots))
    perms = [draw(st.permutations(range(len(slots)))) for _, slots in items]
    return items, perms


def build(items, perms, side: int) -> list[int]:
    row = [SKIP[0]]  # position 0 is never a target
    for (question, slots), perm in zip(items, perms, strict=True):
        row += [QA] + question
        for k in perm:
            row += [ANS] + slots[k][side]
    return row + [TOKENIZER.eos_token_id]


@settings(PROFILE, max_examples=40)
@given(case=permutable_rows())
def test_permuting_answers_with_predictions_keeps_the_loss(case):
    items, perms = case
    identity = [list(range(len(slots))) for _, slots in items]
    # Logits rows depend only on the predicted token: a fixed random table, plus a bump on the prediction.
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0))
    table += 20.0 * torch.eye(VOCAB)
    results = []
    for order in (identity, perms):
        target, pred = build(items, order, 0), build(items, order, 1)
        labels = torch.tensor(target)[None]
        logits = table[torch.tensor(pred[1:] + [TOKENIZER.eos_token_id])][None]  # logits[p] predicts labels[p + 1]
        results.append(set_matching_loss(logits, labels, SEPS, reduction="sum"))
    base, permuted = results
    event(f"matched pairs: {'none' if not base.stats['matched'] else 'some'}")
    event(f"answers in the longest item: {'100+' if any(len(slots) >= 100 for _, slots in items) else '<100'}")
    torch.testing.assert_close(permuted.loss, base.loss, rtol=1e-5, atol=1e-4)
    for key in STAT_KEYS:
        assert permuted.stats[key] == pytest.approx(base.stats[key], rel=1e-9), key
    assert base.stats["missing"] == 0 and base.stats["extra"] == 0


@pytest.mark.parametrize(
    "dtype, scale", [(torch.bfloat16, 1e30), (torch.float16, 6e4), (torch.float32, 1e30), (torch.bfloat16, 1.0)]
)
@pytest.mark.parametrize("masked", [False, True])
def test_extreme_logits_stay_finite(dtype, scale, masked):
    """Huge and very negative logits, half precision, and `-inf` on masked vocabulary entries: finite loss and grad."""
    logits, labels = random_batch(SEPS, VOCAB, batch=3, length=60, seed=7, agree=0.6)
    logits = (logits.sign() * logits.abs().pow(3) * scale / logits.abs().pow(3).max()).clamp(-scale, scale)
    if masked:
        # Masked entries are never targets: a model cannot be taught a token its logits forbid.
        never = torch.ones(VOCAB, dtype=torch.bool)
        never[labels[labels != -100].unique()] = False
        logits[:, :, never.nonzero().flatten()[::2]] = -math.inf
    logits = logits.to(dtype).requires_grad_(True)
    for reduction in ("mean", "sum"):
        out = set_matching_loss(logits, labels, SEPS, reduction=reduction)
        assert torch.isfinite(out.loss), (reduction, out.loss)
        (grad,) = torch.autograd.grad(out.loss, logits)
        assert torch.isfinite(grad.float()).all()
        assert out.stats["target_answers"] > 0
        ref = set_matching_loss_reference(logits.detach(), labels, SEPS, reduction=reduction)
        torch.testing.assert_close(out.loss, ref.loss.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("precision", [{}, {"bf16": True}])
def test_garbage_predictions_train_without_crashing(tmp_path, precision):
    """A randomly initialised model predicts no well-formed item: every target answer is missing, training goes on."""
    tokenizer = build_tokenizer()
    args = qa_config(tmp_path, max_steps=3, learning_rate=5e-2, **precision)
    trainer = QALossSFTTrainer(
        model=tiny_llama(len(tokenizer), seed=3), args=args, train_dataset=qa_dataset(12), processing_class=tokenizer
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "set_loss" in e]
    assert len(logs) == 3
    assert logs[0]["set/missing"] > 0.5 * logs[0]["set/target_answers"] > 0
    for entry in logs:
        assert all(math.isfinite(entry[k]) for k in ("loss", "ce_loss", "set_loss", "set/missing", "grad_norm"))
