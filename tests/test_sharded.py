"""Sharded training: the DeepSpeed ZeRO-3 launch line of recipes/README.md on 2 CPU processes gives the one-process
step, for every answer order and set-loss weight, with LoRA and with 4-bit QLoRA; its adapter generates like the
one-process adapter, and a run resumed from its checkpoint reproduces the next step. FSDP needs GPUs (see
`FSDP_ON_CPU`).

Each launch runs the line of recipes/README.md as written, with what it says a CPU run adds (`CPU_LAUNCH_FLAGS`,
`CPU_TRAIN_FLAGS`) and the tiny model, data and step count swapped in.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.sharded_worker import SETTINGS, VARIANTS, run
from tests.testing_utils import run_cli, slow

pytestmark = slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "recipes" / "README.md"
ZERO3 = "zero3-qlora.yaml"
FSDP = "fsdp-qlora.yaml"
# What recipes/README.md says a CPU-only machine adds to the launch line: no bf16 (there is no bf16 on CPU without
# `use_cpu`, which turns DeepSpeed off), so no bf16 in DeepSpeed either, and gloo between the processes.
CPU_LAUNCH_FLAGS = ["--mixed_precision", "no"]
CPU_TRAIN_FLAGS = ["--bf16", "false", "--ddp_backend", "gloo"]
# The tiny model and data shipped with the package, in place of the recipe's 7B model.
SWAPS = ["--model_name_or_path", "trl_qaloss/demo/model", "--dataset_name", "trl_qaloss/demo/data", "--max_steps", "2"]
# What the tests add to read each step: a checkpoint and a log line per step, no progress bars.
OBSERVE = ["--save_steps", "1", "--logging_steps", "1", "--disable_tqdm", "true"]

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (`pip install deepspeed`): the ZeRO-3 recipe needs it.",
)
FSDP_ON_CPU = (
    "accelerate's FSDP plugin needs GPUs (or another accelerator): without one, the FSDP launch line fails with "
    "`RuntimeError: There are currently no available devices found, must be one of 'XPU', 'CUDA', 'MLU', 'NPU', "
    "'MUSA', or 'HPU'.` (accelerate's FullyShardedDataParallelPlugin, `fsdp_sync_module_states: true`), and with that "
    "setting off and ACCELERATE_USE_CPU=true accelerate would train without FSDP, which `train` refuses at start-up "
    "(tests/test_compat.py): accelerate enables FSDP only on accelerators."
)


def readme_launch_line(config: str) -> list[str]:
    """The `accelerate launch` line recipes/README.md gives for `recipes/accelerate/<config>`, split into words."""
    pattern = rf"`(accelerate launch --config_file recipes/accelerate/{re.escape(config)} [^`]+)`"
    lines = set(re.findall(pattern, README.read_text()))
    assert len(lines) == 1, f"recipes/README.md gives {len(lines)} launch lines for {config}"
    return shlex.split(lines.pop())


def cpu_command(config: str) -> tuple[list[str], list[str]]:
    """`(launcher, command)`: recipes/README.md's launch line for `config` with the CPU flags and the swaps, split
    before `-m trl_qaloss train`."""
    words = readme_launch_line(config)
    assert words[:2] == ["accelerate", "launch"]
    start = words.index("-m")
    return [*words[:start], *CPU_LAUNCH_FLAGS], [*words[start:], *CPU_TRAIN_FLAGS, *SWAPS]


def launch(config: str, done: Path, program: list[str] | None = None, extra: list[str] = (), timeout: int = 600):
    """Run `cpu_command(config)` on 2 CPU processes, with `extra` after it, or with `program` in place of its
    `-m trl_qaloss train ...` part, until the run has written `done`, its last output, and exited 0 (a scheduler reads
    the exit code). Returns the CompletedProcess."""
    launcher, command = cpu_command(config)
    # `--main_process_port 0`: any free port, so that runs never collide.
    argv = [sys.executable, "-m", "accelerate.commands.launch", *launcher[2:], "--main_process_port", "0"]
    argv += program if program is not None else [*command, *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "TRL_QALOSS_DEBUG")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # A session of its own, so that a hang kills the launcher's workers too, not only the launcher.
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"accelerate launch did not finish in {timeout} s:\n{stdout[-3000:]}{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    assert done.is_file(), f"{done} was not written"
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def test_the_readme_gives_the_launch_lines_the_tests_run():
    for config in (ZERO3, FSDP):
        words = readme_launch_line(config)
        assert words[-3:] == ["train", "--config", "recipes/qwen2.5-7b-instruct-qlora-sharded.yaml"]
        assert (ROOT / "recipes" / "accelerate" / config).is_file()
    # The CPU command recipes/README.md shows is the one `launch` runs.
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    shown = [shlex.split(block.replace("\\\n", " ")) for block in blocks]
    launcher, command = cpu_command(ZERO3)
    assert [*launcher, *command] in shown


# --- One step of every setting: ZeRO-3 on 2 processes against one process -------------------------------------


@pytest.fixture(scope="module")
def zero3_steps(tmp_path_factory):
    """`(one process, two processes)`: each `{variant: {setting: result of train_one_step}}`."""
    out = tmp_path_factory.mktemp("zero3_steps")
    worker = [str(ROOT / "tests" / "sharded_worker.py"), str(out / "two"), "2"]
    launch(ZERO3, out / "two" / "results.pt", program=worker)
    two = torch.load(out / "two" / "results.pt")
    one = run(out / "one", 1)
    return one, two


def assert_same_gradient(got, expected, variant: str, msg: str) -> None:
    """LoRA: the DDP test's tolerance. QLoRA: TRL keeps its LoRA weights, and so their gradients, in bfloat16, and
    the processes add theirs in another order than one process: within two bfloat16 roundings of the tensor's
    largest entry (a sum that cancels out keeps the rounding of its terms)."""
    if variant == "lora":
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=msg)
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=2**-6 * float(expected.abs().max()) + 1e-9, msg=msg)


@needs_deepspeed
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero3_two_processes_give_the_one_process_step(zero3_steps, variant):
    one, two = zero3_steps
    for name in SETTINGS:
        expected, got = one[variant][name], two[variant][name]
        assert got["sharded"] and got["world_size"] == 2 and not expected["sharded"], name
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4), name
        assert got["grads"].keys() == expected["grads"].keys()
        assert any(g.abs().sum() > 0 for g in expected["grads"].values()), name
        for param, grad in expected["grads"].items():
            assert_same_gradient(got["grads"][param], grad, variant, f"{name}: {param}")
    # The set term changes the step.
    assert one[variant]["data_set1"]["loss"] != pytest.approx(one[variant]["data_set0"]["loss"], rel=1e-3)


@needs_deepspeed
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero3_orders_the_answers_like_one_process(zero3_steps, variant):
    """Under ZeRO-3 "preferred" and "aligned" score through the wrapped model's forward (the parameters exist only
    as shards outside it); the rows each step trained on are those one process, calling backbone and LM head apart,
    trains on."""
    one, two = zero3_steps
    for name in SETTINGS:
        assert two[variant][name]["rows"] == one[variant][name]["rows"], name
    for order in ("preferred", "aligned"):  # the model moves answers: the orders are read from it
        assert one[variant][f"{order}_set0"]["rows"] != one[variant]["data_set0"]["rows"], order


# --- The recipe's command: train, save, generate, resume --------------------------------------------------------

# Completions are compared in float32 without 4 bits: TRL keeps QLoRA's LoRA weights in bfloat16, so 2 processes and
# 1 add the bfloat16 gradients in another order, and AdamW's first updates, about +-learning rate whatever the size of
# a gradient, take the other sign for some near-zero ones; a few tokens into a completion, greedy decoding diverges.
FLOAT32 = ["--load_in_4bit", "false", "--dtype", "float32"]
PROMPTS = [
    json.loads(row)["context"]
    for row in (ROOT / "trl_qaloss" / "demo" / "data" / "eval.jsonl").read_text().splitlines()[:4]
]


@pytest.fixture(scope="module")
def zero3_cli(tmp_path_factory):
    """Output directories of: the ZeRO-3 launch line for 2 steps ("two"), the same resumed from its first checkpoint
    ("resumed"); the launch line in float32 without 4 bits ("two_fp32") and the same recipe on one process with the
    same 16 rows a step, 2 rows x 8 micro-batches ("one_fp32")."""
    out = tmp_path_factory.mktemp("zero3_cli")
    resume = ["--resume_from_checkpoint", str(out / "two" / "checkpoint-1")]
    for name, extra in (("two", []), ("resumed", resume), ("two_fp32", FLOAT32)):
        # `trl_qaloss_base.json` is the last file `trl-qaloss train` writes.
        launch(ZERO3, out / name / "trl_qaloss_base.json", extra=["--output_dir", str(out / name), *OBSERVE, *extra])
    _, command = cpu_command(ZERO3)
    one = command[2:]  # without `-m trl_qaloss`, and without `--ddp_backend gloo`: there are no processes to join
    del one[one.index("--ddp_backend") : one.index("--ddp_backend") + 2]
    extra = ["--output_dir", str(out / "one_fp32"), "--gradient_accumulation_steps", "8", *OBSERVE, *FLOAT32]
    result = run_cli(*one, *extra, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def logged_steps(output_dir: Path) -> dict[int, dict]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry for entry in history if "loss" in entry}


def generate(adapter: Path) -> list[str]:
    """`trl-qaloss generate --adapter ...`'s greedy completions of `PROMPTS`."""
    prompts = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    result = run_cli("generate", "--adapter", str(adapter), *prompts, "--max_new_tokens", "32", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line)["completion"] for line in result.stdout.splitlines()]


@needs_deepspeed
def test_zero3_launch_line_saves_a_4bit_adapter_that_generate_loads(zero3_cli):
    from safetensors.torch import load_file

    assert sorted(logged_steps(zero3_cli / "two")) == [1, 2]
    base = json.loads((zero3_cli / "two" / "trl_qaloss_base.json").read_text())
    assert base["quantization_config"]["bnb_4bit_quant_storage"] == "bfloat16"
    adapter = load_file(zero3_cli / "two" / "adapter_model.safetensors")
    assert len(adapter) == 28  # 2 layers x 7 linear layers x (A, B), each whole: gathered from the shards
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)  # trained (B starts at 0)
    completions = generate(zero3_cli / "two")
    assert len(completions) == len(PROMPTS) and all(completions)


@needs_deepspeed
def test_zero3_adapter_generates_like_the_one_process_adapter(zero3_cli):
    two, one = logged_steps(zero3_cli / "two_fp32"), logged_steps(zero3_cli / "one_fp32")
    for step in (1, 2):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5), step
    assert generate(zero3_cli / "two_fp32") == generate(zero3_cli / "one_fp32")


@needs_deepspeed
def test_zero3_resume_from_a_sharded_checkpoint_reproduces_the_next_step(zero3_cli):
    uninterrupted, resumed = logged_steps(zero3_cli / "two"), logged_steps(zero3_cli / "resumed")
    assert sorted(resumed) == [1, 2]  # step 1 as the checkpoint logged it, step 2 trained again
    for key in ("loss", "grad_norm", "mean_token_accuracy"):
        assert resumed[2][key] == pytest.approx(uninterrupted[2][key], rel=1e-5), key


# --- FSDP ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason=FSDP_ON_CPU)
def test_fsdp_launch_line_trains_and_saves_the_adapter(tmp_path):
    """On 2+ GPUs: the FSDP launch line of recipes/README.md, as written (bf16), trains 2 steps and saves the adapter.

    Not run on CPU-only machines (see `FSDP_ON_CPU`)."""
    words = readme_launch_line(FSDP)
    start = words.index("-m")
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "accelerate.commands.launch", *words[2:start], "--main_process_port", "0"]
    argv += [*words[start:], *SWAPS, "--output_dir", str(tmp_path), *OBSERVE]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "adapter_model.safetensors").is_file() and sorted(logged_steps(tmp_path)) == [1, 2]
