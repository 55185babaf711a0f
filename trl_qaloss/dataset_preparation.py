"""How the trainer's datasets are prepared: structured rows converted, columns and chat templates checked at start-up,
and the rows that truncation to `max_length` would cut counted before TRL truncates them."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

from datasets import Dataset
from transformers import ProcessorMixin

from .config import QALossConfig
from .data import format_structured
from .data_checks import check_chat_template, check_columns, truncation_report
from .engine.options import SEPARATOR_FIELDS
from .engine.separators import QASeparators

logger = logging.getLogger(__name__)


def named_datasets(train_dataset, eval_dataset) -> dict:
    """`{"train_dataset": ..., "eval_dataset": ...}` (`eval_dataset['name']` for a dict), without the `None`s."""
    datasets = {"train_dataset": train_dataset}
    if isinstance(eval_dataset, dict):
        datasets.update({f"eval_dataset[{k!r}]": v for k, v in eval_dataset.items()})
    else:
        datasets["eval_dataset"] = eval_dataset
    return {name: dataset for name, dataset in datasets.items() if dataset is not None}


def format_structured_datasets(args: QALossConfig, train_dataset, eval_dataset):
    """The datasets with structured `{"context", "qas"}` rows converted by `format_qas_dataset`, as the CLI does."""
    separators = {name: getattr(args, name) for name in SEPARATOR_FIELDS}
    train_dataset = format_structured(train_dataset, source="train_dataset", **separators)
    if isinstance(eval_dataset, dict):
        return train_dataset, {
            k: format_structured(v, source=f"eval_dataset[{k!r}]", **separators) for k, v in eval_dataset.items()
        }
    return train_dataset, format_structured(eval_dataset, source="eval_dataset", **separators)


def check_chat_templates(train_dataset, eval_dataset, tokenizer, chat_template_path) -> None:
    for name, dataset in named_datasets(train_dataset, eval_dataset).items():
        check_chat_template(dataset, name, tokenizer, chat_template_path)


def check_datasets_columns(args: QALossConfig, train_dataset, eval_dataset, has_formatting_func: bool) -> None:
    for name, dataset in named_datasets(train_dataset, eval_dataset).items():
        check_columns(dataset, name, args.dataset_text_field, has_formatting_func)


def prepare_with_truncation_report(
    prepare: Callable, dataset, processing_class, args: QALossConfig, packing, formatting_func, dataset_name: str
) -> tuple[Dataset, str | None]:
    """`prepare` (TRL's `_prepare_dataset`) run on `dataset`, and the warning about the target answers that the
    truncation to `max_length` cuts (None if it cuts none): the rows are prepared in full, counted, then truncated.

    Only for a `Dataset` that is not packed and has a `max_length`; other datasets go to `prepare` directly.
    """
    if not (args.max_length is not None and not packing and isinstance(dataset, Dataset)):
        return prepare(dataset, processing_class, args, packing, formatting_func, dataset_name), None
    untruncated_args = copy.copy(args)
    untruncated_args.max_length, untruncated_args.shuffle_dataset = None, False
    full = prepare(dataset, processing_class, untruncated_args, packing, formatting_func, dataset_name)
    tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
    seps = QASeparators.from_tokenizer(tokenizer, *(getattr(args, name) for name in SEPARATOR_FIELDS))
    report = truncation_report(full, args.max_length, args.truncation_mode == "keep_end", seps)
    hint = None
    if report.cut_answers:
        hint = report.message(f"{dataset_name}_dataset", args.max_length)
        logger.warning(hint)
    # `full` is tokenized and labelled, so TRL only truncates it (and shuffles it if asked).
    return prepare(full, processing_class, args, packing, None, dataset_name), hint
