"""Answer-set metrics on hand-written cases, and the text parser against the token parser."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_qaloss.engine.parsing import QAItem, parse_answer_tokens, parse_qa_text, parse_row
from trl_qaloss.metrics import answer_set_scores, normalize_answer

WHO = "<QA> Who wrote X? "


def scores(prediction: str, reference: str) -> dict[str, float]:
    return answer_set_scores([prediction], [reference])


def assert_set(result, precision, recall, f1=None):
    assert result["set_precision"] == pytest.approx(precision)
    assert result["set_recall"] == pytest.approx(recall)
    assert result["set_f1"] == pytest.approx(f1 if f1 is not None else 2 * precision * recall / (precision + recall))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<QA> Who? <A> Ann <A> Bob", [QAItem("Who", ["Ann", "Bob"])]),
        ("preamble <A> x <QA> Who? <A> Ann", [QAItem("Who", ["Ann"])]),  # text before the first item is ignored
        ("<QA> Who <A> Ann", [QAItem("Who <A> Ann", [])]),  # no question end: no answers
        ("<QA> Who? noise <A> Ann <A>  <A> Why? x", [QAItem("Who", ["Ann", "Why? x"])]),  # empty answer dropped
        ("<QA> A? <A> 1 <QA> B? <QA> C? <A> 3", [QAItem("A", ["1"]), QAItem("B", []), QAItem("C", ["3"])]),
        ("", []),
        ("no items at all", []),
    ],
)
def test_parse_qa_text(text, expected):
    assert parse_qa_text(text) == expected


def test_perfect_and_permuted():
    reference = WHO + "<A> Ann <A> Bob <QA> Where? <A> Paris"
    for prediction in (reference, WHO + "<A> Bob <A> Ann <QA> Where? <A> Paris"):
        result = scores(prediction, reference)
        assert_set(result, 1, 1)
        assert result["soft_f1"] == pytest.approx(1.0)
        assert result["cardinality_error"] == 0 and result["parse_failures"] == 0
        assert result["questions_expected"] == result["questions_predicted"] == result["questions_matched"] == 2


def test_missing_and_extra_answers():
    missing = scores(WHO + "<A> Ann", WHO + "<A> Ann <A> Bob")
    assert_set(missing, 1, 0.5)
    assert missing["cardinality_error"] == 1 and missing["cardinality_bias"] == -1
    extra = scores(WHO + "<A> Ann <A> Bob <A> Carl", WHO + "<A> Bob <A> Ann")
    assert_set(extra, 2 / 3, 1)
    assert extra["cardinality_error"] == 1 and extra["cardinality_bias"] == 1


def test_missing_and_extra_questions():
    # Scores are per reference question: the missing second question scores 0.
    missing = scores(WHO + "<A> Ann", WHO + "<A> Ann <QA> Where? <A> Paris <A> Rome")
    assert_set(missing, 0.5, 0.5, 0.5)
    assert missing["cardinality_error"] == pytest.approx(1.0)  # (0 + 2) / 2
    assert missing["cardinality_bias"] == pytest.approx(-1.0)  # (0 - 2) / 2: the missing answers are too few
    assert (missing["questions_expected"], missing["questions_predicted"], missing["questions_matched"]) == (2, 1, 1)
    assert missing["matched_question_set_f1"] == 1.0
    # An extra predicted question adds no reference question: it shows only in the question counts.
    extra = scores(WHO + "<A> Ann <QA> Where? <A> Paris", WHO + "<A> Ann")
    assert_set(extra, 1, 1)
    assert extra["questions_predicted"] == 2 and extra["questions_expected"] == 1


def test_questions_paired_by_position_not_text():
    result = scores("<QA> Where? <A> Paris <QA> Who? <A> Ann", "<QA> Who? <A> Ann <QA> Where? <A> Paris")
    assert result["set_f1"] == 0 and result["questions_matched"] == 0 and result["matched_question_set_f1"] == 0
    half = scores("<QA> Who? <A> Ann <QA> When? <A> 1990", "<QA> Who? <A> Ann <A> Bob <QA> Where? <A> 1990")
    assert half["set_f1"] == pytest.approx((2 / 3 + 1) / 2) and half["matched_question_set_f1"] == pytest.approx(2 / 3)


def test_duplicates_count_once_in_sets_but_in_cardinality():
    result = scores(WHO + "<A> Ann <A> ann. <A> ANN", WHO + "<A> Ann")
    assert_set(result, 1, 1)
    assert result["cardinality_error"] == 2


def test_unparseable_and_empty_outputs():
    reference = WHO + "<A> Ann <A> Bob"
    for prediction in ("I do not know.", "", "Ann, Bob"):
        result = scores(prediction, reference)
        assert result["parse_failures"] == 1
        assert result["set_f1"] == 0 and result["soft_f1"] == 0 and result["cardinality_error"] == 2
    empty = answer_set_scores(["", ""], ["", ""])
    assert empty["set_f1"] == 0 and empty["questions_expected"] == 0
    assert empty["parse_failures"] == empty["reference_parse_failures"] == empty["num_examples"] == 2


def test_empty_answer_sets():
    assert_set(scores("<QA> Who?", "<QA> Who?"), 1, 1, 1)  # nothing to answer, nothing answered
    assert_set(scores("<QA> Who? <A> Ann", "<QA> Who?"), 0, 0, 0)
    assert_set(scores("<QA> Who", "<QA> Who? <A> Ann"), 0, 0, 0)  # no question end: no answers


def test_normalization_and_unicode():
    assert_set(scores(WHO + "<A> The Beatles <A> «Genève» <A> ZÜRICH", WHO + "<A> beatles <A> genève <A> zürich"), 1, 1)
    assert_set(scores(WHO + "<A> Zurich", WHO + "<A> Zürich"), 0, 0, 0)  # accents are not stripped
    # The full-width ？ is not the question end: that reference question has no answers.
    assert_set(scores("<QA> 誰? <A> 東京 <A> ｱ", "<QA> 誰？ <A> 東京"), 0, 0, 0)
    assert_set(scores("<QA> 誰? <A> 東京 <A> ｱ", "<QA> 誰? <A> 東京"), 0.5, 1)
    assert normalize_answer("ｱ") == "ア"  # NFKC
    assert normalize_answer("the") == "the" and normalize_answer("  A   ") == "a"  # nothing left: keep the text
    assert_set(scores(WHO + "<A> the", WHO + "<A> a"), 0, 0, 0)


def test_every_article_is_dropped():
    for article in ("a", "an", "the", "A", "An", "The"):
        assert normalize_answer(f"{article} dog") == "dog", article
        assert_set(scores(WHO + f"<A> {article} dog", WHO + "<A> dog"), 1, 1)
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("bandana") == "bandana"  # only whole words


def test_soft_f1_gives_partial_credit_with_a_one_to_one_matching():
    partial = scores(WHO + "<A> New York City", WHO + "<A> new york")
    assert partial["set_f1"] == 0
    assert partial["soft_f1"] == pytest.approx(0.8)  # token-F1 of 2 common tokens out of 3 and 2
    # Hungarian pairs "ann smith"-"ann" and "bob"-"bob jones" (2/3 each); each answer is used once.
    crossed = scores(WHO + "<A> ann smith <A> bob", WHO + "<A> bob jones <A> ann")
    assert crossed["soft_precision"] == pytest.approx(2 / 3) and crossed["soft_recall"] == pytest.approx(2 / 3)
    one_for_two = scores(WHO + "<A> ann bob", WHO + "<A> ann <A> bob")
    assert one_for_two["soft_precision"] == pytest.approx(2 / 3) and one_for_two["soft_recall"] == pytest.approx(1 / 3)


def test_averaged_over_reference_questions_of_all_examples():
    result = answer_set_scores(
        [WHO + "<A> Ann", "<QA> A? <A> 1 <QA> B? <A> 2 <QA> C? <A> x"],
        [WHO + "<A> Bob", "<QA> A? <A> 1 <QA> B? <A> 2 <QA> C? <A> 3"],
    )
    assert result["set_f1"] == pytest.approx(2 / 4)
    assert result["num_examples"] == 2 and result["questions_expected"] == 4


def test_exact_set_match_needs_the_same_set_without_repeats():
    reference = WHO + "<A> Ann <A> Bob"
    assert scores(WHO + "<A> bob <A> ANN.", reference)["exact_set_match"] == 1  # any order, normalized
    assert scores(WHO + "<A> Bob <A> Ann <A> ann", reference)["exact_set_match"] == 0  # a repeat
    assert scores(WHO + "<A> Bob <A> Ann <A> Bob", reference)["set_f1"] == 1  # which set-F1 forgives
    assert scores(WHO + "<A> Ann", reference)["exact_set_match"] == 0  # a missing answer
    assert scores(WHO + "<A> Ann <A> Bob <A> Carl", reference)["exact_set_match"] == 0  # an extra one
    assert scores("<QA> Who?", "<QA> Who?")["exact_set_match"] == 1  # nothing to answer, nothing answered
    # Per reference question: one of two matches; a missing second question scores 0.
    two = scores(WHO + "<A> Ann <QA> Where? <A> Rome", WHO + "<A> Ann <QA> Where? <A> Paris")
    assert two["exact_set_match"] == 0.5
    assert scores(WHO + "<A> Ann", WHO + "<A> Ann <QA> Where? <A> Paris")["exact_set_match"] == 0.5


def test_exact_set_match_and_duplicates_on_unicode():
    reference = "<QA> Wo? <A> Zürich <A> Genève <A> 東京"
    assert scores("<QA> Wo? <A> 東京 <A> ZÜRICH <A> «Genève»", reference)["exact_set_match"] == 1
    assert scores("<QA> Wo? <A> 東京 <A> Zurich <A> Genève", reference)["exact_set_match"] == 0  # accents count
    nfkc = scores("<QA> Wo? <A> ｱ <A> ア", "<QA> Wo? <A> ア")  # NFKC makes the half-width ｱ a repeat of ア
    assert nfkc["exact_set_match"] == 0 and nfkc["duplicate_rate"] == 0.5 and nfkc["set_f1"] == 1


def test_duplicate_rate_counts_repeated_predicted_answers():
    assert scores(WHO + "<A> Ann <A> Bob", WHO + "<A> Ann")["duplicate_rate"] == 0
    assert scores(WHO + "<A> Ann <A> ann. <A> Bob", WHO + "<A> Ann")["duplicate_rate"] == pytest.approx(1 / 3)
    assert scores(WHO + "<A> Ann <A> ann <A> The Ann", WHO + "<A> Ann")["duplicate_rate"] == pytest.approx(2 / 3)
    # Repeats count within one item only: the same answer to two questions is no repeat.
    across = scores("<QA> A? <A> x <QA> B? <A> x", "<QA> A? <A> x <QA> B? <A> x")
    assert across["duplicate_rate"] == 0 and across["exact_set_match"] == 1
    # Over all predicted answers of all examples, extra (unpaired) items included.
    result = answer_set_scores(
        [WHO + "<A> Ann <A> Ann", "<QA> A? <A> 1 <QA> Extra? <A> y <A> y <A> y"], [WHO + "<A> Ann", "<QA> A? <A> 1"]
    )
    assert result["duplicate_rate"] == pytest.approx(3 / 6)
    assert scores("nothing parsed", WHO + "<A> Ann")["duplicate_rate"] == 0  # no predicted answer


def test_match_questions_text_pairs_reordered_questions():
    prediction = "<QA> Where? <A> Paris <QA> Who wrote X? <A> Bob <A> Ann"
    reference = WHO + "<A> Ann <A> Bob <QA> Where? <A> Paris"
    by_position = scores(prediction, reference)
    by_text = answer_set_scores([prediction], [reference], match_questions="text")
    assert by_position["set_f1"] == 0 and by_position["exact_set_match"] == 0 and by_position["questions_matched"] == 0
    assert by_text["set_f1"] == 1 and by_text["exact_set_match"] == 1 and by_text["questions_matched"] == 2
    assert by_text["cardinality_error"] == 0 and by_text["matched_question_set_f1"] == 1


def test_match_questions_text_with_missing_extra_and_reworded_questions():
    def by_text(prediction, reference):
        return answer_set_scores([prediction], [reference], match_questions="text")

    reference = "<QA> who rules valdor? <A> ilsa <QA> which rivers flow through valdor? <A> oru <A> pell"
    # Missing: the rivers question is answered, the ruler question is not asked (scores 0, misses its answer).
    missing = by_text("<QA> which rivers flow through valdor? <A> pell <A> oru", reference)
    assert missing["exact_set_match"] == 0.5 and missing["set_f1"] == 0.5
    assert missing["cardinality_error"] == pytest.approx(0.5) and missing["questions_matched"] == 1
    # Extra: an unrelated question shares no token with either reference question, so it takes no partner.
    extra = by_text(
        "<QA> what is the time? <A> ilsa <QA> which rivers flow through valdor? <A> oru <A> pell", reference
    )
    assert extra["exact_set_match"] == 0.5 and extra["questions_predicted"] == 2 and extra["questions_matched"] == 1
    # Reworded: paired by the most similar question (one to one), but not "asked right".
    reworded = by_text("<QA> rivers of valdor? <A> oru <A> pell <QA> ruler of valdor? <A> ilsa", reference)
    assert reworded["exact_set_match"] == 1 and reworded["questions_matched"] == 0
    # The same question asked twice: only one of them takes the reference question, on a tie the nearest one.
    twice = by_text("<QA> who rules valdor? <A> bob <QA> who rules valdor? <A> ilsa", "<QA> who rules valdor? <A> ilsa")
    assert twice["exact_set_match"] == 0 and twice["questions_matched"] == 1 and twice["questions_predicted"] == 2
    later = by_text("<QA> who rules valdor? <A> bob <QA> who rules valdor? <A> ilsa", reference)
    # The first takes it; the second shares "valdor" with the rivers question, so it is paired with it
    # (cardinality error |1 - 2| there) instead of leaving it missing (2).
    assert later["set_f1"] == 0 and later["questions_matched"] == 1 and later["cardinality_error"] == 0.5
    assert by_text("", reference)["set_f1"] == 0 and by_text("", reference)["parse_failures"] == 1


def test_match_questions_must_be_a_known_mode():
    with pytest.raises(ValueError, match="match_questions"):
        answer_set_scores(["a"], ["a"], match_questions="order")


def test_misaligned_inputs():
    with pytest.raises(ValueError, match="aligned"):
        answer_set_scores(["a"], [])


def test_custom_separators():
    result = answer_set_scores(["[Q] who; [ANS] ann [ANS] bob"], ["[Q] who; [ANS] bob [ANS] ann"], "[Q]", "[ANS]", ";")
    assert_set(result, 1, 1)


PIECES = ["<QA>", "<A>", "?", " ?", '?"', " who", " ann", "bob", " the", " ", "   ", ".", "<eos>", " paris", "x"]


def visible_text(tokenizer, ids, seps) -> str:
    """What the eval callback hands to the metrics: the decoded ids without special tokens but the separators."""
    hidden = set(tokenizer.all_special_ids) - {seps.qa_id, seps.answer_id}
    return tokenizer.decode([i for i in ids if i not in hidden], skip_special_tokens=False)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(PIECES), max_size=40))
def test_text_parser_matches_token_parser(tokenizer, seps, pieces):
    """On tokenized completions, `parse_qa_text` finds the answers `parse_row` and the batch parser find."""
    ids = tokenizer.encode("".join(pieces), add_special_tokens=False)
    # Compared without whitespace: the token parser drops whitespace-only tokens, so `? ?"` decodes as `??"` there.
    by_tokens = [
        ["".join(tokenizer.decode([t for _, t in answer]).split()) for answer in item]
        for item in parse_row(ids, list(range(len(ids))), seps)
    ]
    by_text = [["".join(a.split()) for a in item.answers] for item in parse_qa_text(visible_text(tokenizer, ids, seps))]
    assert by_text == by_tokens
    if ids:  # the batch parser agrees on the number of items and of answer tokens
        batch = parse_answer_tokens(
            torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), seps, len(tokenizer)
        )
        assert int(batch.num_items[0]) == len(by_text)
        assert batch.token.numel() == sum(len(a) for item in parse_row(ids, list(range(len(ids))), seps) for a in item)


def test_text_parser_matches_token_parser_on_realistic_rows(tokenizer, seps):
    from tests.testing_utils import qa_text

    rng = random.Random(1)
    for _ in range(50):
        ids = tokenizer.encode(qa_text(rng) + "<eos>", add_special_tokens=False)
        by_tokens = [
            [tokenizer.decode([t for _, t in answer]).strip() for answer in item]
            for item in parse_row(ids, list(range(len(ids))), seps)
        ]
        assert [item.answers for item in parse_qa_text(visible_text(tokenizer, ids, seps))] == by_tokens
