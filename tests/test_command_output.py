"""What the commands print, run as a user runs them on their own data: only the project's own lines and the Trainer's
progress; `evaluate --adapter DIR` scoring the run's own held-out rows; a run that trains nothing failing.

One short run (`train` on 40 rows of the demo's data as a `.jsonl` file, so it splits its held-out rows off itself),
then the commands its end prints.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tests.testing_utils import ROOT, error_lines, foreign_lines, run_cli, slow, terminal_lines
from trl_qaloss.cli.heldout import HELDOUT_FILE, ROWS_FILE

pytestmark = slow

DEMO_ROWS = Path(ROOT, "trl_qaloss", "demo", "data", "train.jsonl").read_text().splitlines()
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# A log line of the Trainer's (`{'loss': '1.23', ...}`), printed above its progress bar.
TRAINER_LOG = re.compile(r"^\{'\w+': .*\}$")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`train` on `my.jsonl` (40 rows), then its printed `generate` and `evaluate` commands: `(directory, {name:
    CompletedProcess})`."""
    directory = tmp_path_factory.mktemp("own-data")
    (directory / "my.jsonl").write_text("\n".join(DEMO_ROWS[:40]) + "\n")
    train = ["train", "--dataset_name", "my.jsonl", "--output_dir", "out", "--max_steps", "4", "--logging_steps"]
    train += [
        "2",
        "--save_strategy",
        "steps",
        "--save_steps",
        "4",
        "--eval_generate_samples",
        "4",
        "--max_length",
        "96",
    ]
    results = {"train": run_cli(*train, cwd=directory, env=OFFLINE)}
    assert results["train"].returncode == 0, results["train"].stderr[-3000:]
    next_lines = results["train"].stdout.split("Next:\n")[1].splitlines()
    commands = {line.split()[1]: shlex.split(line.strip())[1:] for line in next_lines}
    for name, argv in commands.items():
        results[name] = run_cli(*argv, cwd=directory, env=OFFLINE)
        assert results[name].returncode == 0, (argv, results[name].stderr[-3000:])
    (directory / "prompts.jsonl").write_text('"Tell me about getal: its rivers."\n{"prompt": "Tell me about mala."}\n')
    results["generate from a file"] = run_cli(
        "generate", "--adapter", "out", "--prompts", "prompts.jsonl", "--output", "c.jsonl", cwd=directory, env=OFFLINE
    )
    # Streamed rows are not counted before training; `max_length` 8 leaves no label in any row, so TRL drops them all.
    no_steps = ["--output_dir", "nothing", "--dataset_streaming", "true", "--max_length", "8", "--answer_order", "data"]
    results["train nothing"] = run_cli(*train, *no_steps, cwd=directory, env=OFFLINE)
    return directory, results


def test_every_command_prints_only_its_own_lines_and_progress(run):
    directory, results = run
    for name, result in results.items():
        if name != "train nothing":  # a failed run: what transformers says there about the empty epoch is on topic
            assert not foreign_lines(result.stderr), (name, foreign_lines(result.stderr))
    # stdout: the Trainer's log lines, then the run's end; JSON lines; the metrics table.
    trained = terminal_lines(results["train"].stdout)
    end = trained.index("Training completed.")
    assert end > 0 and all(TRAINER_LOG.match(line) for line in trained[:end]), trained[:end]
    assert trained[end + 1].startswith("Answer sets of 4 held-out rows") and "Next:" in trained[end:], trained[end:]
    assert all(json.loads(line)["qas"] is not None for line in terminal_lines(results["generate"].stdout))
    table = terminal_lines(results["evaluate"].stdout)
    assert table[0].split() == ["metric", "value"] and table[-1].startswith("Metrics of 4 rows of the run's held-out")
    written = [json.loads(line) for line in (directory / "c.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in written] == ["Tell me about getal: its rivers.", "Tell me about mala."]
    assert (
        results["generate from a file"]
        .stderr.strip()
        .splitlines()[-1]
        .startswith("trl-qaloss: wrote 2 completions to ")
    )


def test_the_printed_evaluate_reproduces_the_end_of_training_numbers(run):
    """The run split 4 of the 40 rows off itself; `evaluate --adapter out`, as printed, scores exactly those, with the
    run's settings, and gets every metric the end of training logged."""
    directory, results = run
    assert "  trl-qaloss evaluate --adapter out" in results["train"].stdout.splitlines()
    record = json.loads((directory / "out" / HELDOUT_FILE).read_text())
    assert record["rows_file"] == ROWS_FILE and record["num_rows"] == 4 and record["max_new_tokens"] == 64
    held_out = [json.loads(line) for line in (directory / "out" / ROWS_FILE).read_text().splitlines()]
    trained_on = {json.loads(row)["context"] for row in DEMO_ROWS[:40]} - {row["prompt"] for row in held_out}
    assert len(held_out) == 4 and len(trained_on) == 36  # the rows held out are not among those trained on
    logs = json.loads((directory / "out" / "trainer_state.json").read_text())["log_history"]
    trained = next(log for log in reversed(logs) if "eval_exact_set_match" in log)
    evaluated = json.loads((directory / "out" / "eval_results.json").read_text())
    assert evaluated["num_rows"] == 4 and evaluated["split"] == "held out"
    assert evaluated["metrics"] == {key: trained[f"eval_{key}"] for key in evaluated["metrics"]}
    assert evaluated["metrics"]["questions_expected"] == sum(r["completion"].count("<QA>") for r in held_out)


def test_evaluate_says_when_the_held_out_rows_changed(run, tmp_path):
    directory, _ = run
    changed = tmp_path / "out"
    changed.mkdir()
    for file in (directory / "out").iterdir():
        if file.is_file():
            (changed / file.name).write_bytes(file.read_bytes())
    rows = (changed / ROWS_FILE).read_text().splitlines()
    (changed / ROWS_FILE).write_text("\n".join(rows[:-1]) + "\n")  # one row fewer
    result = run_cli("evaluate", "--adapter", str(changed), cwd=tmp_path, env=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    (warning,) = [line for line in terminal_lines(result.stderr) if line.startswith("trl-qaloss: warning:")]
    assert "differ from the rows the training run evaluated on" in warning


def test_a_run_that_trains_no_step_fails_and_saves_nothing(run):
    directory, results = run
    result = results["train nothing"]
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        "trl-qaloss: error: The run trained 0 steps (max_steps=4, num_train_epochs=3.0, a stream of training rows), "
        "so nothing was saved."
    ], result.stderr[-3000:]
    assert "Training completed." not in result.stdout and not (directory / "nothing" / "adapter_config.json").exists()
