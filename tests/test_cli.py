"""The `trl-qaloss` command and the recipes: parsing, the offline demo end to end, and the same run on 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.testing_utils import nf4_quantization, slow
from trl_qaloss.cli import main
from trl_qaloss.cli.training import make_parser, model_init_kwargs, parse_args
from trl_qaloss.demo import DEFAULT_RECIPE, MODEL_DIR
from trl_qaloss.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
DEMO = ROOT / "recipes" / "demo-cpu.yaml"
# Reduced demo: what the end-to-end tests run instead of the full recipe; with the set loss on, so that these runs
# (one process and two) cover its path, and the final evaluation's completions cut to 4 rows.
SHORT = ["--max_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true", "--max_length", "96"]
SHORT += ["--lambda_set", "1", "--eval_generate_samples", "4"]


def write_recipe(tmp_path, text: str, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"demo-cpu.yaml", "qwen2.5-7b-instruct-qlora.yaml", "qwen2.5-72b-instruct-qlora.yaml"} <= names
    assert {p.name for p in ACCELERATE_CONFIGS} == {"ddp.yaml", "fsdp-qlora.yaml", "zero3-qlora.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(recipe):
    config = yaml.safe_load(recipe.read_text())
    # bf16 recipes are for GPUs; on this CPU-only machine transformers refuses bf16 unless use_cpu is set. Flags
    # override the YAML, every other value is the recipe's own.
    flags = ["--use_cpu", "true"] if config.get("bf16") else []
    script_args, training_args, model_args, _ = parse_args(["--config", str(recipe), *flags])
    assert model_args.model_name_or_path and script_args.dataset_name
    if "qlora" in recipe.name or recipe.name == "demo-cpu.yaml":
        assert model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "nf4" and model_args.use_bnb_nested_quant
    assert model_args.use_peft and model_args.lora_target_modules == "all-linear"
    assert training_args.trust_remote_code is False
    # every key of the recipe reached a parsed field with the recipe's value
    parsed = {**vars(script_args), **vars(model_args)}
    for key, value in config.items():
        got = parsed.get(key, getattr(training_args, key, None))
        if key in ("model_name_or_path", "dataset_name") and value.startswith("trl_qaloss/demo/"):
            assert os.path.exists(got), got  # resolved into the installed package
        elif key == "report_to":
            assert value == "none" and got in ([], "none", ["none"]), got
        else:
            assert getattr(got, "value", got) == value, (key, got, value)  # enum fields hold the YAML string


def test_real_model_recipes_use_the_qlora_settings():
    for recipe in RECIPES:
        if "qlora" not in recipe.name:
            continue
        text = recipe.read_text()
        _, training_args, model_args, _ = parse_args(["--config", str(recipe), "--use_cpu", "true"])
        assert model_args.dtype == "bfloat16" and training_args.bf16 and training_args.gradient_checkpointing
        assert training_args.lr_scheduler_type == "cosine" and training_args.max_length
        assert "GPU memory" in text
        if "sharded" in recipe.name:  # no multi-GPU machine measured it yet
            assert model_args.bnb_4bit_quant_storage == "bfloat16" and "ESTIMATED" in text
        else:
            assert training_args.optim == "paged_adamw_8bit" and "MEASURED" in text


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load_with_accelerates_loader(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.num_processes == 2 and loaded.mixed_precision in ("no", "bf16")
    if config.name == "fsdp-qlora.yaml":
        assert loaded.distributed_type == "FSDP" and loaded.fsdp_config["fsdp_use_orig_params"] is False
    if config.name == "zero3-qlora.yaml":
        assert loaded.distributed_type == "DEEPSPEED" and loaded.deepspeed_config["zero_stage"] == 3


def test_embedded_default_recipe_is_recipes_demo_cpu():
    assert DEFAULT_RECIPE.read_bytes() == DEMO.read_bytes()
    script_args, training_args, model_args, _ = parse_args([])
    assert model_args.model_name_or_path == str(MODEL_DIR) and training_args.output_dir == "outputs/demo-cpu"
    assert training_args.use_cpu and model_args.load_in_4bit


def test_flags_override_the_recipe_and_unknown_keys_fail(tmp_path):
    _, training_args, _, _ = parse_args(["--config", str(DEMO), "--max_steps", "3", "--lambda_set", "0.5"])
    assert training_args.max_steps == 3 and training_args.lambda_set == 0.5
    bad_key = write_recipe(tmp_path, DEMO.read_text() + "lamda_set: 0.5\n")
    with pytest.raises(ValueError, match="Unknown field `lamda_set` in .*recipe.yaml. Did you mean `lambda_set`"):
        parse_args(["--config", bad_key])
    bad_type = write_recipe(tmp_path, DEMO.read_text().replace("max_steps: 720", "max_steps: many"), "t.yaml")
    with pytest.raises(UsageError, match="argument --max_steps/--max-steps: invalid int value: 'many'"):
        parse_args(["--config", bad_type])
    with pytest.raises(ValueError, match="Unknown field `no_such_flag` on the command line"):
        parse_args(["--config", str(DEMO), "--no_such_flag", "1"])


def test_recipes_are_read_with_safe_yaml(tmp_path):
    evil = write_recipe(tmp_path, "output_dir: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(yaml.constructor.ConstructorError):
        make_parser().parse_args_and_config(["--config", evil])


def test_trust_remote_code_is_off_unless_the_recipe_sets_it(tmp_path):
    _, training_args, model_args, _ = parse_args(["--config", str(DEMO)])
    assert model_init_kwargs(training_args, model_args)["trust_remote_code"] is False
    trusting = write_recipe(tmp_path, DEMO.read_text() + "trust_remote_code: true\n")
    _, training_args, model_args, _ = parse_args(["--config", trusting])
    assert model_init_kwargs(training_args, model_args)["trust_remote_code"] is True


def test_version_names_the_release_and_the_stack(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    out = capsys.readouterr().out.strip()
    assert exit_.value.code == 0 and out.startswith(f"trl-qaloss {metadata.version('trl-qaloss')} (torch ")
    assert f"transformers {metadata.version('transformers')}, trl {metadata.version('trl')}" in out


def test_usage_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "trl-qaloss <command>" in capsys.readouterr().out
    for argv, message in (([], "No command given."), (["trian"], "Unknown command 'trian'. Did you mean `train`?")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.startswith(f"trl-qaloss: error: {message}") and err.count("\n") == 1


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo recipe, 2 steps of batch 8, in this process: `(trainer, output_dir, printed text)`."""
    from trl_qaloss.cli.training import train

    out = tmp_path_factory.mktemp("demo")
    # Without the recipe's final evaluation: on CPU, bitsandbytes' inference path rewrites the 4-bit weights' quant
    # state in place during that evaluation, so the in-memory model would no longer match a reload of the saved adapter.
    args = parse_args(
        [
            "--config",
            str(DEMO),
            "--output_dir",
            str(out),
            "--per_device_train_batch_size",
            "8",
            *SHORT,
            "--eval_strategy",
            "no",
        ]
    )
    trainer = train(*args)
    return trainer, out


def test_demo_trains_4bit_qlora_and_saves_the_adapter(demo_run):
    from bitsandbytes.nn import Linear4bit
    from peft.tuners.lora import LoraLayer

    trainer, out = demo_run
    model = trainer.model
    linear4bit = [m for m in model.modules() if isinstance(m, Linear4bit)]
    lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(linear4bit) == 14 and len(lora) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert linear4bit[0].weight.quant_state.quant_type == "nf4" and linear4bit[0].weight.quant_state.nested
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    logs = [log for log in trainer.state.log_history if "set_loss" in log]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor([log["loss"], log["set_loss"]])).all() for log in logs)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["log_history"][0]["loss"] == trainer.state.log_history[0]["loss"]


def test_the_summary_shows_the_last_evaluation(demo_run):
    """After a run that evaluated more than once, the table printed at the end is the last evaluation's."""
    from trl_qaloss.callbacks import QASetEvalCallback
    from trl_qaloss.cli.training import SUMMARY_METRICS, run_summary

    trainer, out = demo_run
    # The run had no evaluation: its training rows stand in for the held-out ones, for the callback whose examples
    # the summary prints.
    eval_dataset, trainer.eval_dataset = trainer.eval_dataset, trainer.train_dataset
    callback = QASetEvalCallback(trainer)
    trainer.add_callback(callback)
    saved = list(trainer.state.log_history), callback.last_examples
    try:
        for value in (0.111, 0.999):  # two evaluations, the later one last in the log
            trainer.state.log_history.append({f"eval_{name}": value for name in SUMMARY_METRICS})
        callback.last_examples = [
            ("Tell me about valdor.", "<QA> which rivers? <A> a", "<QA> which rivers? <A> a", False),
            ("Tell me about getal.", "<QA> who rules? <A> Julie Sussman", "<QA> who rules? <A> Julie", True),
        ]
        _, training_args, model_args, _ = parse_args(["--config", str(DEMO), "--output_dir", str(out)])
        text = run_summary(trainer, training_args, model_args, heldout_recorded=True)
    finally:
        trainer.state.log_history[:], callback.last_examples = saved
        trainer.remove_callback(callback)
        trainer.eval_dataset = eval_dataset
    assert "exact_set_match     0.999" in text and "0.111" not in text
    assert "    who rules  Julie Sussman  Julie ... (cut by max_length)" in text.splitlines()  # the reference was cut
    assert "    which rivers  a          a" in text.splitlines()
    # the run's own rows, recorded; then one model directory to serve
    assert text.splitlines()[-2:] == [
        f"  trl-qaloss evaluate --adapter {out}",
        f"  trl-qaloss merge --adapter {out} --output {out}-merged",
    ]


def test_saved_adapter_reloads_onto_the_4bit_base_with_the_same_logits(demo_run):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, out = demo_run
    # TRL keeps QLoRA adapters in bf16 (the QLoRA paper's choice), so they are saved in bf16 ...
    saved = load_file(out / "adapter_model.safetensors")
    assert len(saved) == 28 and {t.dtype for t in saved.values()} == {torch.bfloat16}
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    batch = tokenizer(["Tell me about vobipol: its ruler. <QA> who rules vobipol? <A>"], return_tensors="pt")
    quantization = nf4_quantization(torch.float32)
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, quantization_config=quantization, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    # ... and PEFT loads them upcast to fp32; back in bf16 they compute exactly as during training.
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    trained = trainer.model.eval()
    with torch.no_grad():
        expected, got = trained(**batch).logits, reloaded(**batch).logits
        with reloaded.disable_adapter():
            base_logits = reloaded(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (base_logits - expected).abs().max() > 1e-3  # the adapter changes the model: it was trained


@slow
def test_accelerate_launch_2_processes_matches_one_process(demo_run, tmp_path):
    """`accelerate launch --num_processes 2` on CPU (gloo), 2 x 4 rows per step; the first step is the same global
    batch of 8 as the one-process run, so the first logged losses agree."""
    trainer, _ = demo_run
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    ddp = str(ROOT / "recipes" / "accelerate" / "ddp.yaml")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        ddp,
        "--num_processes",
        "2",
        "--main_process_port",
        "29517",
        "-m",
        "trl_qaloss",
        "train",
        "--config",
        str(DEMO),
        "--output_dir",
        str(tmp_path),
        "--per_device_train_batch_size",
        "4",
        *SHORT,
    ]
    # A session of its own, so that a hang kills the launcher's workers too, not only the launcher.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("accelerate launch did not finish in 300 s:\n" + stdout[-3000:] + stderr[-3000:])
    # A run that trained and saved must also exit 0: a scheduler reads the exit code.
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    assert "LoRA adapter saved to" in stdout and (tmp_path / "adapter_model.safetensors").is_file()
    first = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"][0]
    expected = trainer.state.log_history[0]
    for key in ("loss", "ce_loss", "set_loss"):
        assert first[key] == pytest.approx(expected[key], rel=1e-4), key
    assert first["set/target_answers"] == expected["set/target_answers"]


def test_init_from_config_builds_random_weights_at_the_configs_size(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    from trl_qaloss.cli.training import model_from_config

    _, training_args, model_args, _ = parse_args(["--output_dir", str(tmp_path), "--init_from_config", "true"])
    shipped = load_file(MODEL_DIR / "model.safetensors")
    model = model_from_config(model_args, training_args, None)
    weights = dict(model.named_parameters())
    assert {k: v.shape for k, v in shipped.items()} == {k: weights[k].shape for k in shipped}
    assert not torch.equal(weights["lm_head.weight"], shipped["lm_head.weight"])
    # with 4-bit, the random weights are written once, then quantized on loading like real ones
    path = model_from_config(model_args, training_args, get_quantization_config(model_args))
    assert path == str(tmp_path / "init-from-config") and (tmp_path / "init-from-config" / "tokenizer.json").is_file()
    written = load_file(tmp_path / "init-from-config" / "model.safetensors")
    assert not torch.equal(written["lm_head.weight"], shipped["lm_head.weight"])
    assert AutoModelForCausalLM.from_pretrained(path).config.hidden_size == model.config.hidden_size


@slow
def test_resume_true_in_a_recipe_resumes_from_the_last_complete_checkpoint(tmp_path):
    """`resume_from_checkpoint: true` (a string to the parser) resumes, and skips a half-written checkpoint."""
    from trl_qaloss.cli.training import train

    out = tmp_path / "run"
    common = ["--config", str(DEMO), "--output_dir", str(out), "--per_device_train_batch_size", "4", *SHORT]
    train(*parse_args([*common, "--save_strategy", "steps", "--save_steps", "1"]))
    # A run killed while saving checkpoint-2: its trainer_state.json, written last, is missing.
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    _, training_args, _, _ = parse_args([*common, "--resume_from_checkpoint", "true", "--max_steps", "3"])
    assert training_args.resume_from_checkpoint == "true"
    trainer = train(*parse_args([*common, "--resume_from_checkpoint", "true", "--max_steps", "3"]))
    steps = [log["step"] for log in trainer.state.log_history if "set_loss" in log]
    assert trainer.state.global_step == 3 and steps == [1, 2, 3]  # step 1 from checkpoint-1, then 2 and 3 again


def imported_modules(code: str) -> set[str]:
    """The modules a fresh interpreter has imported after running `code` on this checkout."""
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return set(result.stdout.split())


HEAVY = {"torch", "transformers.modeling_utils", "transformers.training_args", "peft", "trl_qaloss.trainer"}


def test_the_command_line_module_imports_nothing_heavy():
    """`trl_qaloss.cli` imports torch, transformers' models, peft and the trainer only in the command that runs, so
    `trl-qaloss --help` answers at once. It is loaded here without the package's `__init__`, which imports the
    trainer for `from trl_qaloss import QALossSFTTrainer`."""
    package = ROOT / "trl_qaloss"
    modules = imported_modules(
        f"import types\npackage = types.ModuleType('trl_qaloss')\npackage.__path__ = [{str(package)!r}]\n"
        "sys.modules['trl_qaloss'] = package\nimport trl_qaloss.cli"
    )
    assert "trl_qaloss.cli" in modules and not HEAVY & modules, HEAVY & modules


def test_help_imports_no_torch():
    """`python -m trl_qaloss --help`, as `trl-qaloss --help` runs it, imports no torch (and so answers fast)."""
    if "torch" in imported_modules("import trl_qaloss"):
        pytest.skip("trl_qaloss/__init__.py imports the trainer, and so torch, eagerly")
    modules = imported_modules(
        "sys.argv = ['trl-qaloss', '--help']\nimport runpy\ntry:\n"
        "    runpy.run_module('trl_qaloss', run_name='__main__')\nexcept SystemExit:\n    pass"
    )
    assert not HEAVY & modules, HEAVY & modules


def test_config_works_on_a_cpu_only_machine_and_the_model_may_be_a_path(tmp_path):
    """`QALossConfig(output_dir=...)` with TRL's default bf16, and `model` given as a `Path` (the README's example)."""
    from trl_qaloss import QALossConfig, QALossSFTTrainer

    args = QALossConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], save_strategy="no")
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert args.bf16 is gpu_bf16 and args.answer_order == "canonical" and args.lambda_set == 0
    assert QALossConfig(output_dir=str(tmp_path), bf16=False).bf16 is False
    # Training on the CPU by choice keeps TRL's bf16 default: transformers accepts bf16 there.
    assert QALossConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is True
    rows = [json.loads(line) for line in (ROOT / "trl_qaloss/demo/data/train.jsonl").read_text().splitlines()[:8]]
    from datasets import Dataset

    trainer = QALossSFTTrainer(model=MODEL_DIR, args=args, train_dataset=Dataset.from_list(rows))
    assert trainer.model.config._name_or_path == str(MODEL_DIR)
