r"""Answer-set metrics of generated completions against reference completions, both text in the `<QA>` format.

Both sides are parsed with `parse_qa_text` (the rules of the loss's parser). Predicted items are paired with
reference items one to one, by `match_questions`:

- `"position"` (the default): the k-th predicted item with the k-th reference item, whatever their questions say.
  Right when the prompt fixes which questions come in which order; a question asked out of order scores 0.
- `"text"`: by question text. The Hungarian algorithm pairs them to maximise the summed SQuAD token-F1 of their
  normalized questions; a pair whose questions share no token is no pair. Use it when the order of the questions is
  free, or to score the answer sets apart from the question order.

Every score is computed per *reference question* and averaged over all reference questions of all examples; a
reference question without a predicted partner scores 0.

For one pair, with $\hat S$ and $S$ the sets of normalized predicted and reference answers:

- `set_precision` $= |\hat S \cap S| / |\hat S|$, `set_recall` $= |\hat S \cap S| / |S|$ and `set_f1` their
  harmonic mean (exact match after normalization; duplicates count once). If $\hat S$ or $S$ is empty, all three are
  1 when both are and 0 otherwise.
- `soft_precision`, `soft_recall`, `soft_f1`: the same with partial credit. Answers are matched one to one by the
  Hungarian algorithm maximising the summed SQuAD token-F1 $F$ of the pairs; precision $= F / |\hat S|$, recall
  $= F / |S|$.
- `exact_set_match`: 1 if the predicted answers, normalized, are exactly the reference set and repeat no answer,
  else 0 (both empty counts as a match).
- `cardinality_error`: mean of $\big|\,n_{pred} - n_{ref}\big|$ and `cardinality_bias` mean of $n_{pred} - n_{ref}$,
  with $n$ the number of parsed answers (duplicates included: repeating an answer is an error of the count).

Normalization is SQuAD's, made Unicode-aware (`engine/normalization.py`): NFKC, lowercase, drop punctuation
(Unicode category P*), drop the articles a/an/the, collapse whitespace. An answer that normalizes to nothing (`"the"`,
`"..."`) keeps its lowercased, whitespace-collapsed text, so it still only matches itself.

`duplicate_rate` is the share of all predicted answers (in every predicted item, paired or not) that repeat an
earlier answer of their own item after normalization: `<A> Ann <A> ann. <A> Bob` has 1 repeat in 3 answers (0.0
when nothing is predicted).

`matched_question_set_f1` is `set_f1` averaged only over the reference questions whose paired predicted question
is the same after normalization: how good the answer sets are when the model asks the right question (0.0 if none is).

Counts over all examples: `questions_expected` (reference items), `questions_predicted` (predicted items),
`questions_matched` (pairs whose normalized questions are equal), `parse_failures` (predictions with no item, e.g. no
`<QA>` at all) and `reference_parse_failures` (references with no item: they add no question). `num_examples` is the
number of pairs scored.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy.optimize import linear_sum_assignment

from .engine.normalization import normalize_answer
from .engine.options import MATCH_QUESTIONS, check_choice
from .engine.parsing import QAItem, parse_qa_text

SCORE_KEYS = (
    "set_precision",
    "set_recall",
    "set_f1",
    "soft_precision",
    "soft_recall",
    "soft_f1",
    "exact_set_match",
    "cardinality_error",
    "cardinality_bias",
)
COUNT_KEYS = (
    "questions_expected",
    "questions_predicted",
    "questions_matched",
    "parse_failures",
    "reference_parse_failures",
    "num_examples",
)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token-F1 of two normalized answers: the F1 of their bags of whitespace tokens."""
    pred, ref = prediction.split(), reference.split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _pair_scores(predicted: set[str], reference: set[str]) -> tuple[float, ...]:
    """(set precision, set recall, set F1, soft precision, soft recall, soft F1) of one pair of answer sets."""
    if not predicted or not reference:
        score = float(predicted == reference)
        return (score,) * 6
    exact = len(predicted & reference)
    set_p, set_r = exact / len(predicted), exact / len(reference)
    pred, ref = sorted(predicted), sorted(reference)
    f1 = np.array([[token_f1(p, r) for r in ref] for p in pred])
    rows, cols = linear_sum_assignment(f1, maximize=True)
    soft = float(f1[rows, cols].sum())
    soft_p, soft_r = soft / len(pred), soft / len(ref)
    return set_p, set_r, _f1(set_p, set_r), soft_p, soft_r, _f1(soft_p, soft_r)


def exact_set_match(predicted: list[str], reference: set[str]) -> float:
    """1.0 if the normalized predicted answers are the reference set, each once; else 0.0."""
    return float(len(set(predicted)) == len(predicted) and set(predicted) == reference)


def count_repeats(answers: list[str]) -> int:
    """How many of the normalized answers repeat an earlier one: `["ann", "ann", "bob"]` -> 1."""
    return len(answers) - len(set(answers))


def pair_items(predicted: list[QAItem], reference: list[QAItem], match_questions: str) -> list[int | None]:
    """For each reference item, the index of its predicted partner, or None.

    `"position"`: the k-th with the k-th. `"text"`: Hungarian on the token-F1 of the normalized questions, ties
    broken by position (the nearest first); pairs with no common question token are dropped.
    """
    if match_questions == "position":
        return [k if k < len(predicted) else None for k in range(len(reference))]
    partners: list[int | None] = [None] * len(reference)
    if not predicted or not reference:
        return partners
    similarity = np.array(
        [[token_f1(normalize_answer(r.question), normalize_answer(p.question)) for p in predicted] for r in reference]
    )
    # Token-F1 values differ by at least 1 / (question tokens)^2, far above this tie-breaking term.
    distance = np.abs(np.arange(len(reference))[:, None] - np.arange(len(predicted))[None, :])
    tie_break = 1e-6 * distance / (len(reference) + len(predicted))
    for ref_index, pred_index in zip(*linear_sum_assignment(similarity - tie_break, maximize=True), strict=True):
        if similarity[ref_index, pred_index] > 0:
            partners[ref_index] = int(pred_index)
    return partners


def question_scores(ref_item: QAItem, pred_item: QAItem | None, pred_answers: list[str]) -> dict[str, float]:
    """The scores of one reference question (`SCORE_KEYS`) against its predicted partner, whose normalized answers
    are `pred_answers`; without a partner (`pred_item` None) every score is 0 and every reference answer is missing."""
    num_ref = len(ref_item.answers)
    if pred_item is None:
        return {**dict.fromkeys(SCORE_KEYS, 0.0), "cardinality_error": num_ref, "cardinality_bias": -num_ref}
    ref_set = {normalize_answer(a) for a in ref_item.answers}
    scores = dict(zip(SCORE_KEYS[:6], _pair_scores(set(pred_answers), ref_set), strict=True))
    scores["exact_set_match"] = exact_set_match(pred_answers, ref_set)
    scores["cardinality_error"] = abs(len(pred_item.answers) - num_ref)
    scores["cardinality_bias"] = len(pred_item.answers) - num_ref
    return scores


def answer_set_scores(
    predictions: list[str],
    references: list[str],
    qa_token: str = "<QA>",
    answer_token: str = "<A>",
    question_end: str = "?",
    match_questions: str = "position",
) -> dict[str, float]:
    """Score generated completions against reference completions; the formulas are in the module docstring.

    Args:
        predictions: generated completions, one per example (text; special tokens other than the separators removed).
        references: the reference completions, aligned with `predictions`.
        qa_token, answer_token, question_end: the separators, as in `QALossConfig`.
        match_questions: how predicted items are paired with reference items, `"position"` or `"text"` (see the
            module docstring).

    Returns:
        the averaged scores (`set_f1`, `soft_f1`, ...; 0.0 when there is no reference question) and the counts
        (`parse_failures`, `questions_expected`, ...), all floats.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"`predictions` and `references` must be aligned; got {len(predictions)} predictions and "
            f"{len(references)} references."
        )
    check_choice("match_questions", match_questions, MATCH_QUESTIONS)
    sums = dict.fromkeys(SCORE_KEYS, 0.0)
    counts = dict.fromkeys(COUNT_KEYS, 0.0)
    counts["num_examples"] = float(len(predictions))
    matched_f1 = predicted_answers = repeated_answers = 0.0
    for prediction, reference in zip(predictions, references, strict=True):
        pred_items = parse_qa_text(prediction, qa_token, answer_token, question_end)
        ref_items = parse_qa_text(reference, qa_token, answer_token, question_end)
        counts["parse_failures"] += not pred_items
        counts["reference_parse_failures"] += not ref_items
        counts["questions_expected"] += len(ref_items)
        counts["questions_predicted"] += len(pred_items)
        pred_answers = [[normalize_answer(a) for a in item.answers] for item in pred_items]
        predicted_answers += sum(len(answers) for answers in pred_answers)
        repeated_answers += sum(count_repeats(answers) for answers in pred_answers)
        for ref_item, partner in zip(ref_items, pair_items(pred_items, ref_items, match_questions), strict=True):
            pred_item = None if partner is None else pred_items[partner]
            scores = question_scores(ref_item, pred_item, [] if partner is None else pred_answers[partner])
            for key in SCORE_KEYS:
                sums[key] += scores[key]
            if pred_item is not None and normalize_answer(pred_item.question) == normalize_answer(ref_item.question):
                counts["questions_matched"] += 1
                matched_f1 += scores["set_f1"]
    num_questions = max(counts["questions_expected"], 1.0)
    scores = {key: value / num_questions for key, value in sums.items()}
    scores["matched_question_set_f1"] = matched_f1 / max(counts["questions_matched"], 1.0)
    scores["duplicate_rate"] = repeated_answers / max(predicted_answers, 1.0)
    return {**scores, **counts}
