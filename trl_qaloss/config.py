"""`QALossConfig`: `SFTConfig` plus the set loss's weights and separators."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import SFTConfig

from .loss import REDUCTIONS


@dataclass
class QALossConfig(SFTConfig):
    r"""
    Configuration for [`QALossSFTTrainer`]: every [`~trl.SFTConfig`] field, plus the set-matching loss.

    Training minimises `lambda_ce * SFT_cross_entropy + lambda_set * set_loss` (the seed's `LAMBDA1` and `LAMBDA2`).

    Parameters:
        lambda_ce (`float`, defaults to `1.0`): weight of the SFT cross-entropy.
        lambda_set (`float`, defaults to `1.0`): weight of the set-matching loss; `0` trains exactly like `SFTTrainer`.
        qa_token (`str`, defaults to `"<QA>"`): token that starts each question/answer item.
        answer_token (`str`, defaults to `"<A>"`): token that starts each answer.
        question_end (`str`, defaults to `"?"`): text that ends a question; every token containing it does.
        set_loss_reduction (`str`, defaults to `"mean"`): `"mean"` divides the summed pair costs by the number of
            target answer tokens, `"sum"` keeps the sum.
    """

    lambda_ce: float = field(
        default=1.0, metadata={"help": "Weight of the SFT cross-entropy term (the seed's LAMBDA1)."}
    )
    lambda_set: float = field(
        default=1.0,
        metadata={"help": "Weight of the set-matching loss (the seed's LAMBDA2). 0 trains exactly like SFTTrainer."},
    )
    qa_token: str = field(default="<QA>", metadata={"help": "Token that starts each question/answer item."})
    answer_token: str = field(default="<A>", metadata={"help": "Token that starts each answer."})
    question_end: str = field(
        default="?", metadata={"help": "Text that ends a question; every token whose text contains it ends one."}
    )
    set_loss_reduction: str = field(
        default="mean",
        metadata={
            "help": "How the set loss is reduced: 'mean' (summed pair costs over the number of target answer tokens) "
            "or 'sum'.",
            "choices": list(REDUCTIONS),
        },
    )

    def __post_init__(self):
        for name in ("lambda_ce", "lambda_set"):
            value = getattr(self, name)
            # bool is an int, and an infinite weight gives an infinite loss at the first step.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"`{name}` must be a finite non-negative number, got {value!r}.")
        if self.lambda_ce == 0 and self.lambda_set == 0:
            raise ValueError("`lambda_ce` and `lambda_set` are both 0: nothing would be trained. Set one above 0.")
        for name in ("qa_token", "answer_token", "question_end"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"`{name}` must be a non-empty string, got {value!r}.")
        if self.qa_token == self.answer_token:
            raise ValueError(f"`qa_token` and `answer_token` must differ; both are {self.qa_token!r}.")
        if self.question_end in (self.qa_token, self.answer_token):
            raise ValueError(
                f"`question_end`={self.question_end!r} is a separator; set it to the text ending questions, e.g. '?'."
            )
        if self.set_loss_reduction not in REDUCTIONS:
            raise ValueError(f"`set_loss_reduction` must be one of {REDUCTIONS}, got {self.set_loss_reduction!r}.")
        super().__post_init__()
