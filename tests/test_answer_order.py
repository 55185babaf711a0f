"""`reorder_answers`: what it keeps, what it permutes, each mode's rule, and the vectorized path against the
plain per-row reference."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings

from tests.strategies import PROFILE, SEPS, TOKENIZER, VOCAB, batches
from tests.testing_utils import qa_text, random_batch
from trl_qaloss import reorder_answers, set_matching_loss
from trl_qaloss.engine.answer_order import item_answer_orders
from trl_qaloss.engine.parsing import parse_row_answers
from trl_qaloss.engine.reference import reorder_answers_reference
from trl_qaloss.engine.scoring import LogitsScorer

ORDERS = ("data", "canonical", "appearance", "preferred", "aligned")


def encode_rows(texts: list[str], prompt_tokens: int = 3, pad_to: int | None = None):
    """`(input_ids, labels)` of right-padded rows whose first `prompt_tokens` tokens are an unlabelled prompt."""
    rows = [TOKENIZER.encode(t) for t in texts]
    length = pad_to or max(len(r) for r in rows)
    ids = torch.full((len(rows), length), TOKENIZER.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        labels[b, prompt_tokens : len(row)] = ids[b, prompt_tokens : len(row)]
    return ids, labels


def items_of(labels: torch.Tensor, b: int, position_ids=None):
    """The parsed items of row b: a list of items, each a list of answer token tuples (in order)."""
    targets = labels[b, 1:]
    positions = (targets != -100).nonzero().flatten().tolist()
    return [
        [tuple(t for _, t in a) for _, a in item]
        for item in parse_row_answers(targets[positions].tolist(), positions, SEPS)
    ]


def random_rows(seed: int, num_rows: int = 4):
    rng = random.Random(seed)
    texts = [f"ctx {rng.choice(['a', 'b'])}: " + qa_text(rng) + TOKENIZER.eos_token for _ in range(num_rows)]
    return encode_rows(texts, prompt_tokens=rng.randint(1, 4))


def test_example_of_each_mode():
    text = "ctx: <QA> who wrote? <A> bob <A> ann carl <A> <A> ann <QA> where? <A> rome <A> paris<eos>"
    ids, labels = encode_rows([text])
    canonical, _ = reorder_answers(ids, labels, SEPS, "canonical")
    # The answers sorted by token ids (a prefix first); the empty answer and the spaces between cores stay put.
    token = {w: TOKENIZER.encode(" " + w)[0] for w in ("bob", "ann", "rome", "paris")}
    first = "<A> ann <A> ann carl <A> <A> bob" if token["ann"] < token["bob"] else "<A> bob <A> ann <A> <A> ann carl"
    second = " <A> ".join(sorted(["rome", "paris"], key=lambda w: token[w]))
    assert TOKENIZER.decode(canonical[0]) == f"ctx: <QA> who wrote? {first} <QA> where? <A> {second}<eos>"
    # The answers the prompt names first, in the order it names them; the others after, sorted.
    ids, labels = encode_rows(["rome, then bob: <QA> who? <A> ann <A> bob <QA> where? <A> paris <A> rome<eos>"], 6)
    appearance, _ = reorder_answers(ids, labels, SEPS, "appearance", tokenizer=TOKENIZER)
    expected = "rome, then bob: <QA> who? <A> bob <A> ann <QA> where? <A> rome <A> paris<eos>"
    assert TOKENIZER.decode(appearance[0]) == expected


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("seed", range(6))
def test_reordering_keeps_everything_but_the_answer_order(order, seed):
    ids, labels = random_rows(seed)
    logits = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(seed))
    ids_before, labels_before = ids.clone(), labels.clone()
    new_ids, new_labels = reorder_answers(ids, labels, SEPS, order, logits=logits, tokenizer=TOKENIZER)
    assert torch.equal(ids, ids_before) and torch.equal(labels, labels_before)  # inputs untouched
    assert new_ids.shape == ids.shape and new_labels.shape == labels.shape
    assert torch.equal(new_labels == -100, labels == -100)  # prompt and padding masks
    assert torch.equal(new_ids[labels == -100], ids[labels == -100])  # prompts and padding
    assert torch.equal(new_labels[labels != -100], new_ids[labels != -100])  # moved together
    for token in (SEPS.qa_id, SEPS.answer_id):  # same separators
        assert torch.equal((new_ids == token).sum(1), (ids == token).sum(1))
    assert torch.equal(new_ids == SEPS.qa_id, ids == SEPS.qa_id)  # items start where they started
    for b in range(ids.size(0)):
        before, after = items_of(labels, b), items_of(new_labels, b)
        assert len(before) == len(after)
        for item_before, item_after in zip(before, after, strict=True):
            assert sorted(item_before) == sorted(item_after)  # a permutation of the same answers
        # Questions (everything from each QA token to its first answer separator) unchanged.
        qa = (ids[b] == SEPS.qa_id).nonzero().flatten().tolist()
        for p in qa:
            end = p + 1
            while end < ids.size(1) and ids[b, end] != SEPS.answer_id and ids[b, end] != SEPS.qa_id:
                end += 1
            assert torch.equal(new_ids[b, p:end], ids[b, p:end])
    if order == "data":
        assert torch.equal(new_ids, ids) and torch.equal(new_labels, labels)


@pytest.mark.parametrize("seed", range(6))
def test_canonical_sorts_and_is_idempotent(seed):
    ids, labels = random_rows(seed)
    once = reorder_answers(ids, labels, SEPS, "canonical")
    twice = reorder_answers(*once, SEPS, "canonical")
    assert torch.equal(once[0], twice[0]) and torch.equal(once[1], twice[1])
    for b in range(ids.size(0)):
        for item in items_of(once[1], b):
            assert item == sorted(item)


@pytest.mark.parametrize("seed", range(6))
def test_preferred_follows_the_first_token_scores(seed):
    ids, labels = random_rows(seed)
    logits = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(seed))
    _, new_labels = reorder_answers(ids, labels, SEPS, "preferred", logits=logits)
    log_probs = logits.log_softmax(-1)
    for b in range(ids.size(0)):
        targets = labels[b, 1:]
        positions = (targets != -100).nonzero().flatten().tolist()
        for item, new_item in zip(
            parse_row_answers(targets[positions].tolist(), positions, SEPS), items_of(new_labels, b), strict=True
        ):
            if not item:
                continue
            scoring = item[0][1][0][0]  # logits[p] predicts target p: the first token of the first answer
            scores = [float(log_probs[b, scoring, answer[0]]) for answer in new_item]
            assert scores == sorted(scores, reverse=True)


def test_preferred_ties_keep_data_order():
    ids, labels = encode_rows(["ctx: <QA> who? <A> bob <A> ann <A> carl<eos>"])
    logits = torch.zeros(*ids.shape, VOCAB)  # every answer scores the same
    new_ids, _ = reorder_answers(ids, labels, SEPS, "preferred", logits=logits)
    assert torch.equal(new_ids, ids)


def test_aligned_places_matched_answers_by_their_prediction():
    text = "ctx: <QA> who? <A> bob <A> ann <A> carl<eos>"
    ids, labels = encode_rows([text])
    # The model predicts "carl", then "bob", then "eve": ann is unmatched and goes last.
    predicted = TOKENIZER.encode("ctx: <QA> who? <A> carl <A> bob <A> eve<eos>")
    logits = torch.zeros(*ids.shape, VOCAB)
    logits[0, torch.arange(len(predicted) - 1), torch.tensor(predicted[1:])] = 5.0
    new_ids, _ = reorder_answers(ids, labels, SEPS, "aligned", logits=logits)
    assert TOKENIZER.decode(new_ids[0]) == "ctx: <QA> who? <A> carl <A> bob <A> ann<eos>"


def test_answers_spanning_an_unlabelled_position_keep_their_order():
    ids, labels = encode_rows(["ctx: <QA> who? <A> bob <A> ann <A> carl<eos>"])
    labels[0, (ids[0] == SEPS.answer_id).nonzero()[1]] = -100  # the second answer's separator is masked
    for order in ("canonical", "aligned"):
        logits = torch.randn(*ids.shape, VOCAB)
        new_ids, new_labels = reorder_answers(ids, labels, SEPS, order, logits=logits)
        assert torch.equal(new_ids, ids) and torch.equal(new_labels, labels)


class CountingScorer(LogitsScorer):
    """A real scorer that counts the questions it is asked (each one a forward pass for `ModelScorer`)."""

    def __init__(self, logits):
        super().__init__(logits)
        self.calls = 0

    def logits_at(self, positions):
        self.calls += 1
        return super().logits_at(positions)

    def argmax(self, targets):
        self.calls += 1
        return super().argmax(targets)


@pytest.mark.parametrize("order", ["preferred", "aligned"])
def test_a_batch_without_two_answers_to_an_item_never_asks_the_scorer(order):
    """Nothing to order: the model orders skip the scorer, so the trainer runs no extra forward pass for the batch."""
    ids, labels = encode_rows(
        ["ctx: <QA> who? <A> bob <QA> where? <A> rome<eos>", "ctx: <QA> who? <QA> what? <A> ann carl<eos>", "ctx<eos>"]
    )
    scorer = CountingScorer(torch.randn(*ids.shape, VOCAB))
    new_ids, new_labels = reorder_answers(ids, labels, SEPS, order, scorer=scorer)
    assert scorer.calls == 0
    assert torch.equal(new_ids, ids) and torch.equal(new_labels, labels)
    # One item with two answers in the batch: the scorer is asked, once.
    ids, labels = encode_rows(["ctx: <QA> who? <A> bob <QA> where? <A> rome <A> paris<eos>"])
    scorer = CountingScorer(torch.randn(*ids.shape, VOCAB))
    reorder_answers(ids, labels, SEPS, order, scorer=scorer)
    assert scorer.calls == 1


@pytest.mark.parametrize("order", ORDERS[1:])
@pytest.mark.parametrize("seed", range(30))
def test_random_batches_match_reference(order, seed):
    agree = [0.0, 0.5, 0.9][seed % 3]
    logits, labels = random_batch(SEPS, VOCAB, batch=3, length=40 + seed, seed=seed, agree=agree)
    ids = torch.where(labels == -100, TOKENIZER.pad_token_id, labels)
    position_ids = None
    if seed % 2:  # packed rows: each row cut into sequences
        position_ids = torch.cat([torch.arange(17), torch.arange(labels.size(1) - 17)]).expand_as(labels)
    kwargs = dict(logits=logits, position_ids=position_ids, tokenizer=TOKENIZER)
    out = reorder_answers(ids, labels, SEPS, order, **kwargs)
    ref = reorder_answers_reference(ids, labels, SEPS, order, **kwargs)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@settings(PROFILE, max_examples=60)
@given(batch=batches())
def test_adversarial_batches_match_reference(batch):
    logits, labels, position_ids = batch
    # Unlabelled positions (prompts, holes) hold the predicted tokens: answers and separators occur in them too.
    predicted = logits.argmax(-1)
    ids = torch.where(labels != -100, labels, torch.where(predicted < VOCAB, predicted, TOKENIZER.eos_token_id))
    kwargs = dict(logits=logits, position_ids=position_ids, tokenizer=TOKENIZER)
    for order in ORDERS[1:]:
        out = reorder_answers(ids, labels, SEPS, order, **kwargs)
        ref = reorder_answers_reference(ids, labels, SEPS, order, **kwargs)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), order


def test_half_precision_logits():
    ids, labels = random_rows(0)
    logits = torch.randn(*ids.shape, VOCAB)
    for order in ("preferred", "aligned"):
        full = reorder_answers(ids, labels, SEPS, order, logits=logits)
        half = reorder_answers(ids, labels, SEPS, order, logits=logits.to(torch.bfloat16))
        ref = reorder_answers_reference(ids, labels, SEPS, order, logits=logits.to(torch.bfloat16))
        assert torch.equal(half[0], ref[0])
        assert full[0].shape == half[0].shape


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(order="sorted"), "answer_order"),
        (dict(order="preferred"), "needs the `logits`"),
        (dict(order="appearance"), "needs the `tokenizer`"),
        (dict(order="aligned", logits=torch.zeros(1, 3, 5)), r"\[B, T, V\]"),
        (dict(order="aligned", logits=torch.zeros(2, 6, 5, dtype=torch.long)), "float"),
        (dict(order="canonical", position_ids=torch.zeros(2, 5)), "position_ids"),
    ],
)
def test_bad_arguments(kwargs, match):
    ids = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        reorder_answers(ids, ids.clone(), SEPS, **kwargs)


def test_aligned_set_loss_does_not_train_repeats():
    """Teacher forcing: the model says bob first, then ann; the target lists ann first.

    In data order, slot 2's context already holds ann ("<A> ann <A>"); the set loss pairs the model's second answer
    (ann) with the target ann and raises the logit of ann there: a repeat. Reordered by the alignment, the target
    is "bob, ann": slot 2's context holds bob and the same rule raises ann, which that context has not given.
    """
    data_ids, data_labels = encode_rows(["ctx: <QA> who? <A> ann <A> bob<eos>"])
    answer_ids = {w: TOKENIZER.encode(" " + w)[0] for w in ("ann", "bob")}

    def model_logits(ids):
        """A model that answers bob first and ann second, whatever the context (5.0 on its choice)."""
        logits = torch.zeros(*ids.shape, VOCAB)
        slot = 0
        for p in range(ids.size(1) - 1):
            nxt = TOKENIZER.eos_token_id
            if ids[0, p] == SEPS.answer_id:
                nxt = answer_ids[("bob", "ann")[min(slot, 1)]]
                slot += 1
            elif ids[0, p] in answer_ids.values():
                nxt = SEPS.answer_id if slot < 2 else TOKENIZER.eos_token_id
            elif p + 1 < ids.size(1):
                nxt = ids[0, p + 1]
            logits[0, p, nxt] = 5.0
        return logits

    def repeat_pushes(ids, labels):
        """Positions where the set loss's gradient raises the logit of an answer already given in the context."""
        logits = model_logits(ids).requires_grad_(True)
        loss = set_matching_loss(logits, labels, SEPS, reduction="sum").loss
        (grad,) = torch.autograd.grad(loss, logits)
        pushes = []
        for p in range(ids.size(1) - 1):
            given = {int(t) for t in ids[0, : p + 1] if int(t) in answer_ids.values()}
            raised = {t for t in answer_ids.values() if grad[0, p, t] < 0}  # descent raises a negative gradient
            if ids[0, p] == SEPS.answer_id and raised & given:
                pushes.append((p, raised & given))
        return pushes

    assert repeat_pushes(data_ids, data_labels), "the data-order set loss should push a repeat here"
    new_ids, new_labels = reorder_answers(data_ids, data_labels, SEPS, "aligned", logits=model_logits(data_ids))
    assert TOKENIZER.decode(new_ids[0]) == "ctx: <QA> who? <A> bob <A> ann<eos>"
    assert repeat_pushes(new_ids, new_labels) == []


@pytest.mark.parametrize("order", ("data", "canonical", "appearance"))
@pytest.mark.parametrize("seed", range(4))
def test_item_answer_orders_say_where_reorder_answers_moves_each_answer(order, seed):
    ids, labels = random_rows(seed)
    _, new_labels = reorder_answers(ids, labels, SEPS, order, tokenizer=TOKENIZER)
    orders = iter(item_answer_orders(ids, labels, SEPS, order, tokenizer=TOKENIZER))
    for b in range(ids.size(0)):
        for item, new_item in zip(items_of(labels, b), items_of(new_labels, b), strict=True):
            assert [item[j] for j in next(orders)] == new_item
    assert next(orders, None) is None


def test_item_answer_orders_refuse_the_model_orders():
    ids, labels = random_rows(0)
    with pytest.raises(ValueError, match="reads the model"):
        item_answer_orders(ids, labels, SEPS, "aligned")
