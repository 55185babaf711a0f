"""The `trl-qaloss` command: `train` (`training.py`), `generate` and `evaluate` (`inference.py`), `merge`
(`merge.py`).

    trl-qaloss train                                   # the offline CPU demo (the embedded recipes/demo-cpu.yaml)
    trl-qaloss train --config recipes/<name>.yaml [--any_field value ...]
    trl-qaloss generate --adapter DIR --prompt TEXT
    trl-qaloss evaluate --adapter DIR --dataset_name DATA
    trl-qaloss merge --adapter DIR --output DIR

Each command imports what it needs when it runs, so that `trl-qaloss --help` answers at once.
"""

from __future__ import annotations

import importlib
import sys
import warnings

from ..errors import UsageError, did_you_mean, pop_debug_flag, report

USAGE = """usage: trl-qaloss <command> [options]

  train      train QALossSFTTrainer from a recipe; without --config, runs the offline CPU demo (recipes/demo-cpu.yaml)
  generate   complete prompts with a trained adapter (or model) and write the parsed questions and answers
  evaluate   answer-set metrics (set-F1, ...) of a trained adapter (or model) on a dataset
  merge      merge a trained adapter into its base and save one model directory to serve (transformers, vLLM, TGI)

`trl-qaloss <command> --help` lists the options of each; `--debug` shows the traceback of an error."""

COMMANDS = ("train", "generate", "evaluate", "merge")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0)
    if not argv or argv[0] not in COMMANDS:
        what = f"Unknown command {argv[0]!r}.{did_you_mean(argv[0], COMMANDS)}" if argv else "No command given."
        commands = f"{', '.join(COMMANDS[:-1])} and {COMMANDS[-1]}"
        report(UsageError(f"{what} The commands are {commands}; `trl-qaloss --help` says more."))
    command, (args, debug) = argv[0], pop_debug_flag(argv[1:])
    # PEFT reads `model.is_gradient_checkpointing`, which transformers now calls deprecated: nothing a user can change.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        if command == "train":
            from .training import run_train

            run_train(args)
        elif command == "merge":
            from .merge import run_merge

            run_merge(args)
        else:
            from .inference import run_evaluate, run_generate

            (run_generate if command == "generate" else run_evaluate)(args)
    except UsageError as error:
        report(error, debug)


def __getattr__(name: str):
    # The train command's functions, importable from `trl_qaloss.cli` as well.
    training = importlib.import_module(f"{__name__}.training")
    try:
        return getattr(training, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
