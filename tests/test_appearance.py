"""`answer_order="appearance"`: the answers that occur in the prompt first, by first occurrence, then the others in
canonical order; what "occurs" and "the prompt" mean; the vectorized path against the plain per-row reference."""

from __future__ import annotations

import random

import pytest
import torch

from tests.strategies import SEPS, TOKENIZER
from tests.testing_utils import WORDS, qa_text
from trl_qaloss import reorder_answers
from trl_qaloss.engine.normalization import first_occurrence
from trl_qaloss.engine.reference import reorder_answers_reference


def encode(prompt: str, completion: str, train_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, labels)` `[1, T]` of one row: its prompt unlabelled (unless `train_prompt`), its completion
    labelled."""
    prompt_ids, completion_ids = TOKENIZER.encode(prompt), TOKENIZER.encode(completion)
    ids = torch.tensor([prompt_ids + completion_ids])
    labels = ids.clone()
    if not train_prompt:
        labels[0, : len(prompt_ids)] = -100
    return ids, labels


def appearance(ids, labels, position_ids=None) -> str:
    kwargs = dict(position_ids=position_ids, tokenizer=TOKENIZER)
    new_ids, new_labels = reorder_answers(ids, labels, SEPS, "appearance", **kwargs)
    reference = reorder_answers_reference(ids, labels, SEPS, "appearance", **kwargs)
    assert torch.equal(new_ids, reference[0]) and torch.equal(new_labels, reference[1])
    return TOKENIZER.decode(new_ids[0])


def canonical(*answers: str) -> list[str]:
    return sorted(answers, key=lambda a: TOKENIZER.encode(" " + a))


def test_present_answers_by_first_occurrence_then_absent_ones_in_canonical_order():
    ids, labels = encode("iris met carl, then ann.", " <QA> who? <A> eve <A> ann <A> dana <A> carl <A> gina<eos>")
    absent = " <A> ".join(canonical("eve", "dana", "gina"))
    assert appearance(ids, labels) == f"iris met carl, then ann. <QA> who? <A> carl <A> ann <A> {absent}<eos>"


def test_without_an_answer_in_the_prompt_it_is_the_canonical_order():
    ids, labels = encode("nobody here.", " <QA> who? <A> eve <A> ann <A> dana<eos>")
    expected, _ = reorder_answers(ids, labels, SEPS, "canonical")
    assert appearance(ids, labels) == TOKENIZER.decode(expected[0])


@pytest.mark.parametrize(
    "answer, text, offset",
    [
        ("ann", "bob and ann", 8),
        ("ann", "joanna", None),  # inside a word
        ("new york", "to new york", 3),
        ("york", "yorkshire", None),
        ("", "anything", None),
    ],
)
def test_first_occurrence_is_on_word_boundaries(answer, text, offset):
    assert first_occurrence(answer, text) == offset


def test_occurs_reads_normalized_text():
    """Case, punctuation, articles and the leading space a token carries do not matter; word boundaries do."""
    prompt = "Carl: 'the BOB-ann' met bobby and paris."
    ids, labels = encode(prompt, " <QA> who? <A> paris <A> bobby ann <A> the bob <A> carl <A> ann<eos>")
    assert TOKENIZER.encode("Carl")[0] != TOKENIZER.encode(" carl")[0]  # the same word, other tokens
    # carl at 0; "the bob" normalizes to "bob", at 1; ann at 2; "bobby ann" does not occur ("bob ann" does).
    tail = " <A> ".join(canonical("bobby ann"))
    assert appearance(ids, labels).endswith(f"<A> carl <A> the bob <A> ann <A> paris <A> {tail}<eos>")


def test_a_special_token_in_the_prompt_is_a_word_break():
    ids, labels = encode("bob<eos>ann", " <QA> who? <A> eve <A> ann <A> bob<eos>")
    assert appearance(ids, labels).endswith("<QA> who? <A> bob <A> ann <A> eve<eos>")


def test_the_answers_of_earlier_items_are_not_the_prompt():
    ids, labels = encode("ann.", " <QA> who? <A> ann <A> carl <QA> and then? <A> carl <A> ann<eos>")
    first = " <A> ".join(["ann", *canonical("carl")])
    assert appearance(ids, labels).endswith(f"<QA> who? <A> {first} <QA> and then? <A> ann <A> carl<eos>")


def test_a_trained_prompt_is_read_up_to_the_first_item():
    """Every token trained (a chat without assistant-only loss): the prompt is what comes before the first item."""
    completion = " <QA> who? <A> eve <A> ann <A> carl<eos>"
    masked = appearance(*encode("carl, then ann:", completion))
    assert appearance(*encode("carl, then ann:", completion, train_prompt=True)) == masked
    assert masked.endswith("<A> carl <A> ann <A> eve<eos>")


def test_the_prompt_of_an_item_ends_at_its_trained_turn():
    """A later turn's item reads every earlier turn, masked or trained, up to the first item of its own turn."""
    ids, labels = encode("carl.", " <QA> who? <A> eve <A> carl eve carl:")  # first assistant turn, then a user turn
    turn, answer = TOKENIZER.encode(" user: ann"), TOKENIZER.encode(" <QA> who else? <A> ann <A> eve <A> carl<eos>")
    ids = torch.cat([ids, torch.tensor([turn + answer])], 1)
    labels = torch.cat([labels, torch.tensor([[-100] * len(turn) + answer])], 1)
    assert appearance(ids, labels).endswith("<QA> who else? <A> carl <A> eve <A> ann<eos>")


def test_packed_sequences_read_their_own_prompts():
    rows = [encode("ann:", " <QA> who? <A> carl <A> ann<eos>"), encode("carl:", " <QA> who? <A> ann <A> carl<eos>")]
    ids = torch.cat([r[0] for r in rows], 1)
    labels = torch.cat([r[1] for r in rows], 1)
    position_ids = torch.cat([torch.arange(r[0].size(1)) for r in rows])[None]
    assert appearance(ids, labels, position_ids) == (
        "ann: <QA> who? <A> ann <A> carl<eos>carl: <QA> who? <A> carl <A> ann<eos>"
    )


def grounded_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`(input_ids, labels, position_ids or None)`: rows whose prompts name some of their answers, with now and then a
    trained prompt, a masked hole, packed sequences."""
    rng = random.Random(seed)
    rows = []
    for _ in range(rng.randint(1, 4)):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(0, 12)))
        ids, labels = encode(prompt, " " + qa_text(rng) + TOKENIZER.eos_token, train_prompt=rng.random() < 0.2)
        if rng.random() < 0.2:
            start = rng.randrange(ids.size(1))
            labels[0, start : start + rng.randint(1, 4)] = -100
        rows.append((ids[0], labels[0]))
    position_ids = None
    if seed % 2:  # one packed row
        ids, labels = torch.cat([r[0] for r in rows])[None], torch.cat([r[1] for r in rows])[None]
        position_ids = torch.cat([torch.arange(r[0].numel()) for r in rows])[None]
        return ids, labels, position_ids
    length = max(r[0].numel() for r in rows)
    ids = torch.full((len(rows), length), TOKENIZER.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    for b, (row_ids, row_labels) in enumerate(rows):
        ids[b, : row_ids.numel()], labels[b, : row_ids.numel()] = row_ids, row_labels
    return ids, labels, position_ids


@pytest.mark.parametrize("seed", range(40))
def test_grounded_batches_match_reference(seed):
    ids, labels, position_ids = grounded_batch(seed)
    kwargs = dict(position_ids=position_ids, tokenizer=TOKENIZER)
    out = reorder_answers(ids, labels, SEPS, "appearance", **kwargs)
    ref = reorder_answers_reference(ids, labels, SEPS, "appearance", **kwargs)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_grounded_batches_move_answers_to_the_front():
    """Over the random batches, appearance differs from canonical, and moves answers that occur in the prompt."""
    differ = 0
    for seed in range(40):
        ids, labels, position_ids = grounded_batch(seed)
        kwargs = dict(position_ids=position_ids, tokenizer=TOKENIZER)
        differ += not torch.equal(
            reorder_answers(ids, labels, SEPS, "appearance", **kwargs)[0],
            reorder_answers(ids, labels, SEPS, "canonical", **kwargs)[0],
        )
    assert differ >= 10
