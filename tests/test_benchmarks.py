"""The benchmark scripts stay runnable: their GPU code paths and the quality benchmark at tiny sizes on the CPU (no
timing is checked)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.testing_utils import nf4_quantization, slow

ROOT = Path(__file__).resolve().parents[1]


@slow
def test_benchmark_gpu_path_runs_at_tiny_sizes_on_cpu(tmp_path):
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--check-gpu-path", "--only", "loss"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The tables are printed with every implementation measured, and the smoke run leaves RESULTS.md alone.
    assert "## Targets" in result.stdout and "2, 128, 1000" in result.stdout
    assert "naive" in result.stdout and "cross_entropy" in result.stdout
    assert results.read_text() == before


@slow
def test_step_benchmark_runs_alone_on_its_gpu_path_at_tiny_sizes_on_cpu(tmp_path):
    """`step_speed.py` on its own, run as a user runs it (from another folder, without the repository on the import
    path): the 4-bit + LoRA step of both trainers and its targets are printed, and RESULTS.md is left alone."""
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, str(ROOT / "benchmarks" / "step_speed.py"), "--check-gpu-path", "--step-repeats", "1"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "## Training step" in result.stdout and "## Targets" in result.stdout
    assert "| SFTTrainer |" in result.stdout and "| QALossSFTTrainer |" in result.stdout
    assert "4-bit nf4 + LoRA r=16" in result.stdout and "## Loss alone" not in result.stdout
    assert results.read_text() == before


@slow
def test_qlora_steps_runs_the_recipe_path_at_tiny_sizes_on_cpu(tmp_path):
    """The real-size GPU check's code path: the 7B recipe read by the CLI's parser, a random 4-bit model of the
    Qwen2.5-7B architecture, one run with the recipe's loss and one plain (no timing is checked)."""
    from benchmarks.qlora_steps import main

    out = tmp_path / "qlora.json"
    argv = [
        "--recipe",
        str(ROOT / "recipes" / "qwen2.5-7b-instruct-qlora.yaml"),
        "--model-config",
        str(ROOT / "benchmarks" / "configs" / "qwen2.5-7b.json"),
        "--tiny",
        "--device",
        "cpu",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--runs",
        "recipe,plain",
        "--out",
        str(out),
    ]
    report = main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert out.with_suffix(".md").read_text().count("\n| ") == 1 + len(report["runs"])  # the header and a row per run
    recipe, plain = report["runs"]  # in the order asked; ratios are to the plain run wherever it comes
    assert plain["name"] == "plain" and recipe["name"].startswith("recipe")
    for run in (plain, recipe):
        assert "error" not in run and run["steps"] == 2 and run["measured_steps"] == 1
        # Every row is truncated to max_length: a step reads the recipe's batch of full rows.
        assert run["tokens_per_step"] == report["meta"]["per_device_train_batch_size"] * report["meta"]["max_length"]
        assert math.isfinite(run["logged"]["loss"]) and run["time_ratio"] > 0
        assert run["checkpointing"] is True  # the recipe's activation checkpointing, on the model measured
    # The recipe trains canonical-order targets without the set loss (its measured best), plain SFT the data order.
    assert plain["logged"]["set_loss"] is None and recipe["logged"]["set_loss"] is None
    assert "answer_order=canonical, lambda_set=0" in recipe["name"]
    assert plain["time_ratio"] == 1.0
    assert (
        "transformers " in report["meta"]["versions"]
        and report["meta"]["versions"] in out.with_suffix(".md").read_text()
    )


def test_qlora_steps_runs_one_plain_one_recipe_and_each_other_answer_order():
    from trl import SFTConfig

    from benchmarks.qlora_steps import run_settings
    from trl_qaloss import QALossConfig

    @dataclasses.dataclass
    class WithAnswerOrder(QALossConfig):
        answer_order: str = dataclasses.field(default="data", metadata={"choices": ["data", "canonical", "aligned"]})

    recipe = SimpleNamespace(answer_order="canonical", lambda_set=0.0)
    runs = run_settings(recipe, WithAnswerOrder)
    assert [name for name, _ in runs] == [
        "plain",
        "recipe (answer_order=canonical, lambda_set=0)",
        "answer_order=aligned, lambda_set=0",
        "answer_order=data, lambda_set=1",
        "answer_order=canonical, lambda_set=1",
        "answer_order=aligned, lambda_set=1",
    ]
    assert runs[0][1] == {"lambda_set": 0, "answer_order": "data"}  # plain SFT whatever the recipe's order
    # A config without the field (an SFTConfig): plain and the recipe only.
    assert run_settings(recipe, SFTConfig) == [("plain", {"lambda_set": 0}), ("recipe", {})]


def layout(key, tensor):
    """Shape and dtype of a checkpoint tensor; for bitsandbytes' packed quantization settings (a JSON blob), the
    settings, less the offset of the double-quantized scales, which depends on the weights."""
    if ".quant_state.bitsandbytes__" in key:
        settings = json.loads(bytes(tensor.tolist()).decode())
        settings.pop("nested_offset", None)
        return settings
    return tensor.shape, tensor.dtype


def test_random_4bit_checkpoint_has_the_layout_transformers_writes_for_a_quantized_model(tmp_path):
    """The pre-quantized random state dict holds the keys, shapes and dtypes of a model that transformers quantized
    on loading and saved, and loads into bitsandbytes `Linear4bit` layers whose weights are those drawn."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.qlora_steps import TINY_MODEL
    from benchmarks.random_4bit import load_random_4bit, random_quantized_state_dict, with_overrides

    config = with_overrides(str(ROOT / "benchmarks" / "configs" / "qwen2.5-7b.json"), TINY_MODEL)
    quantization = nf4_quantization(torch.bfloat16)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    quantized_on_load = AutoModelForCausalLM.from_pretrained(
        tmp_path / "bf16", quantization_config=quantization, dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    state = random_quantized_state_dict(config, quantization, torch.device("cpu"))
    assert {k: layout(k, v) for k, v in state.items()} == {
        k: layout(k, v) for k, v in quantized_on_load.state_dict().items()
    }

    # From the state dict, and from a checkpoint written to disk (a downloaded pre-quantized model's path).
    for checkpoint_dir in (None, tmp_path / "4bit"):
        model, _, _ = load_random_4bit(
            config, quantization, torch.device("cpu"), checkpoint_dir=checkpoint_dir, dtype=torch.bfloat16
        )
        assert model.is_loaded_in_4bit and not isinstance(model.lm_head, bnb.nn.Linear4bit)
        q_proj = model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, bnb.nn.Linear4bit) and torch.equal(
            q_proj.weight.data, state["model.layers.0.self_attn.q_proj.weight"]
        )
        weight = bnb.functional.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state)
        assert weight.shape == (config.hidden_size, config.hidden_size)
        assert abs(weight.float().std().item() - config.initializer_range) < 0.005


def run_set_vs_sft(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "set_vs_sft.py"), *flags, "--out", str(tmp_path / "bench")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@slow
def test_set_vs_sft_benchmark_runs_every_task_and_budget_at_tiny_sizes(tmp_path):
    """`benchmarks/set_vs_sft.py` end to end at 4 steps: the four tasks, both budgets, its table, plot and JSON."""
    methods = ["plain SFT", "canonical + set loss 0.1"]
    result = run_set_vs_sft(
        tmp_path, "--quick", "--max_steps", "4", "--eval_rows", "4", "--methods", *methods, "--workers", "1"
    )
    assert "note: --quick trains 4 steps, far too few for any method to learn the tasks" in result.stdout
    table = (tmp_path / "bench.md").read_text()
    for heading in ("countries, full budget (4 steps)", "countries, low budget (1 steps)", "hard, full budget"):
        assert heading in table
    assert "long, full budget (4 steps)" in table and "long, low budget (1 steps)" in table
    assert "grounded, full budget (4 steps)" in table and "grounded, low budget (1 steps)" in table
    assert "Full fine-tuning of each task's tiny pretrained Llama" in table
    assert table.count("| plain SFT |") == 8 and table.count("| canonical + set loss 0.1 |") == 8
    assert (tmp_path / "bench.png").stat().st_size > 0
    runs = json.loads((tmp_path / "bench.json").read_text())["runs"]
    assert len(runs) == 16  # 4 tasks x 2 budgets x 1 seed x 2 methods
    assert "for the 16 runs made by this invocation on 1 workers. Training and evaluations of all 16 runs" in table
    for run in runs:
        assert 0 <= run["final"]["eval_exact_set_match"] <= 1 and run["final"]["heldout_ce"] > 0
        assert run["job"]["max_steps"] == (4 if run["job"]["budget"] == "full" else 1)
        assert run["parameters"]["trained"] == run["parameters"]["all"]  # full fine-tuning
    # The long and the grounded task train bases of their own (own tokenizers; the grounded one 4 layers deep), the
    # others the demo's base.
    sizes = {run["job"]["task"]: run["parameters"]["all"] for run in runs}
    assert sizes["countries"] == sizes["hard"] != sizes["long"] != sizes["grounded"]


@slow
def test_set_vs_sft_benchmark_runs_a_given_model_and_dataset_with_lora(tmp_path):
    """`--model` and `--data` (the demo's model and 40 of its rows in one .jsonl, as a user would name their own) with
    `--lora`: one task named after the file, 10% of its rows held out (it has no test split), LoRA adapters trained
    instead of the whole model."""
    rows = (ROOT / "trl_qaloss/demo/data/train.jsonl").read_text().splitlines()[:40]
    (tmp_path / "mine.jsonl").write_text("\n".join(rows) + "\n")
    flags = ["--model", str(ROOT / "trl_qaloss/demo/model"), "--data", str(tmp_path / "mine.jsonl"), "--lora"]
    flags += ["--lora_r", "4", "--seeds", "0", "--max_steps", "4", "--evals", "1", "--methods", "plain SFT", "aligned"]
    result = run_set_vs_sft(tmp_path, *flags, "--workers", "1")
    assert "note: fewer than 3 seeds" in result.stdout
    table = (tmp_path / "bench.md").read_text()
    assert "LoRA (r=4, every linear layer) of `" in table
    assert "**mine, full budget (4 steps)**" in table and "countries" not in table and "long" not in table
    runs = json.loads((tmp_path / "bench.json").read_text())["runs"]
    assert len(runs) == 4 and {run["job"]["task"] for run in runs} == {"mine"}  # 2 methods x 2 budgets
    for run in runs:
        assert 0 < run["parameters"]["trained"] < run["parameters"]["all"] / 10
        assert run["heldout_rows"] == 4 and run["final"]["heldout_ce"] > 0  # 10% of the 40 rows


def test_set_vs_sft_benchmark_stops_before_any_run_without_matplotlib(tmp_path):
    """Without the `bench` extra the benchmark says which extra to install and stops at start-up, instead of after
    every run when it draws its plot. A `matplotlib` package that fails on import stands in for a missing one."""
    stub = tmp_path / "stub" / "matplotlib"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ModuleNotFoundError("No module named matplotlib")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub.parent), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "results" / "bench"
    command = [sys.executable, str(ROOT / "benchmarks" / "set_vs_sft.py"), "--quick", "--workers", "1"]
    # The smallest benchmark, so that a check that comes too late fails in seconds (at the plot), not minutes.
    command += ["--seeds", "0", "--max_steps", "1", "--evals", "1", "--eval_rows", "1", "--methods", "plain SFT"]
    result = subprocess.run(
        [*command, "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        'set_vs_sft.py needs matplotlib (the "bench" extra) to draw its plot: pip install "trl-qaloss[bench]", or '
        'pip install -e ".[bench]" from a checkout.'
    )
    # Nothing ran: the note printed before the runs is missing and the output folder was never made.
    assert result.stdout == "" and not out.parent.exists()


def set_vs_sft_module():
    """`benchmarks/set_vs_sft.py` imported as a module, as the script runs it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("set_vs_sft", ROOT / "benchmarks" / "set_vs_sft.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench


def test_set_vs_sft_benchmark_flags_that_need_each_other(tmp_path, capsys):
    bench = set_vs_sft_module()
    # Should a check be missing, `main` goes on to report the runs of an empty file, rather than to run the benchmark.
    no_runs = tmp_path / "no_runs.jsonl"
    no_runs.write_text("")
    for argv, message in [
        (["--model", "m"], "--model and --data go together"),
        (["--data", "d"], "--model and --data go together"),
        (["--lora"], "--lora needs --model and --data"),
        (["--model", "m", "--data", "d", "--lora_r", "8"], "--lora_r is the rank of --lora"),
        (["--max_length", "64"], "--max_length and --max_new_tokens size a task of your own"),
        (["--max_new_tokens", "64"], "--max_length and --max_new_tokens size a task of your own"),
    ]:
        with pytest.raises(SystemExit) as error:
            bench.main([*argv, "--out", str(tmp_path / "x"), "--report_from", str(no_runs)])
        assert error.value.code == 2 and message in capsys.readouterr().err


def write_qa_rows(path: Path, count: int, tag: str = "row") -> None:
    """`count` structured rows, each with a prompt of its own, in a .jsonl file."""
    rows = [{"context": f"{tag} {i}", "qas": [{"question": "who?", "answers": ["ann"]}]} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("rows, held_out", [(5, 1), (40, 4), (2010, 200)])
def test_set_vs_sft_holds_out_a_tenth_of_the_rows_at_least_one_at_most_200(tmp_path, rows, held_out):
    """A dataset without a `test` split: 10% of its rows are held out, at least one (a dataset under 10 rows) and at
    most 200; the same rows on every call, since every method and seed must be measured on the same rows."""
    bench = set_vs_sft_module()
    write_qa_rows(tmp_path / "mine.jsonl", rows)
    task = bench.Task(str(tmp_path / "mine.jsonl"), "no model needed", 0, 0)
    train, held = bench.split_data(task)
    assert len(held) == held_out and len(train) == rows - held_out
    assert not set(train["prompt"]) & set(held["prompt"])
    _, again = bench.split_data(task)
    assert again["prompt"] == held["prompt"]


def test_set_vs_sft_holds_out_a_datasets_own_test_split(tmp_path):
    """A directory with a `test` split (`test.jsonl`): its rows are the held-out rows, all of them, and every train
    row is trained on."""
    bench = set_vs_sft_module()
    write_qa_rows(tmp_path / "train.jsonl", 30, tag="train")
    write_qa_rows(tmp_path / "test.jsonl", 3, tag="test")
    train, held = bench.split_data(bench.Task(str(tmp_path), "no model needed", 0, 0))
    assert held["prompt"] == ["test 0", "test 1", "test 2"]
    assert len(train) == 30 and all(prompt.startswith("train ") for prompt in train["prompt"])


def test_set_vs_sft_held_out_batches_keep_every_row_once_and_label_only_the_completions(tmp_path):
    """The held-out rows in batches, the last one short: every row once, in data order, and only its completion
    tokens (and EOS) labelled, so that every method is scored on the same targets."""
    from transformers import AutoTokenizer

    from trl_qaloss.data import load_qa_dataset
    from trl_qaloss.demo import MODEL_DIR

    bench = set_vs_sft_module()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    write_qa_rows(tmp_path / "mine.jsonl", 5)
    rows = load_qa_dataset(str(tmp_path / "mine.jsonl"))["train"]
    batches = bench.heldout_batches(tokenizer, rows, batch_size=2)
    assert [len(batch["input_ids"]) for batch in batches] == [2, 2, 1]
    for start, batch in zip((0, 2, 4), batches, strict=True):
        for k, row in enumerate(rows.select(range(start, min(start + 2, len(rows))))):
            prompt, completion = bench.prompt_completion_ids(tokenizer, row)
            length = len(prompt) + len(completion)
            assert batch["input_ids"][k, :length].tolist() == prompt + completion
            assert batch["labels"][k, :length].tolist() == [-100] * len(prompt) + completion
            assert batch["attention_mask"][k].sum() == length and (batch["labels"][k, length:] == -100).all()


def test_the_offline_models_have_the_sizes_asked_for():
    """`trl_qaloss.testing_utils` builds the benchmarks' and the tests' models: a size given overrides the tiny
    default, for Llama and for another architecture, and the same seed draws the same weights."""
    from transformers import Qwen2Config

    from trl_qaloss.testing_utils import random_llama, random_model

    llama = random_llama(64, hidden_size=48, num_hidden_layers=1, pad_token_id=0)
    assert (llama.config.hidden_size, llama.config.num_hidden_layers, llama.config.pad_token_id) == (48, 1, 0)
    assert llama.config.vocab_size == 64 and llama.config.intermediate_size == 64  # the defaults where none is given
    qwen = random_model(Qwen2Config, 64, max_position_embeddings=512)
    assert qwen.config.model_type == "qwen2" and qwen.config.max_position_embeddings == 512
    again = random_llama(64, hidden_size=48, num_hidden_layers=1, pad_token_id=0)
    assert all(torch.equal(a, b) for a, b in zip(llama.state_dict().values(), again.state_dict().values(), strict=True))
