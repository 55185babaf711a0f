"""`trl-qaloss generate` and `evaluate` on an adapter trained by `trl-qaloss train`, run as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.testing_utils import DEMO_RECIPE, SHORT_RUN, error_lines, run_cli, slow


@pytest.fixture(scope="session")
def demo_adapter(tmp_path_factory):
    """The demo recipe trained for 2 steps by the real command: the adapter's directory."""
    work = tmp_path_factory.mktemp("adapter")
    result = run_cli(
        "train", "--config", DEMO_RECIPE, "--output_dir", "adapter", *SHORT_RUN, "--eval_strategy", "no", cwd=work
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "adapter"


@slow
def test_the_adapter_records_its_4bit_base(demo_adapter):
    from bitsandbytes.nn import Linear4bit
    from peft import PeftModel

    from trl_qaloss.cli.inference import BASE_INFO_FILE, load_for_inference

    info = json.loads((demo_adapter / BASE_INFO_FILE).read_text())
    # the shipped demo model is recorded as the recipe names it, so the adapter loads wherever the package is installed
    assert info["base_model_name_or_path"] == "trl_qaloss/demo/model" and info["quantization_config"]["load_in_4bit"]
    loaded = load_for_inference(str(demo_adapter))
    assert isinstance(loaded.model, PeftModel) and not loaded.model.training
    assert any(isinstance(m, Linear4bit) for m in loaded.model.modules())
    assert loaded.separators == ("<QA>", "<A>", "?")


@slow
def test_generate_writes_one_line_per_prompt(demo_adapter, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "Tell me about valdor."}\n"Tell me about nireper."\n{"context": "Tell me about oru."}\n'
    )
    result = run_cli(
        "generate",
        "--adapter",
        str(demo_adapter),
        "--prompts",
        "prompts.jsonl",
        "--max_new_tokens",
        "16",
        "--batch_size",
        "2",
        "--output",
        "out.jsonl",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Generating" in result.stderr and "trl-qaloss: wrote 3 completions to" in result.stderr  # the bar, the file
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == [
        "Tell me about valdor.",
        "Tell me about nireper.",
        "Tell me about oru.",
    ]
    for line in lines:
        assert set(line) == {"prompt", "completion", "qas"} and isinstance(line["completion"], str)
        assert all(set(item) == {"question", "answers"} for item in line["qas"])


@slow
def test_generate_one_prompt_to_stdout(demo_adapter, tmp_path):
    result = run_cli(
        "generate",
        "--adapter",
        str(demo_adapter),
        "--prompt",
        "Tell me about valdor.",
        "--max_new_tokens",
        "16",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [json.loads(text) for text in result.stdout.splitlines()]
    assert line["prompt"] == "Tell me about valdor." and isinstance(line["qas"], list)


@slow
def test_evaluate_prints_and_writes_the_answer_set_metrics(demo_adapter, tmp_path):
    result = run_cli(
        "evaluate",
        "--adapter",
        str(demo_adapter),
        "--dataset_name",
        "trl_qaloss/demo/data",
        "--eval_generate_samples",
        "4",
        "--max_new_tokens",
        "16",
        "--output",
        "metrics.json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.splitlines()
    assert table[0].split() == ["metric", "value"] and any(row.split()[0] == "set_f1" for row in table[2:-1])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["split"] == "test" and written["num_rows"] == 4
    metrics = written["metrics"]
    assert metrics["num_examples"] == 4 and 0 <= metrics["set_f1"] <= 1 and metrics["questions_expected"] > 0


@slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--adapter", "nope", "--prompt", "x"], r"Adapter directory not found: 'nope'"),
        (["generate", "--adapter", "ADAPTER", "--prompts", "nope.jsonl"], r"Prompts file not found: 'nope\.jsonl'"),
        (["evaluate", "--adapter", "ADAPTER", "--dataset_name", "nope.jsonl"], r"Dataset file not found"),
    ],
)
def test_inference_input_errors_are_one_message(demo_adapter, tmp_path, args, message):
    import re

    result = run_cli(*[str(demo_adapter) if a == "ADAPTER" else a for a in args], cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert re.search(message, line), line


@pytest.fixture(scope="module")
def adapter_in_process(tmp_path_factory):
    """The demo recipe trained for 2 steps in this process (the fast tier's adapter): the adapter's directory."""
    from trl_qaloss.cli.training import parse_args, train

    output_dir = tmp_path_factory.mktemp("fast") / "adapter"
    train(*parse_args(["--config", DEMO_RECIPE, "--output_dir", str(output_dir), *SHORT_RUN, "--eval_strategy", "no"]))
    return output_dir


def test_generate_and_evaluate_load_the_adapter_on_its_4bit_base(adapter_in_process, tmp_path, capsys):
    """`generate` and `evaluate` in this process: the adapter on its 4-bit base, parsed completions, metrics."""
    from trl_qaloss.cli.inference import run_evaluate, run_generate

    run_generate(["--adapter", str(adapter_in_process), "--prompt", "Tell me about valdor.", "--max_new_tokens", "8"])
    (line,) = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert line["prompt"] == "Tell me about valdor." and set(line) == {"prompt", "completion", "qas"}
    dataset = str(tmp_path / "rows.jsonl")
    rows = [{"prompt": "Tell me about valdor.", "completion": "<QA> which rivers are in valdor? <A> a <A> b"}] * 2
    Path(dataset).write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "metrics.json"
    argv = ["--adapter", str(adapter_in_process), "--dataset_name", dataset, "--max_new_tokens", "8"]
    run_evaluate([*argv, "--output", str(output)])
    metrics = json.loads(output.read_text())["metrics"]
    assert metrics["num_examples"] == 2 and 0 <= metrics["set_f1"] <= 1


def test_prompt_files_name_the_line_of_a_bad_chat_prompt(tmp_path):
    from trl_qaloss.cli.inference import check_chat_prompts, read_prompts, set_chat_template

    path = tmp_path / "prompts.jsonl"
    chat = {"messages": [{"role": "user", "content": "Tell me about getal."}]}
    path.write_text("\n".join(json.dumps(p) for p in ["Tell me about mala.", chat, {"prompt": "x"}]) + "\n")
    prompts, lines = read_prompts(str(path))
    assert prompts[1] == chat["messages"] and lines == [1, 2, 3]
    where = [f"{path}, line {n}" for n in lines]

    from transformers import AutoTokenizer

    from trl_qaloss.demo import MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)  # no chat template
    with pytest.raises(
        ValueError,
        match=rf"{path}, line 2: the prompt is chat messages \(1 of the 3 prompts are\).*"
        r"`--chat_template_path FILE\.jinja`",
    ):
        check_chat_prompts(tokenizer, prompts, where)
    (tmp_path / "chat.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    set_chat_template(tokenizer, str(tmp_path / "chat.jinja"))
    check_chat_prompts(tokenizer, prompts, where)
    with pytest.raises(FileNotFoundError, match=r"Chat template not found: .*chat\.jinj' .*Did you mean .*chat\.jinja"):
        set_chat_template(tokenizer, str(tmp_path / "chat.jinj"))
    path.write_text(json.dumps("ok") + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2: `messages` must be a list of \{{\"role\": \.\.\., "):
        read_prompts(str(path))
