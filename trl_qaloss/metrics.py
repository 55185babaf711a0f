r"""Answer-set metrics of generated completions against reference completions, both text in the `<QA>` format.

Both sides are parsed with `parse_qa_text` (the rules of the loss's parser). The k-th predicted item is paired with
the k-th reference item, and every score is computed per *reference question* and averaged over all reference
questions of all examples; a reference question without a predicted partner scores 0.

For one pair, with $\hat S$ and $S$ the sets of normalized predicted and reference answers:

- `set_precision` $= |\hat S \cap S| / |\hat S|$, `set_recall` $= |\hat S \cap S| / |S|$ and `set_f1` their
  harmonic mean (exact match after normalization; duplicates count once). If $\hat S$ or $S$ is empty, all three are
  1 when both are and 0 otherwise.
- `soft_precision`, `soft_recall`, `soft_f1`: the same with partial credit. Answers are matched one to one by the
  Hungarian algorithm maximising the summed SQuAD token-F1 $F$ of the pairs; precision $= F / |\hat S|$, recall
  $= F / |S|$.
- `cardinality_error`: mean of $\big|\,n_{pred} - n_{ref}\big|$ and `cardinality_bias` mean of $n_{pred} - n_{ref}$,
  with $n$ the number of parsed answers (duplicates included: repeating an answer is an error of the count).

Normalization is SQuAD's, made Unicode-aware: NFKC, lowercase, drop punctuation (Unicode category P*), drop the
articles a/an/the, collapse whitespace. An answer that normalizes to nothing (`"the"`, `"..."`) keeps its lowercased,
whitespace-collapsed text, so it still only matches itself.

`matched_question_set_f1` is `set_f1` averaged only over the reference questions whose paired predicted question
is the same after normalization: how good the answer sets are when the model asks the right question (0.0 if none is).

Counts over all examples: `questions_expected` (reference items), `questions_predicted` (predicted items),
`questions_matched` (pairs whose normalized questions are equal), `parse_failures` (predictions with no item, e.g. no
`<QA>` at all) and `reference_parse_failures` (references with no item: they add no question). `num_examples` is the
number of pairs scored.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

import numpy as np
from scipy.optimize import linear_sum_assignment

from .parsing import parse_qa_text

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)

SCORE_KEYS = (
    "set_precision",
    "set_recall",
    "set_f1",
    "soft_precision",
    "soft_recall",
    "soft_f1",
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


def normalize_answer(text: str) -> str:
    """SQuAD normalization, Unicode-aware; text it would empty keeps its lowercased, whitespace-collapsed form."""
    lowered = unicodedata.normalize("NFKC", text).lower()
    no_punct = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in lowered)
    normalized = " ".join(_ARTICLES.sub(" ", no_punct).split())
    return normalized or " ".join(lowered.split())


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


def answer_set_scores(
    predictions: list[str],
    references: list[str],
    qa_token: str = "<QA>",
    answer_token: str = "<A>",
    question_end: str = "?",
) -> dict[str, float]:
    """Score generated completions against reference completions; the formulas are in the module docstring.

    Args:
        predictions: generated completions, one per example (text; special tokens other than the separators removed).
        references: the reference completions, aligned with `predictions`.
        qa_token, answer_token, question_end: the separators, as in `QALossConfig`.

    Returns:
        the averaged scores (`set_f1`, `soft_f1`, ...; 0.0 when there is no reference question) and the counts
        (`parse_failures`, `questions_expected`, ...), all floats.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"`predictions` and `references` must be aligned; got {len(predictions)} predictions and "
            f"{len(references)} references."
        )
    sums = dict.fromkeys(SCORE_KEYS, 0.0)
    counts = dict.fromkeys(COUNT_KEYS, 0.0)
    counts["num_examples"] = float(len(predictions))
    matched_f1 = 0.0
    for prediction, reference in zip(predictions, references, strict=True):
        pred_items = parse_qa_text(prediction, qa_token, answer_token, question_end)
        ref_items = parse_qa_text(reference, qa_token, answer_token, question_end)
        counts["parse_failures"] += not pred_items
        counts["reference_parse_failures"] += not ref_items
        counts["questions_expected"] += len(ref_items)
        counts["questions_predicted"] += len(pred_items)
        for k, ref_item in enumerate(ref_items):
            num_ref = len(ref_item.answers)
            if k >= len(pred_items):  # a missing question scores 0 and misses every answer
                sums["cardinality_error"] += num_ref
                sums["cardinality_bias"] -= num_ref
                continue
            pred_item = pred_items[k]
            scores = _pair_scores(
                {normalize_answer(a) for a in pred_item.answers}, {normalize_answer(a) for a in ref_item.answers}
            )
            if normalize_answer(pred_item.question) == normalize_answer(ref_item.question):
                counts["questions_matched"] += 1
                matched_f1 += scores[2]
            for key, value in zip(SCORE_KEYS[:6], scores, strict=True):
                sums[key] += value
            sums["cardinality_error"] += abs(len(pred_item.answers) - num_ref)
            sums["cardinality_bias"] += len(pred_item.answers) - num_ref
    num_questions = max(counts["questions_expected"], 1.0)
    scores = {key: value / num_questions for key, value in sums.items()}
    scores["matched_question_set_f1"] = matched_f1 / max(counts["questions_matched"], 1.0)
    return {**scores, **counts}
