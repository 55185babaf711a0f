"""What a user sees when the input is wrong: the real command, one message on stderr, exit code 1, no traceback.

Each case runs `python -m trl_qaloss train ...` in a subprocess from a scratch directory, as a user would.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.testing_utils import CHAT_TEMPLATE, DEMO_RECIPE, ROOT, SHORT_RUN, error_lines, run_cli, slow
from trl_qaloss.errors import UsageError, user_errors

DEMO_ROWS = Path(ROOT, "trl_qaloss", "demo", "data", "train.jsonl").read_text().splitlines()
RECIPE = Path(DEMO_RECIPE).read_text()
NO_SUCH_MODEL = "trl-qaloss-tests/no-such-model"  # a Hub id no cache holds


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return path.name


def conversational_rows(path: Path) -> str:
    row = {
        "messages": [
            {"role": "user", "content": "Tell me about valdor."},
            {"role": "assistant", "content": "<QA> who rules valdor? <A> bozuman"},
        ]
    }
    return write(path, "\n".join(json.dumps(row) for _ in range(8)) + "\n")


# (what the user gives, how to write it in the scratch directory, the message expected)
CASES = {
    "invalid value": (lambda d: ["--lambda_set", "-1"], r"`lambda_set` must be a finite non-negative number, got -1"),
    "bad YAML": (
        lambda d: ["--config", write(d / "bad.yaml", "lambda_set: [1\n")],
        r"bad\.yaml is not valid YAML \(line 2, column 1\)",
    ),
    "unknown recipe key": (
        lambda d: ["--config", write(d / "typo.yaml", RECIPE + "lamda_set: 0.5\n")],
        r"Unknown field `lamda_set` in typo\.yaml\. Did you mean `lambda_set`\?",
    ),
    "unknown flag": (
        lambda d: ["--lamda_set", "0.5"],
        r"Unknown field `lamda_set` on the command line\. Did you mean `lambda_set`\?",
    ),
    "missing recipe": (lambda d: ["--config", "nope.yaml"], r"Recipe file not found: 'nope\.yaml'"),
    "--config without a file": (lambda d: ["--config"], r"`--config` needs a recipe file: `--config recipes/"),
    "missing dataset": (lambda d: ["--dataset_name", "nope.jsonl"], r"Dataset file not found: 'nope\.jsonl'"),
    "missing model": (lambda d: ["--model_name_or_path", "./nope"], r"Model directory not found: '\./nope'"),
    "missing model in the home directory": (
        lambda d: ["--model_name_or_path", "~/no-such-qaloss-model"],
        r"Model directory not found: '~/no-such-qaloss-model'",
    ),
    "empty JSONL": (
        lambda d: ["--dataset_name", write(d / "empty.jsonl", "")],
        r"empty\.jsonl is empty: it has no rows",
    ),
    "broken JSONL": (
        lambda d: ["--dataset_name", write(d / "broken.jsonl", DEMO_ROWS[0] + "\n{oops\n")],
        r"broken\.jsonl, line 2: not valid JSON",
    ),
    "bad row": (
        lambda d: [
            "--dataset_name",
            write(d / "row.jsonl", '{"context": "c", "qas": [{"question": "who?", "answers": "ann"}]}\n'),
        ],
        # the file's own line number, and the fix written in the file's syntax (JSON)
        r'row\.jsonl, line 1: field `qas\[0\]\.answers` must be a list of strings \(write \["ann"\] for one answer\)',
    ),
    "bad row on line 3": (
        lambda d: ["--dataset_name", write(d / "row3.jsonl", "\n".join([*DEMO_ROWS[:2], '{"context": "c"}']) + "\n")],
        r"row3\.jsonl, line 3: field `qas` is missing",
    ),
    "blank line": (
        lambda d: ["--dataset_name", write(d / "blank.jsonl", f"{DEMO_ROWS[0]}\n\n{DEMO_ROWS[1]}\n")],
        r"blank\.jsonl, line 2: a blank line",
    ),
    "value of the wrong type": (
        lambda d: ["--lambda_set", "abc"],
        r"argument --lambda_set/--lambda-set: invalid float value: 'abc'\. `trl-qaloss train --help` lists every field",
    ),
    "choice that does not exist": (
        lambda d: ["--answer_order", "bogus"],
        r"argument --answer_order/--answer-order: invalid choice: 'bogus'",
    ),
    "chat rows without a chat template": (
        lambda d: ["--dataset_name", conversational_rows(d / "chat.jsonl"), "--eval_strategy", "no"],
        r"`train_dataset` holds chat messages, but the tokenizer of .* has no chat template.*`chat_template_path`",
    ),
    "max_length cuts every answer": (
        # The demo's prompts take at most 12 tokens and no first answer starts before token 18: 14 keeps every prompt
        # and a little of each completion, but no answer.
        lambda d: ["--max_length", "14", "--eval_strategy", "no"],
        r"No target answer of `train_dataset` is left after truncation to `max_length`\. `max_length=14` truncates "
        r"400 of 400 rows",
    ),
}


@pytest.fixture(scope="module")
def case_results(tmp_path_factory):
    """Every case of `CASES` run at once (each in its own scratch directory): `{case: CompletedProcess}`."""

    # The directories and their inputs are made here, one after the other: `mktemp` is not safe to call from several
    # threads (a case once found its directory missing); only the commands run in parallel.
    directories = {case: tmp_path_factory.mktemp("case") for case in CASES}
    arguments = {case: CASES[case][0](directories[case]) for case in CASES}

    def run(case):
        return run_cli("train", "--output_dir", "out", *SHORT_RUN, *arguments[case], cwd=directories[case])

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(CASES, pool.map(run, CASES), strict=True))


@pytest.mark.parametrize("case", list(CASES))
@slow
def test_bad_input_is_one_message_without_traceback(case_results, case):
    result, message = case_results[case], CASES[case][1]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr[-3000:]


@slow
def test_debug_shows_the_traceback(tmp_path):
    for flag, env in ((["--debug"], {}), ([], {"TRL_QALOSS_DEBUG": "1"})):
        result = run_cli("train", *flag, "--lamda_set", "1", cwd=tmp_path, env=env)
        assert result.returncode == 1
        assert "Traceback" in result.stderr and "UsageError: Unknown field `lamda_set`" in result.stderr


# Mistakes on the command lines of every command, each one line and exit code 1: (arguments, the message expected)
COMMAND_LINE_CASES = {
    "no command": ([], r"No command given\. The commands are train, generate, evaluate, prepare and merge"),
    "unknown command": (["trian"], r"Unknown command 'trian'\. Did you mean `train`\?"),
    "generate without prompts": (
        ["generate", "--adapter", "out"],
        r"one of the arguments --prompts --prompt is required\. `trl-qaloss generate --help` lists the options",
    ),
    "generate, bad number": (
        ["generate", "--adapter", "out", "--prompt", "x", "--max_new_tokens", "many"],
        r"argument --max_new_tokens: invalid int value: 'many'",
    ),
    # A model directory that does not exist: the flag is refused before any model would load.
    "generate, zero batch size": (
        ["generate", "--adapter", "no-such-adapter", "--prompt", "x", "--batch_size", "0"],
        r"--batch_size must be at least 1, got 0",
    ),
    "generate, zero new tokens": (
        ["generate", "--adapter", "no-such-adapter", "--prompt", "x", "--max_new_tokens", "0"],
        r"--max_new_tokens must be at least 1, got 0",
    ),
    "train, bad choice": (
        ["train", "--max_steps", "1", "--answer_order", "bogus"],
        r"argument --answer_order/--answer-order: invalid choice: 'bogus' \(choose from 'data', 'canonical'",
    ),
    # A Hub id that is neither a local directory nor in the cache: one line at once, not half a minute of retries.
    "train, a model neither local nor cached": (
        ["train", "--model_name_or_path", NO_SUCH_MODEL],
        rf"Model '{NO_SUCH_MODEL}' is not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 "
        rf"keeps the Hub out of reach\. Give a local copy with `--model_name_or_path /path/to/local/copy` \(.*"
        rf"`hf download {NO_SUCH_MODEL} --local-dir /path/to/local/copy`",
    ),
    "generate, a model neither local nor cached": (
        ["generate", "--model_name_or_path", NO_SUCH_MODEL, "--prompt", "x"],
        rf"Model '{NO_SUCH_MODEL}' is not a local directory and not in the Hugging Face cache",
    ),
    "train, negative max_steps": (
        ["train", "--max_steps", "-5"],
        r"`max_steps` must be a positive number of steps, or -1 to train `num_train_epochs` epochs; got -5\.",
    ),
    "evaluate, missing adapter": (
        ["evaluate", "--adapter", "out", "--dataset_name", "d"],
        r"Adapter directory not found: 'out' \(from `--adapter`\)\.",
    ),
    "evaluate, no dataset and no record of held-out rows": (
        ["evaluate", "--model_name_or_path", "."],
        r"\. holds no record of held-out rows \(trl_qaloss_heldout\.json\).*rows to score with `--dataset_name`",
    ),
    "evaluate, zero rows": (
        ["evaluate", "--adapter", "out", "--dataset_name", "d", "--eval_generate_samples", "0"],
        r"--eval_generate_samples must be at least 1, got 0",
    ),
}


@pytest.mark.parametrize("case", list(COMMAND_LINE_CASES))
def test_command_line_mistakes_are_one_line_with_exit_code_1(tmp_path, case):
    argv, message = COMMAND_LINE_CASES[case]
    # Offline, as on a cluster node: the libraries underneath log more there (bitsandbytes asks `kernels` for a CPU
    # kernel on the Hub), and none of it may reach the user.
    result = run_cli(*argv, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr[-3000:]
    assert result.stderr.splitlines() == lines and not result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("command", ["train", "generate", "evaluate"])
def test_a_model_the_hub_cannot_give_stops_at_once(tmp_path, command):
    """The Hub made unreachable (a closed port, not offline mode): one line naming the model and the way out, and no
    retries first."""
    argv = [command, "--model_name_or_path", NO_SUCH_MODEL]
    argv += {"generate": ["--prompt", "x"], "evaluate": ["--dataset_name", "d"]}.get(command, [])
    result = run_cli(*argv, cwd=tmp_path, env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 1
    assert error_lines(result.stderr) == result.stderr.splitlines(), result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert re.search(
        rf"Model '{NO_SUCH_MODEL}' is not a local directory and not in the Hugging Face cache, and the Hub "
        r"\(http://127\.0\.0\.1:9\) cannot be reached \(.*\)\. Give a local copy with `--model_name_or_path ",
        line,
    ), line


def test_a_missing_adapter_directory_is_named_with_the_closest_one(tmp_path):
    (tmp_path / "outputs" / "demo-cpu").mkdir(parents=True)
    result = run_cli("generate", "--adapter", "outputs/demo-cpu-typo", "--prompt", "x", cwd=tmp_path)
    assert error_lines(result.stderr) == [
        "trl-qaloss: error: Adapter directory not found: 'outputs/demo-cpu-typo' (from `--adapter`). Did you mean "
        "'outputs/demo-cpu'?"
    ], result.stderr[-3000:]


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_help_of_generate_and_evaluate_shows_the_defaults(tmp_path, command):
    result = run_cli(command, "--help", cwd=tmp_path)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    # `evaluate` of a run's own held-out rows uses the run's settings instead
    run = ", or the training run's when evaluating its held-out rows" if command == "evaluate" else ""
    assert f"most tokens generated per prompt (default: 256{run})" in help_text
    assert f"prompts per generate call (default: 8{run})" in help_text


def test_evaluate_names_a_row_without_a_prompt(tmp_path):
    """A chat row made only of an assistant turn has nothing to generate from: its line is named, in JSON terms."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Tell me about valdor."},
                {"role": "assistant", "content": "<QA> x"},
            ]
        },
        {"messages": [{"role": "assistant", "content": "<QA> who rules valdor? <A> bozuman"}]},
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_cli(
        "evaluate", "--model_name_or_path", "trl_qaloss/demo/model", "--dataset_name", "chat.jsonl", cwd=tmp_path
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "chat.jsonl, line 2: evaluation needs a prompt" in lines[0], result.stderr[-3000:]
    assert '{"messages": [...]}' in lines[0] and "'" not in lines[0].split(":", 2)[-1]


def test_programming_errors_keep_their_type():
    """Only input errors become `UsageError`; a TypeError is a bug and is raised as it is, with its traceback."""
    with pytest.raises(UsageError, match="bad value") as raised, user_errors():
        raise ValueError("bad value")
    assert isinstance(raised.value.__cause__, ValueError)
    with pytest.raises(TypeError), user_errors():
        raise TypeError("a bug")


def test_help_lists_the_plugin_fields_first_with_config(tmp_path):
    result = run_cli("train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    help_text = result.stdout
    groups = re.findall(r"^(\S[^\n]*):$", help_text, flags=re.M)
    assert groups[:2] == ["options", "trl-qaloss options (the set loss, its evaluation, and this command)"], groups
    plugin = help_text.split(groups[1])[1].split(groups[2])[0]
    own = (
        "--config RECIPE.yaml",
        "--debug",
        "--lambda_ce",
        "--lambda_set",
        "--qa_token",
        "--answer_token",
        "--question_end",
        "--set_loss_reduction",
        "--eval_generate_samples",
        "--init_from_config",
    )
    for flag in own:
        assert flag in plugin, flag
    assert help_text.index("--lambda_set") < help_text.index("--output_dir") < help_text.index("--lora_r")
    assert "in the training loss. (default: 1.0)" in " ".join(help_text.split())  # every field shows its default
    assert "the seed's" not in help_text and "LAMBDA1" not in help_text and "LAMBDA2" not in help_text


@pytest.mark.parametrize("recipe", sorted(Path(ROOT, "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_use_current_field_names(recipe):
    """No deprecation warning a user cannot act on: every recipe field has its current name."""
    from trl_qaloss.cli.training import parse_args

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        parse_args(["--config", str(recipe), "--use_cpu", "true"])


def test_conversational_rows_train_with_a_chat_template_path(tmp_path):
    """The fix the chat-template message names works: `chat_template_path` to a .jinja file."""
    template = write(tmp_path / "chat.jinja", CHAT_TEMPLATE)
    rows = conversational_rows(tmp_path / "chat.jsonl")
    result = run_cli(
        "train",
        "--dataset_name",
        rows,
        "--chat_template_path",
        template,
        "--eval_strategy",
        "no",
        "--output_dir",
        "out",
        *SHORT_RUN,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
