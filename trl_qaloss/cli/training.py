"""`trl-qaloss train`: train `QALossSFTTrainer` from a YAML recipe, written like TRL's `trl/scripts/sft.py`.

    trl-qaloss train                                   # the offline CPU demo (the embedded recipes/demo-cpu.yaml)
    trl-qaloss train --config recipes/<name>.yaml [--any_field value ...]
    accelerate launch --config_file recipes/accelerate/<name>.yaml -m trl_qaloss train --config recipes/<name>.yaml

Every field of `ScriptArguments`, `QALossConfig` (so every `SFTConfig` field), `ModelConfig` and
`DatasetMixtureConfig` works in the YAML and as a flag; flags override the YAML. TRL's `TrlParser` reads the YAML
with `yaml.safe_load`; an unknown key or flag fails naming the closest field. `trust_remote_code` stays off unless
the recipe or a flag sets it. A mistake in the input is reported as one line on stderr with exit code 1
(`trl_qaloss/errors.py`); `--debug` shows the traceback.

Paths that start with `trl_qaloss/demo/` name the demo's files inside the installed package, so the demo recipe
runs from any directory after `pip install`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
import typing
from dataclasses import dataclass, field

import yaml

# TRL's argument classes and parser import neither torch nor transformers' models: `trl-qaloss --help` stays fast.
# Everything heavy (the config, which imports torch, the trainer, the models) is imported by the command that runs.
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from ..demo import DEFAULT_RECIPE, DEMO_DIR, MODEL_DIR, portable_demo_path, resolve_demo_path
from ..errors import UsageError, did_you_mean, user_errors, yaml_error_message
from ..model_source import check_model_source
from .heldout import HeldOut, write_heldout_record

if typing.TYPE_CHECKING:
    from ..config import QALossConfig

logger = logging.getLogger("trl_qaloss")
# Share of the rows held out for evaluation when the dataset has no eval split and `test_split_size` is not set.
DEFAULT_TEST_SPLIT_SIZE = 0.1

TRAIN_USAGE = "trl-qaloss train [--config RECIPE.yaml] [--debug] [--FIELD VALUE ...]"
TRAIN_DESCRIPTION = (
    "Train QALossSFTTrainer from a YAML recipe. Every field below works in the recipe (`field: value`) and as a "
    "flag (`--field value`); flags override the recipe."
)
PLUGIN_GROUP = "trl-qaloss options (the set loss, its evaluation, and this command)"
# Where the other fields are listed in `--help`, after the plugin's own.
GROUP_TITLES = {
    "QALossScriptArguments": "dataset options (TRL ScriptArguments)",
    "QALossConfig": "training options (TRL SFTConfig and transformers TrainingArguments)",
    "ModelConfig": "model, quantization and LoRA options (TRL ModelConfig)",
    "DatasetMixtureConfig": "dataset mixture options (TRL DatasetMixtureConfig)",
}


@dataclass
class QALossScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments`, plus what only `trl-qaloss` needs.

    `dataset_name` may also be a local `.json`/`.jsonl` file (the `train` split) or a directory of them; structured
    rows (`{"context", "qas"}`) are converted by `trl_qaloss.data.format_qas`.
    """

    init_from_config: bool = field(
        default=False,
        metadata={
            "help": "Build the model with RANDOM weights from the config.json in `model_name_or_path` instead of "
            "loading weights: for smoke tests and memory/speed checks at a model's real size, never for real training."
        },
    )


def own_fields(cls) -> set[str]:
    """The fields `cls` adds to the TRL/transformers dataclass it extends."""
    base = cls.__mro__[1]
    return {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(base)}


class QALossParser(TrlParser):
    """`TrlParser` whose `--help` lists `--config`, `--debug` and the plugin's own fields first, in their own group,
    then the TRL and transformers fields grouped by where they come from; unknown fields suggest the closest one."""

    recipe: str | None = None  # the `--config` file, named in errors

    def _add_dataclass_arguments(self, dtype):
        if not hasattr(self, "_plugin_group"):
            self._plugin_group = self.add_argument_group(PLUGIN_GROUP)
            # `--config` is read by `TrlParser` before argparse sees the flags, `--debug` by `trl-qaloss` itself;
            # SUPPRESS keeps them out of the parsed namespace.
            self._plugin_group.add_argument(
                "--config",
                metavar="RECIPE.yaml",
                default=argparse.SUPPRESS,
                help="YAML recipe whose `field: value` lines set any field below; flags override it. Default: the "
                "offline CPU demo (recipes/demo-cpu.yaml).",
            )
            self._plugin_group.add_argument(
                "--debug ",
                dest="show_traceback",
                action="store_true",
                default=argparse.SUPPRESS,
                help="Show the full traceback of an error (also TRL_QALOSS_DEBUG=1). `--debug VALUE` is "
                "TrainingArguments' own `debug` field.",
            )
        plugin = own_fields(dtype) if dtype.__name__ in ("QALossScriptArguments", "QALossConfig") else set()
        group = self.add_argument_group(GROUP_TITLES.get(dtype.__name__, dtype.__name__))
        type_hints = typing.get_type_hints(dtype)
        for item in dataclasses.fields(dtype):
            if item.init:
                item.type = type_hints[item.name]
                self._parse_dataclass_field(self._plugin_group if item.name in plugin else group, item)

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        """TRL's, but an unknown recipe key fails here, before any field is validated."""
        self.check_unknown(super().set_defaults_with_config(**kwargs), [], self.recipe)
        return []

    def parse_args_into_dataclasses(self, args=None, return_remaining_strings=False, **kwargs):
        """HfArgumentParser's, but an unknown flag fails first, naming the closest field."""
        self.check_unknown([], self.parse_known_args(args)[1], self.recipe)
        return super().parse_args_into_dataclasses(args, return_remaining_strings, **kwargs)

    def error(self, message: str):
        """argparse's errors (a value of the wrong type, a choice that does not exist) as one line, exit code 1."""
        raise UsageError(f"{message}. `trl-qaloss train --help` lists every field.")

    def known_fields(self) -> list[str]:
        return [action.dest for action in self._actions if action.dest not in ("help", "show_traceback")]

    def check_unknown(self, from_recipe: list[str], from_flags: list[str], recipe: str | None) -> None:
        """Raise a ValueError naming the first unknown recipe key or flag and the closest known field."""
        known = self.known_fields()
        for strings, where in ((from_recipe, f"in {recipe}"), (from_flags, "on the command line")):
            names = [s.lstrip("-") for s in strings if s.startswith("--")] or list(strings)
            if names:
                name = names[0].split("=")[0].replace("-", "_")
                from ..compat import installed_versions

                raise ValueError(
                    f"Unknown field `{name}` {where}.{did_you_mean(name, known)} `trl-qaloss train --help` lists "
                    f"every field the installed releases know ({installed_versions(('transformers', 'trl', 'peft'))})."
                )


def make_parser(prog: str = "trl-qaloss train") -> TrlParser:
    from ..config import QALossConfig

    return QALossParser(
        (QALossScriptArguments, QALossConfig, ModelConfig, DatasetMixtureConfig),
        prog=prog,
        usage=TRAIN_USAGE,
        description=TRAIN_DESCRIPTION,
    )


def recipe_path(argv: list[str]) -> str | None:
    """The recipe named by `--config` in `argv`, checked to be a readable file."""
    if "--config" not in argv:
        return None
    index = argv.index("--config")
    if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
        raise ValueError("`--config` needs a recipe file: `--config recipes/demo-cpu.yaml`.")
    path = argv[index + 1]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Recipe file not found: {path!r} (from `--config`).")
    return path


def parse_args(argv: list[str] | None = None):
    """Parse `train`'s arguments into `(script_args, training_args, model_args, dataset_args)`.

    Without `--config` (and without `--help`) the embedded default recipe is used. Raises a ValueError naming an
    unknown recipe key or flag and the closest field, and one naming the file and line of a recipe that is not YAML.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and not {"-h", "--help"} & set(argv):
        argv = ["--config", str(DEFAULT_RECIPE), *argv]
    parser = make_parser()
    parser.recipe = recipe_path(argv)
    try:
        parsed = parser.parse_args_and_config(argv)
    except yaml.YAMLError as error:
        raise ValueError(yaml_error_message(parser.recipe, error)) from error
    script_args, training_args, model_args, dataset_args = parsed
    model_args.model_name_or_path = resolve_demo_path(model_args.model_name_or_path)
    script_args.dataset_name = resolve_demo_path(script_args.dataset_name)
    flags = {arg.split("=")[0].lstrip("-").replace("-", "_") for arg in argv if arg.startswith("--")}
    if "dataset_name" in flags and "output_dir" not in flags:
        own_output_dir(parser.recipe, script_args, training_args)
    if model_args.model_name_or_path == str(MODEL_DIR) and not is_demo_dataset(script_args, dataset_args):
        logger.warning(
            "The model is the demo's tiny Llama, which knows only the demo's fictional world: trained on other data it "
            "writes nonsense. It is there to try the pipeline; for your data use "
            "recipes/qwen2.5-0.5b-instruct-lora.yaml (one CPU or a small GPU) or a 7B/72B recipe (GPUs)."
        )
    return script_args, training_args, model_args, dataset_args


def own_output_dir(recipe: str | None, script_args, training_args) -> None:
    """When `--dataset_name` replaces the recipe's dataset and no `--output_dir` is given, save to
    `<the recipe's output_dir>-<dataset name>` rather than over the model trained on the recipe's data; logged."""
    with open(recipe or DEFAULT_RECIPE) as file:
        recipe_dataset = resolve_demo_path((yaml.safe_load(file) or {}).get("dataset_name"))
    if script_args.dataset_name == recipe_dataset:
        return
    name = os.path.basename(os.path.normpath(script_args.dataset_name))
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in os.path.splitext(name)[0]) or "data"
    training_args.output_dir = f"{os.path.normpath(training_args.output_dir)}-{name}"
    logger.warning(
        "Training on %s instead of the recipe's dataset: saving to %s (`--output_dir` sets another directory).",
        script_args.dataset_name,
        training_args.output_dir,
    )


def is_demo_dataset(script_args, dataset_args) -> bool:
    """Whether the data is the demo's own (a path inside the installed demo)."""
    names = [script_args.dataset_name] if script_args.dataset_name else []
    names += [d.path for d in dataset_args.datasets or []]
    return bool(names) and all(os.path.abspath(n).startswith(str(DEMO_DIR)) for n in names if n)


def model_init_kwargs(training_args: QALossConfig, model_args: ModelConfig) -> dict:
    """The keyword arguments the model is loaded with, as in TRL's `sft.py`; the recipe's `model_init_kwargs` win."""
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


def load_datasets(script_args: QALossScriptArguments, training_args: QALossConfig, dataset_args: DatasetMixtureConfig):
    """`(train dataset, eval dataset or None, HeldOut)`: structured rows converted with the recipe's separators; the
    `HeldOut` says where the eval rows come from (a named split, or split off the training rows by this run)."""
    from trl import get_dataset

    from ..data import format_qas_dataset, load_qa_dataset
    from ..engine.options import SEPARATOR_FIELDS

    separators = {name: getattr(training_args, name) for name in SEPARATOR_FIELDS}
    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
        for split in list(dataset):
            dataset[split] = format_qas_dataset(dataset[split], source=f"dataset mixture [{split}]", **separators)
    elif script_args.dataset_name:
        dataset = load_qa_dataset(
            script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming, **separators
        )
    else:
        raise ValueError(
            "Either `datasets` or `dataset_name` must be set (a hub dataset, a directory or a .jsonl file)."
        )
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"The dataset has no split {script_args.dataset_train_split!r} (it has {sorted(dataset)}); "
            "set `dataset_train_split`."
        )
    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    named_split = test_split in dataset and not dataset_args.datasets
    if test_split in dataset or training_args.eval_strategy == "no":
        if dataset_args.test_split_size is not None and not dataset_args.datasets:
            why = f"the dataset has a {test_split!r} split" if test_split in dataset else "evaluation is off"
            logger.warning("`test_split_size` is ignored: %s.", why)
    else:
        dataset = split_off_eval(dataset, train_split, test_split, dataset_args.test_split_size, training_args)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = dataset[test_split]
    source = None
    if named_split:
        name = script_args.dataset_name
        name = portable_demo_path(os.path.abspath(name)) if os.path.exists(name) else name  # a hub id as it is
        source = {"dataset_name": name, "dataset_config": script_args.dataset_config, "split": test_split}
    return dataset[train_split], eval_dataset, HeldOut(source, eval_dataset)


def split_off_eval(dataset, train_split: str, test_split: str, size: float | int | None, training_args):
    """`dataset` with `test_split` split off its `train_split` (`test_split_size` of it, by default
    `DEFAULT_TEST_SPLIT_SIZE`), drawn with the run's `seed` and logged; when no split can be made (a streamed or
    one-row dataset), `dataset` as it is, with evaluation turned off and one warning saying why."""
    from datasets import Dataset
    from transformers.trainer_utils import IntervalStrategy

    train = dataset[train_split]
    if not isinstance(train, Dataset) or len(train) < 2:
        why = "it is streamed" if not isinstance(train, Dataset) else f"it has {len(train)} row"
        logger.warning(
            "The dataset has no %r split to evaluate on, and none can be split off its %r split (%s): evaluation "
            "is off. Give a dataset with a %r split, or set `eval_strategy: no`.",
            test_split,
            train_split,
            why,
            test_split,
        )
        training_args.eval_strategy = IntervalStrategy.NO
        training_args.do_eval = False
        training_args.eval_generate_samples = 0
        return dataset
    size = DEFAULT_TEST_SPLIT_SIZE if size is None else size
    try:
        parts = train.train_test_split(test_size=size, seed=training_args.seed)
    except ValueError as error:
        raise ValueError(f"`test_split_size={size!r}` cannot split {len(train)} rows: {error}") from error
    logger.warning(
        "The dataset has no %r split: evaluating on %d of its %d %r rows (test_split_size=%s, seed=%d), training on "
        "the other %d.",
        test_split,
        len(parts["test"]),
        len(train),
        train_split,
        size,
        training_args.seed,
        len(parts["train"]),
    )
    dataset = dict(dataset)
    dataset[train_split], dataset[test_split] = parts["train"], parts["test"]
    return dataset


def model_from_config(model_args: ModelConfig, training_args: QALossConfig, quantization_config):
    """A randomly initialized model built from `model_name_or_path`'s config (`init_from_config`).

    Without quantization the model itself is returned. With it, the random weights are written once to
    `<output_dir>/init-from-config` and that path is returned, so that transformers quantizes them on loading exactly
    as it does real weights.
    """
    import torch
    from accelerate import PartialState
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = model_init_kwargs(training_args, model_args)
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path, revision=kwargs["revision"], trust_remote_code=kwargs["trust_remote_code"]
    )
    dtype = kwargs["dtype"]
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else None
    torch.manual_seed(training_args.seed)
    if quantization_config is None:
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=kwargs["trust_remote_code"])
    path = os.path.join(training_args.output_dir, "init-from-config")
    with PartialState().main_process_first():
        if PartialState().is_main_process and not os.path.exists(os.path.join(path, "config.json")):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=kwargs["trust_remote_code"])
            model.save_pretrained(path)
            del model
            tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=kwargs["revision"])
            tokenizer.save_pretrained(path)
    return path


def resume_argument(value: str | bool | None) -> str | bool | None:
    """`resume_from_checkpoint` as `Trainer.train` takes it: `True` for the last complete checkpoint, or a path.

    `TrainingArguments` declares the field a string, so `resume_from_checkpoint: true` in a recipe (or the flag
    `--resume_from_checkpoint true`) arrives as the text "true", which `train` would read as a directory name.
    """
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1"):
        return True
    if value is False or (isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "")):
        return None
    return value


def check_report_to(training_args: QALossConfig) -> None:
    """Raise a ValueError naming the extra to install when `report_to` asks for TensorBoard and it is missing."""
    import importlib.util

    report_to = training_args.report_to or []
    report_to = [report_to] if isinstance(report_to, str) else report_to
    if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is None:
        raise ValueError(
            "`report_to` includes 'tensorboard', which is not installed. Install it with "
            '`pip install "trl-qaloss[tracking]"`, or remove it from `report_to`.'
        )


def build_trainer(script_args, training_args, model_args, dataset_args):
    """`(QALossSFTTrainer, HeldOut)` of parsed arguments: the trainer with the model, the datasets and the checks of
    both, not yet trained, and where its eval rows come from."""
    from trl import get_peft_config, get_quantization_config

    from ..trainer import QALossSFTTrainer

    check_model_source(model_args.model_name_or_path, model_args.model_revision)
    check_report_to(training_args)
    quantization_config = get_quantization_config(model_args)
    model = model_args.model_name_or_path
    if script_args.init_from_config:
        model = model_from_config(model_args, training_args, quantization_config)
    kwargs = model_init_kwargs(training_args, model_args)
    if isinstance(model, str) and model != model_args.model_name_or_path:
        kwargs.pop("revision")  # the random weights were written locally
    training_args.model_init_kwargs = kwargs
    train_dataset, eval_dataset, heldout = load_datasets(script_args, training_args, dataset_args)

    trainer = QALossSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=quantization_config if isinstance(model, str) else None,
        peft_config=get_peft_config(model_args),
    )
    return trainer, heldout


def train(script_args, training_args, model_args, dataset_args):
    """Build the trainer from parsed arguments, train, save and optionally push; returns the trainer.

    Mistakes in the input found while building the trainer raise `UsageError`; errors while training keep theirs.
    """
    from ..callbacks import StepCounter
    from ..checkpoints import resolve_resume_checkpoint
    from .inference import write_base_model_info

    with user_errors():
        trainer, heldout = build_trainer(script_args, training_args, model_args, dataset_args)
        # A checkpoint to resume from that is not there is a mistake in the input: found here, not inside `train`.
        resume = resolve_resume_checkpoint(
            resume_argument(training_args.resume_from_checkpoint), training_args.output_dir
        )
    steps = StepCounter()
    trainer.add_callback(steps)
    trainer.train(resume_from_checkpoint=resume)
    if steps.count == 0:
        raise UsageError(no_steps_message(trainer, resume))
    trainer.accelerator.print("Training completed.")
    if trainer.eval_dataset is not None and training_args.eval_strategy != "no" and not evaluated_last(trainer):
        trainer.evaluate()  # the run ends evaluated, whatever `max_steps` and `eval_steps` are

    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the logged losses and metrics, next to the saved weights
    if trainer.accelerator.is_main_process:
        write_base_model_info(training_args.output_dir, model_args, training_args)
        recorded = record_heldout(trainer, heldout)
        print(run_summary(trainer, training_args, model_args, recorded))
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Pushed to the Hub: https://huggingface.co/{trainer.hub_model_id}")
    return trainer


def no_steps_message(trainer, resume) -> str:
    """Why a run took no training step, and that it saved nothing."""
    args = trainer.args
    rows = len(trainer.train_dataset) if hasattr(trainer.train_dataset, "__len__") else "a stream of"
    why = f"max_steps={args.max_steps}, num_train_epochs={args.num_train_epochs}, {rows} training rows"
    if resume:
        why += f", resumed at step {trainer.state.global_step}: raise `max_steps` to train further"
    return f"The run trained 0 steps ({why}), so nothing was saved."


def record_heldout(trainer, heldout: HeldOut) -> bool:
    """Record in `output_dir` the rows and settings of the run's answer-set evaluation, for `trl-qaloss evaluate
    --adapter DIR`; whether it did (not when nothing was evaluated, or the rows are not ones `evaluate` reads)."""
    from ..callbacks import QASetEvalCallback
    from .inference import prompt_and_reference

    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, QASetEvalCallback)), None)
    if heldout.rows is None or not hasattr(heldout.rows, "__len__"):
        return False
    num_rows = min(callback.num_samples, len(heldout.rows)) if callback is not None else len(heldout.rows)
    try:
        pairs = [prompt_and_reference(row, f"Row {i}") for i, row in enumerate(heldout.rows.select(range(num_rows)))]
    except ValueError as error:
        logger.warning("`trl-qaloss evaluate` cannot read the eval rows (%s): give it a dataset of its own.", error)
        return False
    settings = {"num_rows": num_rows}
    if callback is not None:
        settings.update(
            max_new_tokens=callback.max_new_tokens,
            batch_size=callback.batch_size,
            match_questions=callback.match_questions,
        )
    write_heldout_record(trainer.args.output_dir, heldout, settings, pairs)
    return True


def evaluated_last(trainer) -> bool:
    """Whether the trainer evaluated at its last step."""
    step = trainer.state.global_step
    return any("eval_loss" in log and log.get("step") == step for log in trainer.state.log_history)


# The held-out metrics shown after training, with what each means.
SUMMARY_METRICS = {
    "exact_set_match": "share of questions answered with exactly the reference set",
    "set_f1": "F1 of the answers, per question",
    "set_precision": "generated answers that are right",
    "set_recall": "reference answers generated",
    "duplicate_rate": "generated answers repeated within a question",
    "cardinality_error": "mean |generated - reference| answers per question",
}
SUMMARY_EXAMPLES = 3


def run_summary(trainer, training_args, model_args, heldout_recorded: bool) -> str:
    """What `train` prints at the end: the last answer-set evaluation (a table and a few held-out examples, generated
    and reference answer sets side by side), where the model is, and the `generate` and `evaluate` commands to run
    next with the evaluation's own settings (and, for an adapter, the `merge` command)."""
    from ..callbacks import QASetEvalCallback

    output_dir = training_args.output_dir
    what = "LoRA adapter" if model_args.use_peft else "Model"
    option = "--adapter" if model_args.use_peft else "--model_name_or_path"
    option = f"{option} {shlex.quote(output_dir)}"
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, QASetEvalCallback)), None)
    examples = callback.last_examples if callback is not None else []
    metrics = next((log for log in reversed(trainer.state.log_history) if "eval_exact_set_match" in log), None)
    lines = []
    if examples and metrics is not None:
        pairing = f"questions paired by {callback.match_questions}"
        lines.append(f"Answer sets of {len(examples)} held-out rows (greedy completions, {pairing}):")
        for name, meaning in SUMMARY_METRICS.items():
            lines.append(f"  {name:<18} {metrics['eval_' + name]:6.3f}  {meaning}")
        for prompt, prediction, reference, cut in examples[:SUMMARY_EXAMPLES]:
            lines += ["", *side_by_side(prompt.strip(), prediction, reference, callback.separators, cut)]
        lines.append("")
    lines.append(f"{what} saved to {os.path.abspath(output_dir)}")
    prompt = examples[0][0].strip() if examples else "Tell me about valdor: its rivers."
    max_new_tokens = f" --max_new_tokens {callback.max_new_tokens}" if callback is not None else ""
    lines += ["Next:", f"  trl-qaloss generate {option} --prompt {shlex.quote(prompt)}{max_new_tokens}"]
    if heldout_recorded:
        lines.append(f"  trl-qaloss evaluate {option}")
    if model_args.use_peft:  # one model directory to serve
        lines.append(f"  trl-qaloss merge {option} --output {shlex.quote(output_dir.rstrip('/') + '-merged')}")
    return "\n".join(lines)


def side_by_side(
    prompt: str, prediction: str, reference: str, separators: tuple[str, str, str], cut: bool = False
) -> list[str]:
    """Lines showing one example: the prompt, then per question (by position) its generated and reference answers;
    `cut`: truncation to `max_length` cut the reference, whose last answers are then marked as cut."""
    from ..engine.parsing import parse_qa_text

    predicted, expected = parse_qa_text(prediction, *separators), parse_qa_text(reference, *separators)
    rows = [("question", "generated", "reference")]
    for k in range(max(len(predicted), len(expected))):
        got = predicted[k] if k < len(predicted) else None
        want = expected[k] if k < len(expected) else None
        question = (want or got).question
        if got is not None and want is not None and got.question != want.question:
            question += f" (generated: {got.question})"
        rows.append((question, ", ".join(got.answers) if got else "-", ", ".join(want.answers) if want else "-"))
    if cut and len(rows) > 1:
        question, generated, expected = rows[-1]
        rows[-1] = (question, generated, f"{expected} ... (cut by max_length)")
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return [f"  {prompt}", *(f"    {a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows)]


def end_processes() -> None:
    """After a run that finished on every process: wait for all of them, then destroy the process group.

    Left to the interpreter's teardown, the group can abort a process at exit (`terminate called without an active
    exception`): a gloo worker thread that drops its last finished collective releases tensors, which needs the
    GIL, and a thread that asks for the GIL while the interpreter finalizes is made to exit in the middle of that
    C++ destructor (CPython 3.14 blocks that thread forever instead: a hang at exit). A launch that trained and
    saved correctly would then exit non-zero, or never exit. Destroying the group joins those threads first. The
    barrier makes every process reach it together, as torch.distributed's docs ask. Runs only after success: a
    failed process must not wait here for the others.
    """
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # the trainer's DDP or DeepSpeed wrapper, which holds the group, goes first
    dist.barrier()
    dist.destroy_process_group()


def flag_value(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in `argv` (the last one wins, as in argparse), else None."""
    value = None
    for i, arg in enumerate(argv):
        flag, _, inline = arg.partition("=")
        if flag.lstrip("-").replace("-", "_") == name and flag.startswith("--"):
            value = inline if inline else (argv[i + 1] if i + 1 < len(argv) else None)
    return value


def check_model_early(argv: list[str]) -> None:
    """`check_model_source` on the model the flags or the recipe name, before the slow imports of the full parse, so
    that a model that cannot be had stops the command within seconds."""
    recipe = recipe_path(argv) or str(DEFAULT_RECIPE)
    try:
        with open(recipe) as file:
            values = yaml.safe_load(file)
    except yaml.YAMLError:
        return  # the full parse reports where
    values = values if isinstance(values, dict) else {}
    name = flag_value(argv, "model_name_or_path") or values.get("model_name_or_path")
    if name:  # unset: the full parse names the missing field
        revision = flag_value(argv, "model_revision") or values.get("model_revision")
        check_model_source(resolve_demo_path(str(name)), revision)


def run_train(argv: list[str]) -> None:
    with user_errors():
        if not {"-h", "--help"} & set(argv):
            check_model_early(argv)
        parsed = parse_args(argv)
    train(*parsed)  # the trainer is dropped here, before the process group goes
    end_processes()
