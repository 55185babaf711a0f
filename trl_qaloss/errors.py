"""User errors of the `trl-qaloss` command: one message on stderr, no traceback, unless `--debug` asks for it.

A mistake in what the user gave (a recipe value, a file, a dataset row) is raised as a `ValueError` or `OSError` while
the command starts up; `user_errors()` turns those into `UsageError`, which `report` prints as one message and an exit
code of 1. Anything else (a `TypeError`, an error inside the training loop) is a programming error and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys
from collections.abc import Iterable, Iterator

import yaml

DEBUG_FLAG = "--debug"
DEBUG_ENV = "TRL_QALOSS_DEBUG"
# What a mistake in the user's input raises while the command starts up: bad values and rows (ValueError), missing
# files and models (OSError), recipes that are not YAML.
INPUT_ERRORS = (ValueError, OSError, yaml.YAMLError)


class UsageError(ValueError):
    """A mistake in the user's input, reported as one message without a traceback."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise the input errors of the enclosed start-up code as `UsageError`, the original chained as its cause."""
    try:
        yield
    except UsageError:
        raise
    except INPUT_ERRORS as error:
        raise UsageError(str(error) or type(error).__name__) from error


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose mistakes (a bad value, a missing option) are `UsageError`s, reported as one line with
    exit code 1 like every other input error, instead of argparse's usage text and exit code 2."""

    def error(self, message: str):
        raise UsageError(f"{message}. `{self.prog} --help` lists the options.")


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to `name` (a typo of it), or None when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`" Did you mean `lambda_set`?"` for the known name closest to `name`, or `""` when none is close."""
    close = closest(name, known)
    return f" Did you mean `{close}`?" if close else ""


def yaml_error_message(path: str, error: yaml.YAMLError) -> str:
    """One line naming the file, the line and column, and what the YAML parser found there."""
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{path} is not valid YAML{where}: {problem}. Recipes are `field: value` lines."


def pop_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """Remove a bare `--debug` (no value after it) from `argv`; `(argv, whether tracebacks are wanted)`.

    `--debug underflow_overflow` is `TrainingArguments.debug` and is left in place.
    """
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")
    kept = []
    for i, arg in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg == DEBUG_FLAG and (following is None or following.startswith("-")):
            debug = True
        else:
            kept.append(arg)
    return kept, debug


def report(error: UsageError, debug: bool = False) -> None:
    """Print `error` for the user and exit with status 1; with `debug`, raise it with its traceback instead."""
    if debug:
        raise error
    print(f"trl-qaloss: error: {error}", file=sys.stderr)
    sys.exit(1)
