"""Use a trained adapter: `trl-qaloss generate` (complete prompts) and `trl-qaloss evaluate` (answer-set metrics).

    trl-qaloss generate --adapter outputs/demo-cpu --prompt "Tell me about valdor."
    trl-qaloss generate --adapter outputs/demo-cpu --prompts prompts.jsonl --output completions.jsonl
    trl-qaloss evaluate --adapter outputs/demo-cpu --dataset_name trl_qaloss/demo/data

`trl-qaloss train` writes `trl_qaloss_base.json` next to the adapter: the base model, its 4-bit or 8-bit quantization,
its dtype and the separators. The base is loaded as it was trained (quantized when it was), the adapter on top of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

from ..data import read_jsonl
from ..demo import portable_demo_path, resolve_demo_path
from ..engine.options import SEPARATOR_FIELDS
from ..errors import ArgumentParser
from ..model_source import check_model_source, missing_path_message
from .heldout import read_heldout_record, rows_hash

BASE_INFO_FILE = "trl_qaloss_base.json"
# The loss settings `BASE_INFO_FILE` records besides the base: what the model was trained to do.
TRAINING_FIELDS = ("answer_order", "lambda_ce", "lambda_set")


def write_base_model_info(output_dir: str, model_args, training_args) -> None:
    """Record in `output_dir` how the trained model's base was loaded (for `load_for_inference`) and the loss it was
    trained with: `answer_order`, `lambda_ce` and `lambda_set` (for the model card `trl-qaloss merge` writes)."""
    from trl import get_quantization_config

    quantization = get_quantization_config(model_args)
    info = {
        "base_model_name_or_path": portable_demo_path(model_args.model_name_or_path),
        "quantization_config": None if quantization is None else json.loads(quantization.to_json_string()),
        "dtype": model_args.dtype,
        **{name: getattr(training_args, name) for name in SEPARATOR_FIELDS},
        **{name: getattr(training_args, name) for name in TRAINING_FIELDS},
    }
    with open(os.path.join(output_dir, BASE_INFO_FILE), "w") as file:
        json.dump(info, file, indent=2)


@dataclass
class LoadedModel:
    """A model ready to generate: the model in eval mode, its tokenizer, and the separators it was trained with."""

    model: object
    tokenizer: object
    qa_token: str = "<QA>"
    answer_token: str = "<A>"
    question_end: str = "?"

    @property
    def separators(self) -> tuple[str, str, str]:
        return self.qa_token, self.answer_token, self.question_end


def _read_json(path: str) -> dict:
    with open(path) as file:
        return json.load(file)


def adapter_base(adapter: str) -> tuple[dict, str | None]:
    """`(info, base)` of a LoRA adapter directory: what `trl-qaloss train` recorded in its `trl_qaloss_base.json`
    (`{}` when it has none), and the base model's name or path, from that file or else from the adapter config.

    A missing directory is a FileNotFoundError naming it; a directory without `adapter_config.json` one saying what
    it is not (and, when it holds a full model, how to use it)."""
    if not os.path.isdir(adapter):
        raise FileNotFoundError(missing_path_message(adapter, "Adapter directory", "--adapter"))
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        hint = (
            " It holds a full model: pass it as `--model_name_or_path` instead."
            if os.path.isfile(os.path.join(adapter, "config.json"))
            else " Give the `output_dir` of a `trl-qaloss train` run with `use_peft: true`, or a full model with "
            "`--model_name_or_path`."
        )
        raise FileNotFoundError(f"{adapter!r} is not a LoRA adapter directory (no adapter_config.json).{hint}")
    info_path = os.path.join(adapter, BASE_INFO_FILE)
    info = _read_json(info_path) if os.path.isfile(info_path) else {}
    base = info.get("base_model_name_or_path")
    return info, base or _read_json(os.path.join(adapter, "adapter_config.json")).get("base_model_name_or_path")


def load_tokenizer(base: str, adapter: str | None = None):
    """The tokenizer saved with `adapter` when there is one (it holds any separator tokens training added), else the
    base's."""
    from transformers import AutoTokenizer

    saved = adapter is not None and os.path.isfile(os.path.join(adapter, "tokenizer_config.json"))
    return AutoTokenizer.from_pretrained(adapter if saved else base)


def fit_embeddings(model, tokenizer) -> None:
    """Resize `model`'s embeddings to `tokenizer` when it has more tokens (separators added in training), so that an
    adapter's trained rows and saved embedding layers load onto them."""
    if len(tokenizer) > model.get_input_embeddings().weight.size(0):
        model.resize_token_embeddings(len(tokenizer))


def load_for_inference(adapter: str | None = None, model_name_or_path: str | None = None) -> LoadedModel:
    """Load a trained LoRA adapter on its base model (quantized as in training), or a full model.

    The base is the one `trl-qaloss train` recorded in `trl_qaloss_base.json`, else the adapter config's
    `base_model_name_or_path`; `model_name_or_path` with `adapter` replaces it. The tokenizer saved with the adapter
    is used when there is one (it holds any separator tokens training added), and the embeddings are resized to it.
    A full model's separators are read from the `trl_qaloss_base.json` in its directory when it has one (a full
    fine-tune's or a `trl-qaloss merge` output).
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if adapter is None and model_name_or_path is None:
        raise ValueError("Give `--adapter DIR` (a trained LoRA adapter) or `--model_name_or_path` (a full model).")
    if adapter is not None:
        info, base = adapter_base(adapter)
        base = model_name_or_path or base
    else:
        base = model_name_or_path
        info_path = os.path.join(resolve_demo_path(base), BASE_INFO_FILE)
        info = _read_json(info_path) if os.path.isfile(info_path) else {}
        info = {name: info[name] for name in SEPARATOR_FIELDS if name in info}  # the model is loaded as saved
    base = resolve_demo_path(base)
    check_model_source(base)  # with `--adapter`, `--model_name_or_path` gives its base another way
    cuda = torch.cuda.is_available()
    kwargs = {"dtype": info.get("dtype") or "auto"}
    if info.get("quantization_config"):
        kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(info["quantization_config"])
        if cuda:
            kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    tokenizer = load_tokenizer(base, adapter)
    fit_embeddings(model, tokenizer)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    if cuda and "device_map" not in kwargs:
        model = model.to("cuda")
    separators = {name: info[name] for name in SEPARATOR_FIELDS if name in info}
    return LoadedModel(model.eval(), tokenizer, **separators)


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt as training saw it: text tokenized as is, chat messages through the chat template with
    the generation prompt appended."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if tokenizer.chat_template is None:
        raise ValueError(
            "The prompts are chat messages but the tokenizer has no chat template; give one with "
            "`--chat_template_path`, or use a model whose tokenizer has one."
        )
    encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def complete(
    loaded: LoadedModel, prompts: list, max_new_tokens: int = 256, batch_size: int = 8, progress: bool = True
) -> list[str]:
    """Greedy completions of `prompts` (texts or chat message lists), decoded with the separators kept."""
    import torch

    from ..generation import greedy_completions, hidden_token_ids

    tokenizer = loaded.tokenizer
    ids = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    with torch.no_grad():
        completions = greedy_completions(loaded.model, tokenizer, ids, max_new_tokens, batch_size, progress)
    hidden = hidden_token_ids(tokenizer, loaded.separators[:2])
    return [tokenizer.decode([t for t in c if t not in hidden], skip_special_tokens=False).strip() for c in completions]


def parsed_items(text: str, separators: tuple[str, str, str]) -> list[dict]:
    """The `[{"question", "answers"}]` items of a completion."""
    from ..engine.parsing import parse_qa_text

    return [asdict(item) for item in parse_qa_text(text, *separators)]


def read_prompts(path: str) -> tuple[list, list[int]]:
    """Prompts from a JSONL file: each line a JSON string, or an object with `prompt`, `context` or `messages` (a
    list of `{"role", "content"}` messages); `(prompts, the line number of each)`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_path_message(path, "Prompts file", "--prompts"))
    prompts, lines = [], []
    for number, row in read_jsonl(path):
        if isinstance(row, dict):
            row = next((row[key] for key in ("prompt", "context", "messages") if row.get(key) is not None), None)
        if not isinstance(row, (str, list)):
            raise ValueError(
                f"{path}, line {number}: a prompt is a JSON string or an object with a `prompt` (or "
                "`context`, `messages`) field."
            )
        if isinstance(row, list) and not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in row
        ):
            raise ValueError(
                f'{path}, line {number}: `messages` must be a list of {{"role": ..., "content": ...}} objects with '
                'text values, e.g. [{"role": "user", "content": "Tell me about valdor."}].'
            )
        prompts.append(row)
        lines.append(number)
    if not prompts:
        raise ValueError(f"{path} is empty: it has no prompts.")
    return prompts, lines


def check_chat_prompts(tokenizer, prompts: list, where: list[str]) -> None:
    """Raise a ValueError naming the first chat prompt (`where`: each prompt's place, for the message) when the
    tokenizer has no chat template to turn messages into tokens."""
    chats = [place for prompt, place in zip(prompts, where, strict=True) if isinstance(prompt, list)]
    if chats and tokenizer.chat_template is None:
        raise ValueError(
            f"{chats[0]}: the prompt is chat messages ({len(chats)} of the {len(prompts)} prompts are), but the "
            "tokenizer has no chat template to write them with. Give one with `--chat_template_path FILE.jinja` (or "
            "a tokenizer directory whose template to use), or write the prompts as text."
        )


def set_chat_template(tokenizer, path: str | None) -> None:
    """Give `tokenizer` the chat template of `path`: a `.jinja`/`.j2` file, or a tokenizer directory (its template's
    text only: the model was not trained on tokens it would add)."""
    if path is None:
        return
    if not os.path.exists(path):
        raise FileNotFoundError(missing_path_message(path, "Chat template", "--chat_template_path"))
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as file:
            tokenizer.chat_template = file.read()
        return
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(path).chat_template
    if template is None:
        raise ValueError(f"The tokenizer in {path!r} (from `--chat_template_path`) has no chat template.")
    tokenizer.chat_template = template


# The generation settings' defaults, where no training run's settings replace them.
DEFAULTS = {"max_new_tokens": 256, "batch_size": 8}


def add_model_arguments(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """`--adapter` or `--model_name_or_path`, and the generation settings; `defaults=False` leaves those unset (None),
    for `evaluate` to fill from the training run."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="directory of a trained LoRA adapter (the `output_dir` of `trl-qaloss train`)")
    which.add_argument("--model_name_or_path", help="a full model (hub id or directory) instead of an adapter")
    parser.add_argument(
        "--chat_template_path",
        metavar="FILE.jinja",
        help="chat template for chat-message prompts when the model's tokenizer has none: a .jinja file or a "
        "tokenizer directory (default: the tokenizer's own, saved with the adapter when training used one)",
    )
    run = "" if defaults else ", or the training run's when evaluating its held-out rows"
    settings = {"max_new_tokens": "most tokens generated per prompt", "batch_size": "prompts per generate call"}
    for name, what in settings.items():
        default = DEFAULTS[name] if defaults else None
        parser.add_argument(f"--{name}", type=int, default=default, help=f"{what} (default: {DEFAULTS[name]}{run})")


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    for name in ("max_new_tokens", "batch_size", "eval_generate_samples"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    return args


def run_generate(argv: list[str]) -> None:
    """`trl-qaloss generate`: one JSON line per prompt, `{"prompt", "completion", "qas"}`, to `--output` or stdout."""
    from ..errors import user_errors

    parser = ArgumentParser(
        prog="trl-qaloss generate",
        description="Complete prompts greedily with a trained adapter (or model) and write one JSON line per prompt: "
        "prompt, completion and the parsed qas (question, answers).",
    )
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--prompts",
        metavar="FILE.jsonl",
        help="one prompt per line: a JSON string or an object with a `prompt` (or `context`, or `messages`) field",
    )
    source.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    parser.add_argument("--output", metavar="FILE.jsonl", help="where to write the lines (default: stdout)")
    args = _parse(parser, argv)
    with user_errors():
        if args.prompts:
            prompts, lines = read_prompts(args.prompts)
            where = [f"{args.prompts}, line {line}" for line in lines]
        else:
            prompts, where = args.prompt, [f"`--prompt` {i + 1}" for i in range(len(args.prompt))]
        loaded = load_for_inference(args.adapter, args.model_name_or_path)
        set_chat_template(loaded.tokenizer, args.chat_template_path)
        check_chat_prompts(loaded.tokenizer, prompts, where)
        completions = complete(loaded, prompts, args.max_new_tokens, args.batch_size)
        lines = [
            json.dumps({"prompt": p, "completion": c, "qas": parsed_items(c, loaded.separators)}, ensure_ascii=False)
            for p, c in zip(prompts, completions, strict=True)
        ]
        if args.output:
            with open(args.output, "w", encoding="utf-8") as file:
                file.write("\n".join(lines) + "\n")
            print(f"trl-qaloss: wrote {len(lines)} completions to {os.path.abspath(args.output)}", file=sys.stderr)
        else:
            print("\n".join(lines))


def prompt_and_reference(row: dict, where: str) -> tuple:
    """`(prompt, reference completion text)` of a dataset row in prompt/completion or conversational format; `where`
    names the row in errors."""
    if "prompt" in row and "completion" in row:
        completion = row["completion"]
        if isinstance(completion, list):  # conversational prompt/completion: the assistant turn
            completion = "".join(m["content"] for m in completion if m.get("role") == "assistant")
        return row["prompt"], completion
    if "messages" in row:
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is not None and last > 0:
            return messages[:last], messages[last]["content"]
    raise ValueError(
        f'{where}: evaluation needs a prompt and its reference answer: structured {{"context": ..., "qas": [...]}} '
        'rows, {"prompt": ..., "completion": ...} rows, or {"messages": [...]} whose last assistant turn follows '
        "another turn."
    )


def row_location(dataset_name: str, split: str, index: int) -> str:
    """Where row `index` of `split` is, for errors: its line in a `.jsonl` file (which holds no blank line: loading
    refuses them), else its index in the split."""
    if dataset_name.endswith(".jsonl"):
        return f"{dataset_name}, line {index + 1}"
    return f"Row {index} of {dataset_name} [{split}]"


def format_table(scores: dict[str, float]) -> str:
    width = max(len(key) for key in scores)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 8}"]
    lines += [f"{key:<{width}}  {value:8.4f}" for key, value in scores.items()]
    return "\n".join(lines)


def run_evaluate(argv: list[str]) -> None:
    """`trl-qaloss evaluate`: answer-set metrics of greedy completions on a dataset, printed and written as JSON."""
    from ..errors import user_errors

    parser = ArgumentParser(
        prog="trl-qaloss evaluate",
        description="Answer-set metrics (set-F1, precision, recall, soft-F1, cardinality error, ...) of a trained "
        "adapter's greedy completions against a dataset's reference answers. Without --dataset_name: the held-out "
        "rows the training run evaluated on, with its settings, so the numbers are those it ended with.",
    )
    add_model_arguments(parser, defaults=False)
    parser.add_argument(
        "--dataset_name",
        help="a .jsonl file, a directory of them, or a hub dataset (default: the run's own held-out rows, which "
        "`trl-qaloss train` records with the model)",
    )
    parser.add_argument(
        "--dataset_split", help="split to evaluate (default: 'test' if the dataset has it, else 'train')"
    )
    parser.add_argument(
        "--eval_generate_samples", type=int, help="evaluate only the first N rows (default: all, or the run's number)"
    )
    parser.add_argument(
        "--output",
        metavar="FILE.json",
        help="where to write the metrics (default: eval_results.json in the adapter directory, or the current one)",
    )
    args = _parse(parser, argv)
    with user_errors():
        # The run's record is read first: without one, the command stops before any model loads.
        if args.adapter is not None:
            adapter_base(args.adapter)  # a directory that is not an adapter is named first
        record = {} if args.dataset_name else read_heldout_record(args.adapter or args.model_name_or_path)
        loaded = load_for_inference(args.adapter, args.model_name_or_path)
        set_chat_template(loaded.tokenizer, args.chat_template_path)
        rows = evaluation_rows(args, loaded.separators, record)
        pairs = [prompt_and_reference(row, rows.location(i)) for i, row in enumerate(rows.rows)]
        check_chat_prompts(loaded.tokenizer, [p for p, _ in pairs], [rows.location(i) for i in range(len(pairs))])
        if rows.expected_hash is not None and rows_hash(pairs) != rows.expected_hash:
            print(
                f"trl-qaloss: warning: {rows.description} differ from the rows the training run evaluated on: the "
                "dataset changed since, so the numbers may differ from the run's.",
                file=sys.stderr,
            )
        scores = score(loaded, pairs, args)
        output = args.output or os.path.join(args.adapter or ".", "eval_results.json")
        result = {**rows.summary, "num_rows": len(pairs), "metrics": scores}
        with open(output, "w") as file:
            json.dump(result, file, indent=2)
    print(format_table(scores))
    print(f"Metrics of {len(pairs)} rows of {rows.description} written to {os.path.abspath(output)}")


@dataclass
class EvaluationRows:
    """The rows `evaluate` scores: `rows` (a `datasets.Dataset`), what to call them, where each is for errors
    (`location(index)`), what to record with the metrics, and the hash of the run's rows to compare with (or None)."""

    rows: object
    description: str
    summary: dict
    dataset_name: str
    split: str
    expected_hash: str | None = None

    def location(self, index: int) -> str:
        return row_location(self.dataset_name, self.split, index)


def evaluation_rows(args: argparse.Namespace, separators: tuple[str, str, str], record: dict) -> EvaluationRows:
    """The rows to score: `--dataset_name`'s, or, without it, the held-out rows of the training run's `record`
    (`read_heldout_record`), whose settings then fill the flags not given. Applies `--eval_generate_samples`."""
    from ..data import load_qa_dataset

    expected_hash = record.get("rows_sha256")
    dataset_name, split, config = args.dataset_name, args.dataset_split, None
    if record:
        dataset_name, split, config = record["dataset_name"], record["split"], record.get("dataset_config")
    for name, recorded in (("eval_generate_samples", "num_rows"), ("max_new_tokens", None), ("batch_size", None)):
        if getattr(args, name) is None:
            setattr(args, name, record.get(recorded or name, DEFAULTS.get(name)))
    separators = dict(zip(SEPARATOR_FIELDS, separators, strict=True))
    dataset = load_qa_dataset(resolve_demo_path(dataset_name), config, **separators)
    split = split or ("test" if "test" in dataset else "train")
    if split not in dataset:
        raise ValueError(f"The dataset has no split {split!r} (it has {sorted(dataset)}); set `--dataset_split`.")
    rows = dataset[split]
    if args.eval_generate_samples is not None:
        if args.eval_generate_samples != record.get("num_rows"):
            expected_hash = None  # other rows than the run's
        rows = rows.select(range(min(args.eval_generate_samples, len(rows))))
    args.match_questions = record.get("match_questions", "position")
    if "rows_file" in record:
        description, summary = "the run's held-out rows", {"dataset_name": dataset_name, "split": "held out"}
    else:
        description, summary = f"{dataset_name} [{split}]", {"dataset_name": dataset_name, "split": split}
    return EvaluationRows(rows, description, summary, dataset_name, split, expected_hash)


def score(loaded: LoadedModel, pairs: list[tuple], args: argparse.Namespace) -> dict[str, float]:
    """The answer-set metrics of greedy completions of the `(prompt, reference)` pairs."""
    from ..metrics import answer_set_scores

    completions = complete(loaded, [p for p, _ in pairs], args.max_new_tokens, args.batch_size)
    return answer_set_scores(
        completions, [r for _, r in pairs], *loaded.separators, match_questions=args.match_questions
    )
