"""The names of the options the engine and the evaluation take, and their check.

Plain tuples, with no tensor code, so that `QALossConfig` validates a recipe without loading the engine.
"""

from __future__ import annotations

# How each item's target answers are ordered before training on them (see `answer_order.py`).
ANSWER_ORDERS = ("data", "canonical", "appearance", "preferred", "aligned")
# The orders that read a forward of the model on the batch as given.
MODEL_ORDERS = ("preferred", "aligned")
# The orders that read the text of the prompt and the answers, decoded with the tokenizer.
TEXT_ORDERS = ("appearance",)
# How a batch's set sum becomes the set loss (see `reduction.py`).
REDUCTIONS = ("mean", "sum")
# The config fields that name the separators, in `QASeparators.from_tokenizer`'s order.
SEPARATOR_FIELDS = ("qa_token", "answer_token", "question_end")
# How the answer-set evaluation pairs generated items with reference items (see `metrics.answer_set_scores`).
MATCH_QUESTIONS = ("position", "text")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the option `name` when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def check_answer_order(order: str) -> None:
    check_choice("answer_order", order, ANSWER_ORDERS)
