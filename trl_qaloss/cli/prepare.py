"""`trl-qaloss prepare`: write a dataset with each item's answers in a training order, for any trainer.

    trl-qaloss prepare --dataset_name DATA --answer_order canonical --tokenizer MODEL --output prepared.jsonl

The rows keep their format (structured rows stay structured); see `trl_qaloss/reordered_data.py` for how the order is
found and checked. Bad rows fail with the line-numbered errors `train` gives.
"""

from __future__ import annotations

import json
import os

from ..demo import resolve_demo_path
from ..engine.options import ANSWER_ORDERS, MODEL_ORDERS, SEPARATOR_FIELDS
from ..errors import ArgumentParser, UsageError, user_errors

PREPARE_ORDERS = tuple(order for order in ANSWER_ORDERS if order not in MODEL_ORDERS)


def separator_defaults() -> dict[str, str]:
    """`QALossConfig`'s defaults of the separators."""
    from ..config import QALossConfig

    return {name: QALossConfig.__dataclass_fields__[name].default for name in SEPARATOR_FIELDS}


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="trl-qaloss prepare",
        description="Write a dataset with each item's answers in the order QALossSFTTrainer trains on (answer_order, "
        "lambda_set=0), in the format it was read in, so that any trainer's plain SFT trains on the same targets.",
    )
    parser.add_argument("--dataset_name", required=True, help="a .jsonl/.json file, a directory of them, or a hub name")
    parser.add_argument("--dataset_config", default=None, help="the hub dataset's configuration")
    parser.add_argument("--dataset_split", default="train", help="the split to write (default: train)")
    parser.add_argument(
        "--answer_order",
        required=True,
        metavar="{" + ",".join(PREPARE_ORDERS) + "}",
        help="'canonical' (sorted by token ids), 'appearance' (the answers the prompt names first, by first "
        "occurrence, then the others in canonical order) or 'data' (as given)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="the tokenizer of the model you will train (a directory or a hub name): 'canonical' and 'appearance' "
        "order token ids and decoded text",
    )
    parser.add_argument("--output", required=True, help="the .jsonl file to write")
    parser.add_argument(
        "--prompt_completion",
        action="store_true",
        help="write structured rows as the prompt/completion rows `trl-qaloss train` converts them to (TRL's "
        "format, which other trainers read) instead of structured",
    )
    for name, default in separator_defaults().items():
        parser.add_argument(f"--{name}", default=default, help=f"as in QALossConfig (default: {default!r})")
    return parser


def check_order(order: str, tokenizer: str | None) -> None:
    if order in MODEL_ORDERS:
        raise UsageError(
            f"`--answer_order {order}` reads the model being trained: its order exists only inside "
            f"QALossSFTTrainer. prepare writes {', '.join(PREPARE_ORDERS)}."
        )
    if order not in PREPARE_ORDERS:
        raise UsageError(f"`--answer_order` must be one of {', '.join(PREPARE_ORDERS)}, got {order!r}.")
    if order != "data" and tokenizer is None:
        raise UsageError(
            f"`--answer_order {order}` needs `--tokenizer`, the tokenizer of the model you will train: its order is "
            "on token ids."
        )


def load_tokenizer(name_or_path: str, qa_token: str, answer_token: str):
    """The tokenizer, with the separators added as special tokens when they are not single tokens of it, as
    `QALossSFTTrainer` adds them."""
    from transformers import AutoTokenizer

    from ..separator_tokens import missing_separators

    tokenizer = AutoTokenizer.from_pretrained(resolve_demo_path(name_or_path))
    missing = missing_separators(tokenizer, qa_token, answer_token)
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        print(f"Added {missing} to the tokenizer as special tokens, as QALossSFTTrainer does.")
    return tokenizer


def prepare(args) -> str:
    """Write the reordered split to `args.output`; returns the summary line to print."""
    from ..data import format_qas_dataset, load_dataset_rows
    from ..data_checks import check_chat_template, check_columns
    from ..reordered_data import reorder_rows

    check_order(args.answer_order, args.tokenizer)
    separators = (args.qa_token, args.answer_token, args.question_end)
    tokenizer = None if args.answer_order == "data" else load_tokenizer(args.tokenizer, *separators[:2])
    dataset, sources = load_dataset_rows(resolve_demo_path(args.dataset_name), args.dataset_config)
    if args.dataset_split not in dataset:
        raise ValueError(
            f"The dataset has no split {args.dataset_split!r} (it has {sorted(dataset)}); set `--dataset_split`."
        )
    rows, source = dataset[args.dataset_split], sources[args.dataset_split]
    # The checks `train` runs on the rows before training: the same errors, naming the same lines.
    kwargs = dict(zip(SEPARATOR_FIELDS, separators, strict=True))
    trl_rows = format_qas_dataset(rows, **source, **kwargs)
    check_columns(trl_rows, source["source"], "text", has_formatting_func=False)
    if tokenizer is not None:
        check_chat_template(trl_rows, source["source"], tokenizer, None)
    result = reorder_rows(
        rows, args.answer_order, tokenizer, separators, **source, prompt_completion=args.prompt_completion
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows)
    moved = "" if args.answer_order == "data" else f"; answers moved in {result.moved} of {result.items} items"
    return f"Wrote {len(result.rows)} rows to {args.output}, answers in {args.answer_order} order{moved}."


def run_prepare(argv: list[str]) -> None:
    with user_errors():
        summary = prepare(make_parser().parse_args(argv))
    print(summary)
