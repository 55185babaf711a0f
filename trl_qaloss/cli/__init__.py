"""The `trl-qaloss` command: `train` (`training.py`), `generate` and `evaluate` (`inference.py`), `prepare`
(`prepare.py`), `merge` (`merge.py`).

    trl-qaloss train                                   # the offline CPU demo (the embedded recipes/demo-cpu.yaml)
    trl-qaloss train --config recipes/<name>.yaml [--any_field value ...]
    trl-qaloss generate --adapter DIR --prompt TEXT
    trl-qaloss evaluate --adapter DIR --dataset_name DATA
    trl-qaloss prepare --dataset_name DATA --answer_order canonical --tokenizer MODEL --output prepared.jsonl
    trl-qaloss merge --adapter DIR --output DIR

Each command imports what it needs when it runs, so that `trl-qaloss --help` answers at once.
"""

from __future__ import annotations

import importlib
import logging
import sys

from ..errors import UsageError, did_you_mean, pop_debug_flag, report

USAGE = """usage: trl-qaloss <command> [options]

  train      train QALossSFTTrainer from a recipe; without --config, runs the offline CPU demo (recipes/demo-cpu.yaml)
  generate   complete prompts with a trained adapter (or model) and write the parsed questions and answers
  evaluate   answer-set metrics (set-F1, ...) of a trained adapter (or model) on a dataset
  prepare    write a dataset with each item's answers in a training order (canonical, appearance), for any trainer
  merge      merge a trained adapter into its base and save one model directory to serve (transformers, vLLM, TGI)

`trl-qaloss <command> --help` lists the options of each; `--debug` shows the traceback of an error;
`trl-qaloss --version` names the installed release and those of the libraries underneath."""

COMMANDS = ("train", "generate", "evaluate", "prepare", "merge")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0)
    if argv and argv[0] in ("-V", "--version"):
        print(version_line())
        sys.exit(0)
    if not argv or argv[0] not in COMMANDS:
        what = f"Unknown command {argv[0]!r}.{did_you_mean(argv[0], COMMANDS)}" if argv else "No command given."
        commands = f"{', '.join(COMMANDS[:-1])} and {COMMANDS[-1]}"
        report(UsageError(f"{what} The commands are {commands}; `trl-qaloss --help` says more."))
    command, (args, debug) = argv[0], pop_debug_flag(argv[1:])
    show_messages()
    try:
        if command == "train":
            from .training import run_train

            run_train(args)
        elif command == "prepare":
            from .prepare import run_prepare

            run_prepare(args)
        elif command == "merge":
            from .merge import run_merge

            run_merge(args)
        else:
            from .inference import run_evaluate, run_generate

            (run_generate if command == "generate" else run_evaluate)(args)
    except UsageError as error:
        report(error, debug)


# The releases a bug report needs, after trl-qaloss's own.
STACK = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")


def version_line() -> str:
    """`trl-qaloss 0.1.0 (torch 2.13.0, transformers 5.25.0, ...; Python 3.11.7)`, read without importing them."""
    from importlib import metadata

    installed = []
    for name in STACK:
        try:
            installed.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            installed.append(f"{name} not installed")
    python = ".".join(map(str, sys.version_info[:3]))
    return f"trl-qaloss {metadata.version('trl-qaloss')} ({', '.join(installed)}; Python {python})"


def show_messages() -> None:
    """The package's warnings on stderr as `trl-qaloss: <message>`, so that a user can tell them from the libraries'
    output; in Python, they go wherever the program's logging sends them."""
    package_logger = logging.getLogger("trl_qaloss")
    if not any(getattr(h, "trl_qaloss_cli", False) for h in package_logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("trl-qaloss: %(message)s"))
        handler.trl_qaloss_cli = True
        package_logger.addHandler(handler)  # Python's last-resort handler, which printed them bare, then stays out


def __getattr__(name: str):
    # The train command's functions, importable from `trl_qaloss.cli` as well.
    training = importlib.import_module(f"{__name__}.training")
    try:
        return getattr(training, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
