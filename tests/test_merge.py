"""`trl-qaloss merge`: an adapter trained on a 4-bit base by `trl-qaloss train`, merged into the dequantized base and
saved as one model directory, loads with transformers alone and answers as the adapter does; with added separator
tokens, from a ZeRO-3 run, and for every kind of bad input (one line, exit code 1, nothing half-written)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.testing_utils import DEMO_RECIPE, ROOT, error_lines, run_cli, slow

PROMPTS = [
    json.loads(row)["context"]
    for row in Path(ROOT, "trl_qaloss", "demo", "data", "eval.jsonl").read_text().splitlines()[:16]
]
# The demo recipe, trained for 20 steps: long enough for the LoRA weights to move the completions away from the base's.
STEPS = ["--max_steps", "20", "--logging_steps", "10", "--disable_tqdm", "true", "--eval_strategy", "no"]
# How far the merged model's logits may be from the adapter's over the 4-bit base. bitsandbytes' 4-bit CPU kernel
# rounds its products its own way (0.3% of a layer's output); through the demo's model that came to 0.07 to 0.15, of
# logits up to 16.5 (benchmarks/RESULTS.md, "`trl-qaloss merge`").
LOGIT_TOLERANCE = 0.3


def train_adapter(output_dir: Path, *flags: str) -> Path:
    """The demo recipe trained in this process for 20 steps with `flags` added: the adapter's directory."""
    from trl_qaloss.cli.training import parse_args, train

    train(*parse_args(["--config", DEMO_RECIPE, "--output_dir", str(output_dir), *STEPS, *flags]))
    return output_dir


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return train_adapter(tmp_path_factory.mktemp("merge") / "adapter")


@pytest.fixture(scope="module")
def merged(adapter) -> Path:
    from trl_qaloss.cli.merge import merge

    output = adapter.parent / "merged"
    assert merge(str(adapter), str(output)) == "float32"  # a 4-bit base on a CPU
    return output


def compare_greedy(adapter, merged, prompts: list) -> tuple[int, float, list[float]]:
    """Greedy completions of `prompts` by two loaded models (`LoadedModel`s), the adapter's and the merged one:
    `(how many are the same, the largest absolute difference of their logits along the adapter's completions, the
    adapter's margin between its token and the merged model's where they part)`."""
    from trl_qaloss.cli.inference import prompt_ids
    from trl_qaloss.generation import greedy_completions

    tokenizer = adapter.tokenizer
    prompts = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    same, difference, margins = 0, 0.0, []
    with torch.no_grad():
        expected = greedy_completions(adapter.model, tokenizer, prompts, max_new_tokens=64, batch_size=8)
        got = greedy_completions(merged.model, merged.tokenizer, prompts, max_new_tokens=64, batch_size=8)
        for prompt, ours, theirs in zip(prompts, expected, got, strict=True):
            ids = torch.tensor([prompt + ours])
            logits, merged_logits = adapter.model(ids).logits[0].float(), merged.model(ids).logits[0].float()
            difference = max(difference, float((logits - merged_logits).abs().max()))
            if ours == theirs:
                same += 1
                continue
            # The first token they disagree on; a completion that ends there chose EOS.
            shorter = min(len(ours), len(theirs))
            k = next((j for j in range(shorter) if ours[j] != theirs[j]), shorter)
            chosen = [c[k] if k < len(c) else tokenizer.eos_token_id for c in (ours, theirs)]
            row = logits[len(prompt) + k - 1]
            margins.append(float(row[chosen[0]] - row[chosen[1]]))
    return same, difference, margins


def assert_answers_as_the_adapter(adapter, merged, prompts: list) -> float:
    """The merged model's greedy completions are the adapter's, but for near ties that the logits' rounding
    difference can flip (at most a quarter of them); its logits are within `LOGIT_TOLERANCE`. Returns the largest
    logit difference."""
    same, difference, margins = compare_greedy(adapter, merged, prompts)
    assert difference < LOGIT_TOLERANCE and same >= 0.75 * len(prompts), (same, difference, margins)
    assert all(margin < 2 * difference for margin in margins), margins
    return difference


def test_the_merged_model_loads_with_transformers_alone(adapter, merged):
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = set(os.listdir(merged))
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md", "trl_qaloss_base.json"} <= files
    assert any(name.endswith(".safetensors") for name in files)
    assert not {"adapter_config.json", "adapter_model.safetensors"} & files
    assert not any(name.startswith(".") for name in os.listdir(merged.parent))  # no temporary directory left
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    assert not any("lora" in name for name, _ in model.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert [len(tokenizer.tokenize(t)) for t in ("<QA>", "<A>")] == [1, 1]
    # The training record, and what the merge did.
    info = json.loads((merged / "trl_qaloss_base.json").read_text())
    assert info["answer_order"] == "canonical" and info["lambda_set"] == 0.0
    assert info["merged"] == {"adapter": str(adapter), "dtype": "float32", "base_weights": "dequantized"}


def test_the_model_card_says_where_the_model_comes_from_and_how_to_parse_it(adapter, merged):
    card = (merged / "README.md").read_text()
    assert card.startswith('---\nbase_model: "trl_qaloss/demo/model"\n')
    for expected in (
        f"| adapter | `{adapter}` |",
        "| answer_order | `canonical` |",
        "| lambda_set | `0.0` |",
        "the 4-bit weights the adapter was trained on, dequantized to float32",
        "from trl_qaloss.engine.parsing import parse_qa_text",
        "items = parse_qa_text(text, '<QA>', '<A>', '?')",
    ):
        assert expected in card, expected


def test_a_card_without_the_recorded_loss_settings_says_they_are_unknown():
    """An adapter whose `trl_qaloss_base.json` records the base but not the loss settings still gets its card."""
    from trl_qaloss.cli.merge import model_card

    card = model_card({"base_model_name_or_path": "org/base"}, "org/base", "out/adapter", "bfloat16", "dequantized")
    assert "| answer_order | unknown (not recorded in the adapter's trl_qaloss_base.json) |" in card
    assert "| merged weights | the base's weights in bfloat16 |" in card


def test_the_merged_model_answers_as_the_adapter_on_its_4bit_base(adapter, merged):
    """Greedy completions of held-out prompts: the same from the merged model (loaded as a full model) as from the
    adapter over its 4-bit base, the logits within `LOGIT_TOLERANCE`. Merging into the base's original weights
    instead (which the adapter was not trained on) moves the logits much further."""
    from trl_qaloss.cli.inference import LoadedModel, load_for_inference
    from trl_qaloss.cli.merge import load_merged

    with_adapter = load_for_inference(str(adapter))
    loaded = load_for_inference(model_name_or_path=str(merged))
    assert loaded.separators == ("<QA>", "<A>", "?")
    same, dequantized, _ = compare_greedy(with_adapter, loaded, PROMPTS)
    assert same == len(PROMPTS) and dequantized < LOGIT_TOLERANCE
    model, tokenizer, _ = load_merged(str(adapter), base_weights="original")
    _, original, _ = compare_greedy(with_adapter, LoadedModel(model, tokenizer), PROMPTS)
    assert original > 5 * dequantized


def test_evaluate_gives_the_merged_model_the_adapters_metrics(adapter, merged, tmp_path):
    from trl_qaloss.cli.inference import run_evaluate

    scores = {}
    for name, option in (("adapter", ["--adapter", str(adapter)]), ("merged", ["--model_name_or_path", str(merged)])):
        output = tmp_path / f"{name}.json"
        run_evaluate(
            [*option, "--dataset_name", "trl_qaloss/demo/data", "--eval_generate_samples", "16"]
            + ["--max_new_tokens", "64", "--output", str(output)]
        )
        scores[name] = json.loads(output.read_text())["metrics"]
    assert scores["merged"] == scores["adapter"] and scores["adapter"]["num_examples"] == 16


def test_added_separator_rows_survive_the_merge(tmp_path):
    """Separators that the base's tokenizer lacks are added and their embedding rows trained
    (`trainable_token_indices`); the merged model holds the resized embeddings with those rows, and answers as the
    adapter does."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_qaloss.cli.inference import load_for_inference
    from trl_qaloss.cli.merge import merge

    adapter = train_adapter(tmp_path / "adapter", "--qa_token", "<Q>", "--answer_token", "<ANS>", "--max_steps", "60")
    assert json.loads((adapter / "adapter_config.json").read_text())["trainable_token_indices"] == [768, 769]
    merge(str(adapter), str(tmp_path / "merged"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    new_ids = tokenizer.convert_tokens_to_ids(["<Q>", "<ANS>"])
    assert new_ids == [768, 769] and model.config.vocab_size == len(tokenizer) == 770
    with_adapter = load_for_inference(str(adapter))
    assert isinstance(with_adapter.model, PeftModel)
    saved = load_file(adapter / "adapter_model.safetensors")
    embeddings = "base_model.model.model.embed_tokens.token_adapter"
    trained_rows = saved[f"{embeddings}.trainable_tokens_delta"].float()  # the rows' trained values (not differences)
    assert not torch.equal(trained_rows, saved[f"{embeddings}.base_layer.weight"][768:])  # training moved them
    torch.testing.assert_close(model.get_input_embeddings().weight[new_ids], trained_rows, rtol=0, atol=0)
    # The LM head, resized in training (and not trained: it is not tied to the input embeddings), as saved.
    torch.testing.assert_close(model.get_output_embeddings().weight, saved["base_model.model.lm_head.weight"].float())
    loaded = load_for_inference(model_name_or_path=str(tmp_path / "merged"))
    assert loaded.separators == ("<Q>", "<ANS>", "?")
    assert_answers_as_the_adapter(with_adapter, loaded, PROMPTS)


# --- Bad input: one line, exit code 1, nothing written ----------------------------------------------------------


def run_merge_command(capsys, *args: str) -> str:
    """`trl-qaloss merge <args>` in this process, expected to fail: its one line on stderr."""
    from trl_qaloss.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["merge", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_missing_adapter_directory_is_reported_as_missing(tmp_path, capsys):
    err = run_merge_command(capsys, "--adapter", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert err == f"trl-qaloss: error: Adapter directory not found: {str(tmp_path / 'nope')!r} (from `--adapter`).\n"
    assert os.listdir(tmp_path) == []


def test_a_directory_that_is_not_an_adapter_is_refused(tmp_path, capsys, merged):
    (tmp_path / "notes").mkdir()
    err = run_merge_command(capsys, "--adapter", str(tmp_path / "notes"), "--output", str(tmp_path / "out"))
    assert "is not a LoRA adapter directory (no adapter_config.json)" in err
    # A merged (full) model given as the adapter: said so, with what to do instead.
    err = run_merge_command(capsys, "--adapter", str(merged), "--output", str(tmp_path / "out"))
    assert "It holds a full model: pass it as `--model_name_or_path` instead." in err
    assert sorted(os.listdir(tmp_path)) == ["notes"]


def test_a_non_empty_output_is_refused_unless_overwrite(adapter, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("an earlier run's file")
    err = run_merge_command(capsys, "--adapter", str(adapter), "--output", str(output))
    assert f"--output {str(output)!r} exists and is not empty; pass --overwrite to replace it" in err
    assert os.listdir(output) == ["stale.txt"]
    from trl_qaloss.cli import main

    main(["merge", "--adapter", str(adapter), "--output", str(output), "--overwrite"])
    assert f"Merged model (float32) saved to {output}" in capsys.readouterr().out
    assert not (output / "stale.txt").exists() and AutoModelForCausalLM.from_pretrained(output) is not None
    assert os.listdir(tmp_path) == ["out"]  # neither the temporary directory nor the replaced one is left


def test_an_output_that_holds_the_adapter_is_refused_even_with_overwrite(adapter, capsys):
    err = run_merge_command(capsys, "--adapter", str(adapter), "--output", str(adapter.parent), "--overwrite")
    assert "holds the adapter it merges; give another directory" in err
    assert (adapter / "adapter_config.json").is_file()


def test_a_base_missing_offline_is_named_with_hf_hub_offline(adapter, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets when the hub is imported
    moved = tmp_path / "adapter"
    shutil.copytree(adapter, moved)
    info = json.loads((moved / "trl_qaloss_base.json").read_text())
    (moved / "trl_qaloss_base.json").write_text(json.dumps({**info, "base_model_name_or_path": "nobody/no-such-base"}))
    err = run_merge_command(capsys, "--adapter", str(moved), "--output", str(tmp_path / "out"))
    assert (
        "Model 'nobody/no-such-base' is not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE=1"
        in err
    )
    assert "Give a local copy as `base_model_name_or_path` in " in err
    assert "hf download nobody/no-such-base" in err and not (tmp_path / "out").exists()


def test_a_merge_that_fails_while_writing_leaves_the_output_as_it_was(tmp_path):
    from trl_qaloss.cli.merge import write_directory

    def fail(directory: str) -> None:
        Path(directory, "model-00001-of-00002.safetensors").write_text("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_directory(str(tmp_path / "new"), fail)
    assert os.listdir(tmp_path) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    with pytest.raises(OSError, match="No space left"):
        write_directory(str(tmp_path / "old"), fail)
    assert os.listdir(tmp_path) == ["old"] and os.listdir(tmp_path / "old") == ["config.json"]


def test_merge_help_lists_its_options(capsys):
    from trl_qaloss.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "  merge " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for option in ("--adapter", "--output", "--dtype", "--base_weights", "--max_shard_size", "--overwrite"):
        assert option in out, option


# --- Through the command line, as a user runs it ----------------------------------------------------------------


@slow
def test_generate_on_the_merged_model_gives_the_adapters_lines(adapter, tmp_path):
    """`trl-qaloss merge`, then `trl-qaloss generate` with `--model_name_or_path merged` and with `--adapter`: the same
    JSON lines (prompt, completion, parsed questions and answers)."""
    shard = ["--max_shard_size", "500KB"]
    result = run_cli("merge", "--adapter", str(adapter), "--output", "merged", *shard, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Merged model (float32) saved to" in result.stdout
    shards = sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    prompts = [arg for prompt in PROMPTS[:8] for arg in ("--prompt", prompt)]
    lines = {}
    for name, option in (("adapter", ["--adapter", str(adapter)]), ("merged", ["--model_name_or_path", "merged"])):
        result = run_cli("generate", *option, *prompts, "--max_new_tokens", "64", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        lines[name] = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines["merged"] == lines["adapter"] and len(lines["adapter"]) == 8


@slow
def test_merge_input_errors_through_the_command(tmp_path):
    result = run_cli("merge", "--adapter", "nope", "--output", "out", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert line == "trl-qaloss: error: Adapter directory not found: 'nope' (from `--adapter`)."
    result = run_cli("merge", "--adapter", "nope", cwd=tmp_path)
    (line,) = error_lines(result.stderr)
    assert result.returncode == 1 and "the following arguments are required: --output" in line


# --- An adapter saved by a ZeRO-3 run ---------------------------------------------------------------------------

# recipes/README.md's ZeRO-3 launch line on 2 CPU processes (what it says a CPU run adds, as tests/test_sharded.py
# runs it), with the demo's model and data, 60 steps of 8 rows per process at the demo's learning rate, in float32:
# with bfloat16 activations, as the recipe trains on GPUs, the adapter over its 4-bit base and any merged model
# round differently at every layer, and the completions of an adapter trained this briefly are full of near ties.
ZERO3_LAUNCH = [
    *("-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/zero3-qlora.yaml"),
    *("--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0"),
    *("-m", "trl_qaloss", "train", "--config", "recipes/qwen2.5-7b-instruct-qlora-sharded.yaml"),
    *("--bf16", "false", "--ddp_backend", "gloo", "--model_name_or_path", "trl_qaloss/demo/model"),
    *("--dataset_name", "trl_qaloss/demo/data", "--dtype", "float32", "--max_steps", "60", "--learning_rate", "3e-3"),
    *("--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--max_length", "128"),
    *("--lora_dropout", "0", "--save_strategy", "no", "--disable_tqdm", "true"),
]


@slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_a_zero3_adapter_merges_and_answers_as_it_does(tmp_path):
    from trl_qaloss.cli.inference import load_for_inference
    from trl_qaloss.cli.merge import merge

    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "TRL_QALOSS_DEBUG")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    command = [sys.executable, *ZERO3_LAUNCH, "--output_dir", str(tmp_path / "adapter")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    info = json.loads((tmp_path / "adapter" / "trl_qaloss_base.json").read_text())
    assert info["quantization_config"]["bnb_4bit_quant_storage"] == "bfloat16"  # the ZeRO-3 recipe's 4-bit storage
    merge(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    with_adapter = load_for_inference(str(tmp_path / "adapter"))
    loaded = load_for_inference(model_name_or_path=str(tmp_path / "merged"))
    assert_answers_as_the_adapter(with_adapter, loaded, PROMPTS)


@slow
def test_the_memory_benchmark_measures_a_merge_and_computes_the_larger_ones(tmp_path):
    """`benchmarks/merge_memory.py` at the demo model's size: the merge's peak memory above that of its imports, and
    the computed figures of the 7B config (one and two copies)."""
    out = tmp_path / "memory.json"
    config = str(Path(ROOT, "trl_qaloss", "demo", "model", "config.json"))
    command = [sys.executable, "benchmarks/merge_memory.py", "--model-config", config, "--out", str(out)]
    command += ["--estimate", "benchmarks/configs/qwen2.5-7b.json"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured, estimates = json.loads(out.read_text())["measured"], json.loads(out.read_text())["estimates"]
    assert measured["peak_rss_gb"] > measured["imports_rss_gb"] > 0 and measured["saved_gb"] > 0
    assert [(e["dtype"], e["parameters"]) for e in estimates] == [("bfloat16", 7615616512), ("float32", 7615616512)]
    bfloat16 = estimates[0]
    assert bfloat16["full_copy_gb"] == pytest.approx(15.23, abs=0.01)
    assert bfloat16["bound_gb"] == pytest.approx(2 * 15.23 + measured["imports_rss_gb"], abs=0.01)
