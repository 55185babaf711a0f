"""`QASetEvalCallback`: answer-set metrics of greedy completions, logged at every evaluation."""

from __future__ import annotations

import itertools
import logging

import torch
from accelerate.utils import gather_object
from transformers import ProcessorMixin, TrainerCallback
from trl.models.utils import unwrap_model_for_generation

from .engine.options import MATCH_QUESTIONS, check_choice
from .generation import greedy_completions, hidden_token_ids
from .metrics import answer_set_scores

logger = logging.getLogger(__name__)


def split_prompt_and_reference(input_ids: list[int], labels: list[int], row: int) -> tuple[list[int], list[int]]:
    """Split a tokenized eval row at its first label: `(prompt ids, reference ids)`.

    The prompt is every token before the first label (`labels != -100`); the reference is the first run of labelled
    tokens (the completion, or the first assistant turn of a conversation with `assistant_only_loss`).
    """
    first = next((i for i, label in enumerate(labels) if label != -100), len(labels))
    if first == 0:
        raise ValueError(
            f"Row {row} of the eval dataset is labelled from its first token, so it has no prompt to generate from. "
            "The answer-set evaluation completes the tokens before the first label: use a prompt/completion dataset "
            "(with `completion_only_loss`, the default) or a conversational one with `assistant_only_loss=True`."
        )
    end = next((i for i in range(first, len(labels)) if labels[i] == -100), len(labels))
    return list(input_ids[:first]), list(input_ids[first:end])


def warn_if_no_item_parses(references: list[str], separators: tuple[str, str, str], name: str) -> None:
    """Warn when no reference of an eval dataset parses into a question with an answer: every answer-set metric would
    then be 0 at every evaluation, whatever the model learns."""
    from .engine.parsing import parse_qa_text

    if references and not any(item.answers for ref in references for item in parse_qa_text(ref, *separators)):
        qa_token, answer_token, question_end = separators
        logger.warning(
            "No reference completion of the %d %s rows the answer-set evaluation reads holds a question/answer item "
            "with an answer (qa_token=%r, answer_token=%r, question_end=%r; e.g. %r), so eval_set_f1 and the other "
            "answer-set metrics will be 0. Set `qa_token`, `answer_token` and `question_end` to the separators the "
            "data uses.",
            len(references),
            name,
            qa_token,
            answer_token,
            question_end,
            references[0][:120],
        )


class QASetEvalCallback(TrainerCallback):
    """At each evaluation, complete eval prompts greedily and log the answer-set metrics of `answer_set_scores`.

    The prompts and references come from the *tokenized* rows the evaluation just read (the first `num_samples`):
    the prompt is the ids before the first label, exactly what the model is trained to continue (chat template and
    generation prompt included), and the reference is the first run of labelled ids. Both sides are decoded without
    special tokens other than the separators; generation stops at EOS or after `max_new_tokens`. The model runs in
    eval mode, without gradients, batched with left padding, and is put back in the mode it was in; prompts are
    split across processes and the completions gathered.

    The metrics are added to the `metrics` of `evaluate()` (so `metric_for_best_model="eval_set_f1"` works) and
    logged with the trainer's `log` under the evaluation's prefix (`eval_set_f1`, `eval_set_precision`,
    `eval_set_recall`, `eval_soft_f1`, `eval_exact_set_match`, `eval_duplicate_rate`, `eval_cardinality_error`,
    `eval_parse_failures`, ...), so they reach
    `state.log_history` and every `report_to` integration. `QALossSFTTrainer` adds this callback when
    `eval_generate_samples > 0`; with another trainer, `trainer.add_callback(QASetEvalCallback(trainer, 16))`.

    Args:
        trainer: the `Trainer` (for its model, accelerator, tokenizer and `log`).
        num_samples: eval rows completed at each evaluation; default `trainer.args.eval_generate_samples`.
        max_new_tokens: default `trainer.args.eval_max_new_tokens`, else 128.
        batch_size: prompts per `generate` call; default `trainer.args.eval_generate_batch_size`, else
            `per_device_eval_batch_size`.
        match_questions: how generated items are paired with reference items, `"position"` or `"text"` (see
            `answer_set_scores`); default `trainer.args.eval_match_questions`, else `"position"`.
    """

    def __init__(
        self,
        trainer,
        num_samples: int | None = None,
        max_new_tokens: int | None = None,
        batch_size: int | None = None,
        match_questions: str | None = None,
    ):
        args = trainer.args
        self.trainer = trainer
        self.num_samples = num_samples if num_samples is not None else getattr(args, "eval_generate_samples", 0)
        self.max_new_tokens = max_new_tokens or getattr(args, "eval_max_new_tokens", 128)
        self.batch_size = (
            batch_size or getattr(args, "eval_generate_batch_size", None) or args.per_device_eval_batch_size
        )
        self.match_questions = match_questions or getattr(args, "eval_match_questions", "position")
        # The last evaluation's examples, for a summary after training: `(prompt, prediction, reference, whether
        # truncation to `max_length` cut the reference)`.
        self.last_examples: list[tuple[str, str, str, bool]] = []
        check_choice("match_questions", self.match_questions, MATCH_QUESTIONS)
        self.separators = tuple(
            getattr(args, name, default)
            for name, default in (("qa_token", "<QA>"), ("answer_token", "<A>"), ("question_end", "?"))
        )
        if self.num_samples < 1:
            raise ValueError(
                f"`eval_generate_samples` must be at least 1 to evaluate answer sets, got {self.num_samples}."
            )
        if trainer.eval_dataset is None:
            raise ValueError("`eval_generate_samples > 0` needs an `eval_dataset` to take the prompts from; pass one.")
        packing = getattr(args, "eval_packing", None)
        if packing if packing is not None else getattr(args, "packing", False):
            raise ValueError(
                "The answer-set evaluation needs one example per eval row, but eval rows are packed. Set "
                "`eval_packing=False`."
            )
        tokenizer = trainer.processing_class
        self.tokenizer = tokenizer.tokenizer if isinstance(tokenizer, ProcessorMixin) else tokenizer
        self._hidden_ids = hidden_token_ids(self.tokenizer, self.separators[:2])
        datasets = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else {"eval": trainer.eval_dataset}
        for name, dataset in datasets.items():  # fail at start-up, not at the first evaluation
            warn_if_no_item_parses(self._samples(dataset)[1], self.separators, name)

    def _samples(self, dataset) -> tuple[list[list[int]], list[str], list[bool]]:
        """Prompt ids, reference texts and whether truncation cut each reference, for the first `num_samples` rows of
        a tokenized eval dataset."""
        rows = itertools.islice(iter(dataset), self.num_samples)
        prompts, references, cut = [], [], []
        max_length = getattr(self.trainer.args, "max_length", None)
        for index, row in enumerate(rows):
            if "input_ids" not in row or "labels" not in row:
                raise ValueError(
                    f"Row {index} of the eval dataset has no 'input_ids' and 'labels' ({sorted(row)}); the answer-set "
                    "evaluation reads the tokenized rows the trainer prepares. Do not skip dataset preparation."
                )
            prompt, reference = split_prompt_and_reference(row["input_ids"], row["labels"], index)
            prompts.append(prompt)
            references.append(self._text(reference))
            # A reference that runs to the end of a row of `max_length` tokens without its end-of-sequence token
            # lost its tail to truncation (a last answer "Julie" for "Julie Sussman").
            ids = row["input_ids"]
            full = len(ids) >= (max_length or len(ids) + 1)
            cut.append(
                bool(full and len(prompt) + len(reference) == len(ids) and ids[-1] != self.tokenizer.eos_token_id)
            )
        return prompts, references, cut

    def _text(self, ids) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self._hidden_ids], skip_special_tokens=False)

    def _generate(self, prompts: list[list[int]]) -> list[str]:
        trainer = self.trainer
        with unwrap_model_for_generation(
            trainer.model_wrapped,
            trainer.accelerator,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ) as model:
            completions = greedy_completions(model, self.tokenizer, prompts, self.max_new_tokens, self.batch_size)
        return [self._text(ids) for ids in completions]

    def on_evaluate(self, args, state, control, metrics=None, eval_dataloader=None, **kwargs):
        trainer = self.trainer
        metrics = metrics if metrics is not None else {}
        # `evaluate` names its metrics `{prefix}_runtime`, ...: "eval", or "eval_<name>" for a dict of datasets.
        prefix = next((k[: -len("_runtime")] for k in metrics if k.endswith("_runtime")), "eval")
        dataset = getattr(eval_dataloader, "dataset", None)
        if dataset is None:
            dataset = trainer.eval_dataset
            if isinstance(dataset, dict):
                dataset = dataset[prefix.removeprefix("eval_")]
        prompts, references, cut = self._samples(dataset)
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            indices = list(range(len(prompts)))
            with trainer.accelerator.split_between_processes(indices) as local, torch.no_grad():
                predictions = self._generate([prompts[i] for i in local])
                order = gather_object(list(local))
                predictions = gather_object(predictions)
            references = [references[i] for i in order]
            self.last_examples = [
                (self._text(prompts[i]), p, r, cut[i]) for i, p, r in zip(order, predictions, references, strict=True)
            ]
            scores = answer_set_scores(predictions, references, *self.separators, match_questions=self.match_questions)
            logs = {f"{prefix}_{key}": value for key, value in scores.items()}
            metrics.update(logs)
            # Logged in eval mode: TRL's `log` reads the mode to decide which of its own metrics to flush.
            trainer.log(dict(logs))
        finally:
            model.train(was_training)


class StepCounter(TrainerCallback):
    """Counts the optimizer steps a `train()` call takes (a resumed run's earlier steps not included)."""

    def __init__(self):
        self.count = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1
