"""`QALossConfig`: `SFTConfig` plus the set loss's weights and separators."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import SFTConfig

from .compat import checkpointing_values, mirror_checkpointing_names, resolve_checkpointing_names
from .engine.options import ANSWER_ORDERS, MATCH_QUESTIONS, REDUCTIONS, check_answer_order, check_choice


@dataclass
class QALossConfig(SFTConfig):
    r"""
    Configuration for [`QALossSFTTrainer`]: every [`~trl.SFTConfig`] field, plus the set-matching loss.

    Training minimises `lambda_ce * SFT_cross_entropy + lambda_set * set_loss`.

    Parameters:
        lambda_ce (`float`, defaults to `1.0`): weight of the SFT cross-entropy.
        lambda_set (`float`, defaults to `0.0`): weight of the set-matching loss; `0` (the default: the best answer
            sets in the benchmark) trains with the SFT cross-entropy alone, on the targets `answer_order` gives, and
            with `answer_order="data"` exactly like `SFTTrainer`.
        qa_token (`str`, defaults to `"<QA>"`): token that starts each question/answer item.
        answer_token (`str`, defaults to `"<A>"`): token that starts each answer.
        question_end (`str`, defaults to `"?"`): text that ends a question; every token containing it does.
        set_loss_reduction (`str`, defaults to `"mean"`): `"mean"` divides the summed pair costs by the number of
            target answer tokens, `"sum"` keeps the sum.
        answer_order (`str`, defaults to `"canonical"`): how each item's target answers are ordered before both loss
            terms read them, in training: `"data"`, `"canonical"`, `"appearance"`, `"preferred"` or `"aligned"` (see
            [`reorder_answers`]). Evaluation losses use the targets as given.
        eval_generate_samples (`int`, defaults to `0`): at each evaluation, complete this many eval prompts (the
            first rows of the eval dataset, greedy) and log answer-set metrics (`eval_set_f1`, ...; see
            [`QASetEvalCallback`]). `0` turns it off.
        eval_max_new_tokens (`int`, defaults to `128`): most tokens generated per eval prompt.
        eval_generate_batch_size (`int` or `None`, defaults to `None`): prompts per `generate` call; `None` uses
            `per_device_eval_batch_size`.
        eval_match_questions (`str`, defaults to `"position"`): how the answer-set evaluation pairs generated items
            with reference items: `"position"` (the k-th with the k-th) or `"text"` (by question text); see
            [`answer_set_scores`].
        bf16 (`bool` or `None`, defaults to `None`): as in TRL, bf16 mixed precision unless `fp16` is set, on a
            machine with a bf16 GPU; on a machine without one (a CPU-only machine) it is off unless set to `True`.
        activation_checkpointing (`bool`, defaults to `True`): as in TRL, on by default; named here under its
            current transformers name so that a default config raises no deprecation warning about
            `gradient_checkpointing`, which remains an alias.
    """

    # TRL sets the deprecated `gradient_checkpointing` to True, which makes transformers warn on every config; the same
    # default under the current name keeps TRL's behaviour without the warning. The alias still works when set.
    activation_checkpointing: bool | None = field(
        default=True,
        metadata={"help": "Recompute activations in the backward pass to save memory (slower); on by default."},
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Old name of `activation_checkpointing`; use that instead."}
    )
    # Declared here too so that it works with the transformers releases that know only the old name (see compat.py).
    activation_checkpointing_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments of activation checkpointing, e.g. {'use_reentrant': true}."}
    )

    lambda_ce: float = field(
        default=1.0,
        metadata={"help": "Weight of the SFT cross-entropy (the usual next-token loss) in the training loss."},
    )
    lambda_set: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the set-matching loss, which scores the answers of each question whatever their "
            "order. 0 (the default) trains with the SFT loss alone, on the targets answer_order gives; with "
            "answer_order 'data' exactly like SFTTrainer."
        },
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

    answer_order: str = field(
        default="canonical",
        metadata={
            "help": "Order of each item's target answers during training: 'canonical' (the default: sorted by token "
            "ids, the best answer sets in the benchmark, with answers from memory or read off the prompt), 'data' "
            "(as given), 'appearance' (the answers that occur "
            "in the prompt first, in the order they first occur there, then the others in canonical order; "
            "'occurs': the answer's normalized text is in the prompt's on word boundaries, as the metrics normalize), "
            "'preferred' (the answer the model scores highest first) or 'aligned' (the model's own answers, "
            "matched by token IoU). Every mode rewrites the target sequence itself, so both loss terms train on a "
            "consistent context; 'preferred' and 'aligned' cost one extra forward without gradient.",
            "choices": list(ANSWER_ORDERS),
        },
    )

    eval_generate_samples: int = field(
        default=0,
        metadata={
            "help": "At each evaluation, greedily complete this many eval prompts (the first rows of the eval dataset) "
            "and log answer-set metrics: eval_set_f1, eval_set_precision, eval_set_recall, eval_soft_f1, "
            "eval_cardinality_error, eval_parse_failures. 0 turns it off."
        },
    )
    eval_max_new_tokens: int = field(
        default=128, metadata={"help": "Most tokens generated per eval prompt when `eval_generate_samples > 0`."}
    )
    eval_generate_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Prompts per generate call when `eval_generate_samples > 0`; default: per_device_eval_batch_size."
        },
    )
    eval_match_questions: str = field(
        default="position",
        metadata={
            "help": "How the answer-set evaluation pairs generated items with reference items: 'position' (the k-th "
            "with the k-th) or 'text' (one to one by question text).",
            "choices": list(MATCH_QUESTIONS),
        },
    )

    def __post_init__(self):
        if self.gradient_checkpointing is not None:
            # The old name was set: transformers reads it (and says to rename it) only when the new one is unset.
            self.activation_checkpointing = None
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
        check_run_numbers(self)
        check_answer_order(self.answer_order)
        check_choice("set_loss_reduction", self.set_loss_reduction, REDUCTIONS)
        check_choice("eval_match_questions", self.eval_match_questions, MATCH_QUESTIONS)
        for name, minimum in (
            ("eval_generate_samples", 0),
            ("eval_max_new_tokens", 1),
            ("eval_generate_batch_size", 1),
        ):
            value = getattr(self, name)
            if value is None and name == "eval_generate_batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
        if self.bf16 is None and not self.fp16 and not bf16_supported(self.use_cpu):
            self.bf16 = False  # TRL turns bf16 on by default, which transformers refuses without a bf16 GPU
        resolve_checkpointing_names(self)
        super().__post_init__()
        mirror_checkpointing_names(self)


# Numbers no run can use, refused before anything loads: (field, smallest value, whether it must be a whole number,
# whether None is allowed). A negative `max_steps` other than -1, say, would otherwise train `num_train_epochs`
# silently, and a negative `num_train_epochs` would train nothing and save an untrained model.
NUMBER_RULES = (
    ("num_train_epochs", 0, False, False),  # > 0, checked apart: 0 epochs train nothing
    ("per_device_train_batch_size", 1, True, False),
    ("per_device_eval_batch_size", 1, True, False),
    ("gradient_accumulation_steps", 1, True, False),
    ("max_length", 1, True, True),
    ("learning_rate", 0, False, False),
    ("warmup_steps", 0, False, False),
    ("eval_steps", 0, False, True),  # > 0: a share of the run below 1, a number of steps from 1
    ("eval_delay", 0, False, False),
    ("eval_accumulation_steps", 1, True, True),
    ("save_steps", 0, False, False),  # > 0, as eval_steps
    ("dataloader_num_workers", 0, True, False),
    ("dataset_num_proc", 1, True, True),
)
POSITIVE = {"num_train_epochs", "eval_steps", "save_steps"}


def check_run_numbers(args: TrainingArguments) -> None:
    """Raise a ValueError naming the first field of `NUMBER_RULES` (or `max_steps`) whose value no run can use."""
    max_steps = args.max_steps
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or not (max_steps == -1 or max_steps >= 1):
        raise ValueError(
            f"`max_steps` must be a positive number of steps, or -1 to train `num_train_epochs` epochs; got "
            f"{max_steps!r}."
        )
    for name, minimum, whole, optional in NUMBER_RULES:
        if not hasattr(args, name):
            continue  # a field the installed transformers or TRL release does not have
        value = getattr(args, name)
        if value is None and optional:
            continue
        kinds = (int,) if whole else (int, float)
        ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > minimum if name in POSITIVE else value >= minimum)
        if not ok:
            what = "a whole number" if whole else "a number"
            bound = f"> {minimum}" if name in POSITIVE else f">= {minimum}"
            unset = " or unset" if optional else ""
            raise ValueError(f"`{name}` must be {what} {bound}{unset}; got {value!r}.")


def bf16_supported(use_cpu: bool) -> bool:
    """Whether transformers accepts `bf16=True` here: a bf16 GPU, an XLA device, or training on the CPU by choice."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available()


def as_qaloss_config(args, model) -> QALossConfig:
    """`args` as a `QALossConfig`: as it is, converted from an `SFTConfig` or `TrainingArguments` (their values, the
    set-loss fields at their defaults), or the defaults named after `model` when None."""
    if isinstance(args, QALossConfig):
        return args
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path or "model"
        return QALossConfig(f"{name.rstrip('/').split('/')[-1]}-QALoss")
    if isinstance(args, TrainingArguments):
        # Not `to_dict()`: it masks every field named `*_token`, which would replace `eos_token` or `pad_token`.
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        # The checkpointing settings under their current names only: the old ones would warn again (see compat.py).
        values = checkpointing_values(values)
        return QALossConfig(**{k: v for k, v in values.items() if k in QALossConfig.__dataclass_fields__})
    raise TypeError(f"`args` must be a QALossConfig, SFTConfig or TrainingArguments, got {type(args).__name__}.")


def reads_items(args: QALossConfig) -> bool:
    """Whether training parses the items (for the set loss or the reordering); if not, this is `SFTTrainer`."""
    return args.lambda_set > 0 or args.answer_order != "data"
