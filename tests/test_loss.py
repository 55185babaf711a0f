"""The vectorized set loss against the naive reference, and its defining properties."""

from __future__ import annotations

import math

import pytest
import torch

from tests.testing_utils import STAT_KEYS, encode_pair, random_batch
from trl_qaloss import QASeparators, set_matching_loss
from trl_qaloss.engine.reference import set_matching_loss_reference


def assert_same(out, ref, rtol=1e-5):
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, ref.loss.float(), rtol=rtol, atol=1e-6)
    for key in STAT_KEYS:
        assert out.stats[key] == pytest.approx(ref.stats[key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_random_batches_match_reference(seps, tokenizer, seed, reduction):
    agree = [0.0, 0.3, 0.7, 0.95][seed % 4]
    logits, labels = random_batch(seps, len(tokenizer), batch=3, length=48 + seed, seed=seed, agree=agree)
    out = set_matching_loss(logits, labels, seps, reduction=reduction)
    ref = set_matching_loss_reference(logits, labels, seps, reduction=reduction)
    assert_same(out, ref)


CRAFTED = [
    ("<QA> who wrote it? <A> ann <A> bob carl <A> dana", "<QA> who wrote it? <A> dana <A> ann <A> bob carl"),
    ("<QA> who wrote it? <A> ann <A> bob <A> dana", "<QA> who wrote it? <A> bob"),  # missing answers
    ("<QA> who? <A> ann", "<QA> who? <A> eve <A> ann <A> frank gina"),  # extra answers
    ("<QA> who wrote it <A> ann <A> bob", "<QA> who wrote it <A> bob <A> ann"),  # no question end
    ("<QA> where? <A> paris <A> <A>  <A> rome", "<QA> where? <A> <A> rome <A> paris"),  # empty answers
    ("<QA> where? <A> paris <A> rome <QA> when? <A> the a", "<QA> where? <A> rome <A> paris"),  # missing item
    ("<QA> where? <A> paris <QA> who? <A> ann", "<QA> who? <A> ann <QA> where? <A> paris <QA> extra? <A> x"),
    ("noise <A> before <QA> which city? extra <A> paris <A> rome", "<QA> which city? <A> rome <A> paris"),
    ('<QA> what?" he asked <A> ann <A> bob', '<QA> what?" he asked <A> bob <A> ann'),
    ("<QA> who? <A> ann ann bob <A> ann", "<QA> who? <A> ann <A> bob ann ann"),  # duplicate tokens in sets
]


@pytest.mark.parametrize("target_text, predicted_text", CRAFTED)
@pytest.mark.parametrize("truncate", [False, True])
def test_crafted_cases_match_reference(tokenizer, seps, target_text, predicted_text, truncate):
    length = 12 if truncate else None  # truncated rows end inside an answer
    logits, labels = encode_pair(tokenizer, target_text, predicted_text, length=length)
    for reduction in ("mean", "sum"):
        assert_same(
            set_matching_loss(logits, labels, seps, reduction=reduction),
            set_matching_loss_reference(logits, labels, seps, reduction=reduction),
        )


def test_crafted_stats(tokenizer, seps):
    logits, labels = encode_pair(tokenizer, *CRAFTED[1])
    stats = set_matching_loss(logits, labels, seps).stats
    assert (stats["target_answers"], stats["matched"], stats["missing"], stats["extra"]) == (3, 1, 2, 0)
    assert stats["mean_iou"] == 1.0
    # Only positions with a label are read, so the target runs at least as long as the prediction.
    logits, labels = encode_pair(
        tokenizer, "<QA> who? <A> ann and the a of in the a of", "<QA> who? <A> eve <A> ann <A> jack"
    )
    stats = set_matching_loss(logits, labels, seps).stats
    assert (stats["target_answers"], stats["matched"], stats["missing"], stats["extra"]) == (1, 1, 0, 2)


def test_perfect_permuted_prediction_costs_only_its_own_cross_entropy(tokenizer, seps):
    """A permuted but otherwise perfect prediction is matched answer to answer, with IoU 1 everywhere."""
    logits, labels = encode_pair(tokenizer, *CRAFTED[0])
    out = set_matching_loss(logits, labels, seps)
    assert out.stats["matched"] == 3 and out.stats["mean_iou"] == 1.0
    assert out.stats["missing"] == 0 and out.stats["extra"] == 0
    # Every matched pair reads its own confident predictions: far below a uniform guess.
    assert out.loss < 0.1 * math.log(len(tokenizer))


def test_order_invariance(tokenizer, seps):
    """Permuting the target answers together with the predicted ones leaves the loss unchanged.

    The prediction is a permutation of the target answers with one wrong token, so the pairs are not all perfect.
    """
    answers = ["ann", "bob carl", "dana eve", "frank"]
    predicted = ["frank", "ann", "dana iris", "bob carl"]
    base = None
    for perm in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        target_text = "<QA> who? " + " ".join(f"<A> {answers[i]}" for i in perm)
        predicted_text = "<QA> who? " + " ".join(f"<A> {predicted[i]}" for i in perm)
        target_ids = tokenizer.encode(target_text, add_special_tokens=False)
        predicted_ids = tokenizer.encode(predicted_text, add_special_tokens=False)
        # Same logits value at every predicted token, so each pair's cost depends only on its tokens.
        length = len(target_ids) + 2
        labels = torch.full((1, length), -100)
        labels[0, 1 : 1 + len(target_ids)] = torch.tensor(target_ids)
        logits = torch.zeros(1, length, len(tokenizer))
        for k, tok in enumerate(predicted_ids):
            logits[0, k, tok] = 6.0
        loss = set_matching_loss(logits, labels, seps).loss
        if base is None:
            base = loss
        torch.testing.assert_close(loss, base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(seps, tokenizer, dtype):
    logits, labels = random_batch(seps, len(tokenizer), seed=3, agree=0.7, dtype=dtype)
    out = set_matching_loss(logits, labels, seps)
    assert out.loss.dtype == torch.float32
    assert_same(out, set_matching_loss_reference(logits, labels, seps))


def test_gradients_match_reference_and_touch_only_matched_positions(seps, tokenizer):
    logits, labels = random_batch(seps, len(tokenizer), batch=4, length=80, seed=0, agree=0.9)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    set_matching_loss(a, labels, seps, reduction="sum").loss.backward()
    set_matching_loss_reference(b, labels, seps, reduction="sum").loss.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    # Rows that received gradient are exactly the valid positions read by a matched pair.
    touched = a.grad.abs().sum(-1) > 0
    assert touched.any()
    assert not touched[:, -1].any()
    assert (labels[:, 1:] != -100)[touched[:, :-1]].all()


def test_gradient_rows_are_the_matched_answer_positions(tokenizer, seps):
    logits, labels = encode_pair(tokenizer, "<QA> who? <A> ann <A> bob", "<QA> who? <A> bob <A> ann")
    logits.requires_grad_(True)
    set_matching_loss(logits, labels, seps).loss.backward()
    touched = (logits.grad.abs().sum(-1) > 0)[0].nonzero().flatten().tolist()
    # Predicted tokens: logits row p predicts label p + 1; the answer tokens are 'ann' and 'bob' (one token each).
    predicted = logits[0, :-1].argmax(-1)
    answer_rows = [
        p for p in range(labels.size(1) - 1) if tokenizer.decode([int(predicted[p])]).strip() in ("ann", "bob")
    ]
    assert touched == answer_rows


def test_no_answers_gives_connected_zero(seps, tokenizer):
    logits = torch.randn(2, 16, len(tokenizer), requires_grad=True)
    labels = torch.full((2, 16), -100)
    for fn in (set_matching_loss, set_matching_loss_reference):
        out = fn(logits, labels, seps)
        assert out.loss.item() == 0.0 and out.loss.requires_grad
        out.loss.backward()
        assert out.stats["target_answers"] == 0


def test_missing_answer_costs_uniform_guess(tokenizer, seps):
    logits, labels = encode_pair(tokenizer, "<QA> who? <A> ann", "<QA> who? nothing")
    out = set_matching_loss(logits, labels, seps, reduction="sum")
    num_tokens = out.stats["target_tokens"]
    assert out.stats["missing"] == 1
    assert out.loss.item() == pytest.approx(num_tokens * math.log(len(tokenizer)), rel=1e-6)


def test_padded_vocabulary(seps, tokenizer):
    """Models often pad the embedding matrix past the tokenizer: those ids are skipped."""
    logits, labels = random_batch(seps, len(tokenizer) + 13, seed=5, agree=0.5)
    assert_same(set_matching_loss(logits, labels, seps), set_matching_loss_reference(logits, labels, seps))


def test_bad_inputs(seps, tokenizer):
    logits, labels = random_batch(seps, len(tokenizer), seed=1)
    with pytest.raises(ValueError, match="reduction"):
        set_matching_loss(logits, labels, seps, reduction="avg")
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        set_matching_loss(logits[0], labels, seps)


def test_separator_that_is_not_one_token(tokenizer):
    """A separator the tokenizer splits fails with the fix in the message."""
    with pytest.raises(ValueError, match=r"qa_token.*not a single token.*add_tokens.*resize_token_embeddings"):
        QASeparators.from_tokenizer(tokenizer, qa_token="<QUESTION>")
    with pytest.raises(ValueError, match="answer_token"):
        QASeparators.from_tokenizer(tokenizer, answer_token="<ANSWER>")
    with pytest.raises(ValueError, match="question_end"):
        QASeparators.from_tokenizer(tokenizer, question_end="")
