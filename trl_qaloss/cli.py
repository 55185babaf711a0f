"""The `trl-qaloss` command: train `QALossSFTTrainer` from a YAML recipe, written like TRL's `trl/scripts/sft.py`.

    trl-qaloss train                                   # the offline CPU demo (the embedded recipes/demo-cpu.yaml)
    trl-qaloss train --config recipes/<name>.yaml [--any_field value ...]
    accelerate launch --config_file recipes/accelerate/<name>.yaml -m trl_qaloss train --config recipes/<name>.yaml

Every field of `ScriptArguments`, `QALossConfig` (so every `SFTConfig` field), `ModelConfig` and
`DatasetMixtureConfig` works in the YAML and as a flag; flags override the YAML. TRL's `TrlParser` reads the YAML
with `yaml.safe_load` and rejects unknown keys. `trust_remote_code` stays off unless the recipe or a flag sets it.

Paths that start with `trl_qaloss/demo/` name the demo's files inside the installed package, so the demo recipe
runs from any directory after `pip install`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from .config import QALossConfig
from .demo import DEFAULT_RECIPE, resolve_demo_path

USAGE = """usage: trl-qaloss train [--config RECIPE.yaml] [--field value ...]

  train   train QALossSFTTrainer from a recipe; without --config, runs the offline CPU demo (recipes/demo-cpu.yaml)

`trl-qaloss train --help` lists every field."""


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


def make_parser(prog: str = "trl-qaloss train") -> TrlParser:
    return TrlParser((QALossScriptArguments, QALossConfig, ModelConfig, DatasetMixtureConfig), prog=prog)


def parse_args(argv: list[str] | None = None):
    """Parse `train`'s arguments into `(script_args, training_args, model_args, dataset_args)`.

    Without `--config` (and without `--help`) the embedded default recipe is used.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and not {"-h", "--help"} & set(argv):
        argv = ["--config", str(DEFAULT_RECIPE), *argv]
    script_args, training_args, model_args, dataset_args = make_parser().parse_args_and_config(argv)
    model_args.model_name_or_path = resolve_demo_path(model_args.model_name_or_path)
    script_args.dataset_name = resolve_demo_path(script_args.dataset_name)
    return script_args, training_args, model_args, dataset_args


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
    """The train and eval datasets, structured rows converted with the recipe's separators."""
    from trl import get_dataset

    from .data import format_qas_dataset, load_qa_dataset

    separators = dict(
        qa_token=training_args.qa_token,
        answer_token=training_args.answer_token,
        question_end=training_args.question_end,
    )
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
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split not in dataset:
            raise ValueError(
                f"`eval_strategy={training_args.eval_strategy!r}` but the dataset has no split "
                f"{script_args.dataset_test_split!r} (it has {sorted(dataset)}); set `dataset_test_split`."
            )
        eval_dataset = dataset[script_args.dataset_test_split]
    return dataset[script_args.dataset_train_split], eval_dataset


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


def train(script_args, training_args, model_args, dataset_args):
    """Build the trainer from parsed arguments, train, save and optionally push; returns the trainer."""
    from trl import get_peft_config, get_quantization_config

    from .trainer import QALossSFTTrainer

    if not model_args.model_name_or_path:
        raise ValueError("`model_name_or_path` must be set (a hub id or a local directory).")
    quantization_config = get_quantization_config(model_args)
    model = model_args.model_name_or_path
    if script_args.init_from_config:
        model = model_from_config(model_args, training_args, quantization_config)
    kwargs = model_init_kwargs(training_args, model_args)
    if isinstance(model, str) and model != model_args.model_name_or_path:
        kwargs.pop("revision")  # the random weights were written locally
    training_args.model_init_kwargs = kwargs
    train_dataset, eval_dataset = load_datasets(script_args, training_args, dataset_args)

    trainer = QALossSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=quantization_config if isinstance(model, str) else None,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=resume_argument(training_args.resume_from_checkpoint))
    trainer.accelerator.print("Training completed.")

    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the logged losses and metrics, next to the saved weights
    what = "LoRA adapter" if model_args.use_peft else "Model"
    trainer.accelerator.print(f"{what} saved to {os.path.abspath(training_args.output_dir)}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Pushed to the Hub: https://huggingface.co/{trainer.hub_model_id}")
    # Unlike TRL's sft.py, no `trainer.end()`: destroying the process group while the trainer (and its DDP wrapper)
    # still lives left one of 2 CPU (gloo) processes hanging on exit in about 1 run in 4; the interpreter tears it
    # down cleanly at exit instead.
    return trainer


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    if argv[0] != "train":
        print(f"trl-qaloss: unknown command {argv[0]!r}.\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    train(*parse_args(argv[1:]))


if __name__ == "__main__":
    main()
