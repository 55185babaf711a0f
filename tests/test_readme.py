"""Every code block of README.md runs, as written, on a CPU-only machine, in the order a reader meets them.

The blocks run one after the other in a fresh copy of the repository (its files, without outputs or caches), as a new
user would run them after cloning: `bash` blocks command by command, `python` blocks each as a script of its own.
`trl-qaloss` and `python` run this checkout's code. What the test changes or adds, and nothing else:

- a Hugging Face Hub model name (`HUB_MODELS`), in a block or in a recipe the block names, is replaced by the demo's
  model, since the tests run offline;
- the input files the README asks the reader to bring (`qa.jsonl`, `my.jsonl`) are written first;
- a `benchmarks/set_vs_sft.py` command runs with `BENCHMARK_SIZES` appended (flags given later win), so that it
  measures 2 methods at 2 steps instead of the full comparison;
- `pip install ...` is what `.ci/run` has just done before the tests run (the test checks that each names this project
  or the pinned CPU torch, and does not repeat it offline), and `python -m pytest -q` is the run this test belongs
  to: both are checked against `.ci/run` instead of being run again.

Blocks without a language are what a command prints, and `console` blocks commands that need what the tests lack (a
GPU, a server): neither is run. A `print(...)  # expected` line in a `python`
block must print what its comment says (`...` standing for any text).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.testing_utils import ROOT, foreign_lines, slow

pytestmark = slow

README = Path(ROOT, "README.md").read_text()
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
HUB_MODELS = ("Qwen/Qwen2.5-0.5B-Instruct",)
DEMO_MODEL = "trl_qaloss/demo/model"  # the demo's model, as recipes name it (resolved inside the package)
DEMO_ROWS = Path(ROOT, "trl_qaloss", "demo", "data", "train.jsonl").read_text().splitlines()
CI_COMMANDS = [
    line.strip()
    for line in Path(ROOT, ".ci", "run").read_text().splitlines()
    if line.startswith(("python3", "RUN_SLOW=1 python3"))
]
BENCHMARK_SIZES = ' --seeds 0 --max_steps 2 --evals 1 --eval_rows 2 --methods "plain SFT" canonical'
COPY_IGNORED = shutil.ignore_patterns(
    ".git",
    "outputs",
    "runs",
    "gpu-check",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "build",
    "dist",
    ".venv-*",
)


def readme_blocks() -> list[tuple[str, str]]:
    """`(language, code)` of every fenced block of README.md, in order."""
    return BLOCK.findall(README)


def fresh_copy(directory: Path) -> Path:
    """The repository's files copied to `directory/repo`, with the inputs a reader brings and the Hub models swapped."""
    repo = directory / "repo"
    shutil.copytree(ROOT, repo, ignore=COPY_IGNORED)
    for recipe in (repo / "recipes").glob("*.yaml"):
        recipe.write_text(swap_hub_models(recipe.read_text()))
    (repo / "qa.jsonl").write_text("\n".join(DEMO_ROWS[:40]) + "\n")
    (repo / "my.jsonl").write_text("\n".join(DEMO_ROWS[40:80]) + "\n")
    return repo


def swap_hub_models(text: str) -> str:
    for name in HUB_MODELS:
        text = text.replace(name, DEMO_MODEL)
    return text


def shell_commands(code: str) -> list[str]:
    """The commands of a `bash` block: its lines (backslash continuations joined), each split at `&&`."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].strip()
        if line and not line.startswith("#"):
            commands += [part.strip() for part in line.split(" && ")]
    return commands


def check_ci_command(command: str) -> bool:
    """Whether `command` is one `.ci/run` runs before or as the tests (so it is not run again here)."""
    words = shlex.split(command)
    if words[:2] == ["pip", "install"]:
        (ci_install,) = [c.replace('"', "") for c in CI_COMMANDS if " pip install " in c]
        if words[2:] == ["torch==2.13.0"]:  # the quickstart's CPU torch: the release the lock pins
            assert re.search(r"^torch==2\.13\.0\+cpu$", Path(ROOT, ".ci", "lock.txt").read_text(), re.M), command
        elif words[2:] == ["-e", "."]:  # the quickstart's install: CI installs the package with its extras
            assert "-e .[" in ci_install, ci_install
        else:
            assert words[2:] == ["-c", ".ci/lock.txt", "-e", ".[dev,tracking,bench,sharded]"], command
            assert ci_install.endswith(" ".join(words[2:])), ci_install
        return True
    if words[:5] == ["RUN_SLOW=1", "python", "-m", "pytest", "-q"]:
        assert "RUN_SLOW=1 python3 " + " ".join(words[2:]) in CI_COMMANDS, CI_COMMANDS
        return True
    return False


def sized(command: str) -> str:
    """`command`, with `BENCHMARK_SIZES` appended if it runs the answer-set benchmark."""
    return command + BENCHMARK_SIZES if "benchmarks/set_vs_sft.py" in command else command


def expected_prints(code: str) -> list[str]:
    """The patterns of the `print(...)  # expected` lines of a block, in order."""
    patterns = []
    for line in code.splitlines():
        match = re.match(r"\s*print\(.*\)\s+#\s(.*)$", line)
        if match:
            patterns.append(".*".join(re.escape(part) for part in match.group(1).split("...")))
    return patterns


def environment(directory: Path, repo: Path) -> dict:
    """`trl-qaloss` and `python` on PATH running this checkout's copy, offline, one torch thread per process."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, target in (("trl-qaloss", f"{sys.executable} -m trl_qaloss"), ("python", sys.executable)):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TRL_QALOSS_DEBUG"}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(repo),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    return env


# Runs a `python` block as a script whose log records name their logger (`trl_qaloss.trainer: ...`), so that the
# package's own messages can be told from the libraries'; the block itself runs unchanged.
NAMED_LOGS = (
    "import logging, runpy, sys; logging.basicConfig(format='%(name)s: %(message)s'); "
    "runpy.run_path(sys.argv[1], run_name='__main__')"
)
OUTPUTS = {}  # what each command printed on stderr, by the command's description


def run(args: list[str], repo: Path, env: dict, what: str) -> str:
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert result.returncode == 0, f"{what} failed ({result.returncode}):\n{output}"
    OUTPUTS[what] = result.stderr
    return result.stdout


def test_every_block_has_a_language_or_is_output():
    languages = {language for language, _ in readme_blocks()}
    assert languages <= {"bash", "python", "console", ""}, languages


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """Every `bash` and `python` block run in order in a fresh copy: `[(language, code, stdout of each command)]`."""
    directory = tmp_path_factory.mktemp("readme")
    repo = fresh_copy(directory)
    env = environment(directory, repo)
    results = []
    for number, (language, code) in enumerate(readme_blocks()):
        if language == "bash":
            outputs = [
                run(["bash", "-c", sized(swap_hub_models(command))], repo, env, f"README block {number}: {command}")
                for command in shell_commands(code)
                if not check_ci_command(command)
            ]
            results.append((language, code, outputs))
        elif language == "python":
            script = directory / f"block_{number}.py"
            script.write_text(swap_hub_models(code))
            command = [sys.executable, "-c", NAMED_LOGS, str(script)]
            results.append((language, code, [run(command, repo, env, f"README block {number}")]))
    return repo, results


def test_every_code_block_runs_as_written(readme_run):
    repo, results = readme_run
    assert sum(language == "python" for language, _, _ in results) >= 8
    assert (repo / "outputs" / "demo-cpu" / "adapter_model.safetensors").is_file()  # the quickstart's demo
    assert (repo / "outputs" / "my-qa" / "adapter_model.safetensors").is_file()  # the own-data command
    assert (repo / "completions.jsonl").is_file() and (repo / "qwen-qaloss").is_dir()
    assert "LoRA (r=16, every linear layer)" in (repo / "benchmarks" / "set_vs_sft_my.md").read_text()


def test_blocks_print_only_the_packages_lines_and_progress(readme_run):
    """Nothing the libraries underneath print reaches a reader who runs the README: no DeepSpeed notice, no
    deprecation or `pin_memory` warning, no dataset-preparation progress bars."""
    assert len(OUTPUTS) >= 15
    foreign = {what: foreign_lines(stderr) for what, stderr in OUTPUTS.items() if foreign_lines(stderr)}
    assert not foreign, foreign


def test_python_blocks_print_what_their_comments_say(readme_run):
    _, results = readme_run
    checked = 0
    for language, code, outputs in results:
        if language != "python":
            continue
        printed = [line for line in outputs[0].splitlines() if line.strip()]
        patterns = expected_prints(code)
        assert len(printed) >= len(patterns), (code, printed)
        for pattern, line in zip(patterns, printed[-len(patterns) :] if patterns else [], strict=True):
            assert re.fullmatch(pattern, line.strip()), (pattern, line)
            checked += 1
    assert checked >= 3


def test_the_merged_demo_model_reproduces_its_adapters_answer_sets(readme_run):
    """`trl-qaloss merge` on the quickstart's adapter, as "Serve the model" runs it: one model directory without
    adapter or quantization, whose `evaluate` gives the adapter's exact-set match on the 80 held-out rows (within the
    one question that a near tie may flip: 1/201 of the questions)."""
    repo, _ = readme_run
    merged = repo / "outputs" / "demo-cpu-merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    adapter = json.loads((repo / "outputs" / "demo-cpu" / "eval_results.json").read_text())
    evaluated = json.loads((merged / "eval_results.json").read_text())
    assert evaluated["num_rows"] == adapter["num_rows"] == 80
    assert evaluated["split"] == "test"  # `evaluate` without a dataset: the run's record, carried over by the merge
    assert evaluated["metrics"]["exact_set_match"] == pytest.approx(adapter["metrics"]["exact_set_match"], abs=0.011)


def test_the_demo_reaches_the_answer_sets_the_readme_states(readme_run):
    """`trl-qaloss train` as the quickstart runs it: the held-out exact-set match it ends with, which `evaluate` on its
    adapter reproduces exactly, lies in the range the README states."""
    repo, _ = readme_run
    logs = json.loads((repo / "outputs" / "demo-cpu" / "trainer_state.json").read_text())["log_history"]
    trained = next(log for log in reversed(logs) if "eval_exact_set_match" in log)
    evaluated = json.loads((repo / "outputs" / "demo-cpu" / "eval_results.json").read_text())
    assert evaluated["num_rows"] == trained["eval_num_examples"] == 80
    assert evaluated["split"] == "test" and evaluated["metrics"] == {
        key: trained[f"eval_{key}"] for key in evaluated["metrics"]
    }  # `evaluate --adapter outputs/demo-cpu`: the run's own rows and settings, the run's numbers
    # The range the README states for the seeds and machines measured.
    low, high = (float(x) for x in re.search(r"\*\*(0\.\d+) to (0\.\d+)\*\*", README).groups())
    assert low <= round(trained["eval_exact_set_match"], 3) <= high, trained["eval_exact_set_match"]  # as stated
