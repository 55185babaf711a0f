"""Every supported release reads a setting the same way: both spellings of activation checkpointing, and a setting
that does not take effect or is unknown stops the command at start-up, naming the field and the installed releases.

Runs in both CI lanes: the newest releases, and the floors `pyproject.toml` declares.
"""

from __future__ import annotations

import warnings

import pytest
from trl import SFTConfig

from tests.testing_utils import DEMO_RECIPE, SHORT_RUN, config_values, error_lines, run_cli, slow, tiny_llama
from trl_qaloss import QALossConfig
from trl_qaloss.cli.training import parse_args
from trl_qaloss.compat import (
    SettingsCheck,
    check_fsdp_took_effect,
    checkpointing_arguments,
    installed_versions,
    is_checkpointing,
)
from trl_qaloss.config import as_qaloss_config
from trl_qaloss.errors import UsageError

KWARGS = {"use_reentrant": True}


def no_checkpointing_values(tmp_path) -> dict:
    values = config_values(tmp_path)
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        values.pop(name, None)
    return values


@pytest.mark.parametrize("enabled", [True, False])
def test_current_names_work_without_a_warning(tmp_path, enabled):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = QALossConfig(
            **no_checkpointing_values(tmp_path),
            activation_checkpointing=enabled,
            activation_checkpointing_kwargs=dict(KWARGS),
        )
    # both names read the setting, whichever the installed transformers knows
    assert args.activation_checkpointing is enabled and args.gradient_checkpointing is enabled
    assert args.activation_checkpointing_kwargs == KWARGS and args.gradient_checkpointing_kwargs == KWARGS


def test_old_names_mean_the_same(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # newer releases say the old name is deprecated
        args = QALossConfig(
            **no_checkpointing_values(tmp_path), gradient_checkpointing=False, gradient_checkpointing_kwargs=KWARGS
        )
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False
    assert args.activation_checkpointing_kwargs == KWARGS


def test_checkpointing_is_on_by_default_as_in_trl(tmp_path):
    args = QALossConfig(**no_checkpointing_values(tmp_path))
    assert args.activation_checkpointing is True and args.gradient_checkpointing is True


def test_flags_set_both_spellings(tmp_path):
    _, args, _, _ = parse_args(
        ["--output_dir", str(tmp_path), "--activation_checkpointing", "true"]
        + ["--activation_checkpointing_kwargs", '{"use_reentrant": true}']
    )
    assert args.activation_checkpointing and args.gradient_checkpointing
    assert args.activation_checkpointing_kwargs == KWARGS == args.gradient_checkpointing_kwargs


@pytest.mark.parametrize("enabled", [True, False])
def test_an_sft_config_keeps_its_setting(tmp_path, enabled):
    sft = SFTConfig(**no_checkpointing_values(tmp_path), **checkpointing_arguments(enabled))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = as_qaloss_config(sft, None)
    assert args.activation_checkpointing is enabled and args.gradient_checkpointing is enabled


@pytest.mark.parametrize("enabled", [True, False])
def test_checkpointing_arguments_use_the_name_the_release_knows_without_a_warning(tmp_path, enabled):
    """The arguments name the field the installed transformers calls current: the old name, where it is an alias,
    warns that it is deprecated on every config built with it."""
    from dataclasses import fields

    from transformers import TrainingArguments

    arguments = checkpointing_arguments(enabled, dict(KWARGS))
    knows_current = "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}
    current = "activation_checkpointing" if knows_current else "gradient_checkpointing"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        sft = SFTConfig(**no_checkpointing_values(tmp_path), **arguments)
    assert sft.gradient_checkpointing is enabled and sft.gradient_checkpointing_kwargs == KWARGS
    assert arguments == {current: enabled, f"{current}_kwargs": KWARGS}


def test_installed_versions_skip_a_package_that_is_not_installed():
    """A package that is not installed is left out, and the list goes on after it."""
    from importlib.metadata import version

    # The distribution's version, which is not always `torch.__version__` (2.14.1 against 2.14.1+cu130 on PyPI's).
    assert installed_versions(("no-such-package-qaloss", "torch")) == f"torch {version('torch')}"
    assert installed_versions(("no-such-package-qaloss",)) == ""


@pytest.mark.parametrize("value", ["1", "true", "True"])
def test_an_fsdp_launch_that_did_not_shard_stops(monkeypatch, value):
    """accelerate's launch writes `ACCELERATE_USE_FSDP` as `true` from a config, and `1` is as much a yes: either
    stops a run whose FSDP did not take effect."""
    from accelerate.utils import DistributedType

    monkeypatch.setenv("ACCELERATE_USE_FSDP", value)
    with pytest.raises(UsageError, match=r"asks for FSDP .* \(distributed type NO; accelerate 1\."):
        check_fsdp_took_effect(False, DistributedType.NO)
    check_fsdp_took_effect(True, DistributedType.FSDP)  # it took effect
    for unset in ("0", "false"):
        monkeypatch.setenv("ACCELERATE_USE_FSDP", unset)
        check_fsdp_took_effect(False, DistributedType.NO)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_fsdp_took_effect(False, DistributedType.NO)


def test_a_model_that_does_not_checkpoint_stops_training(tmp_path):
    args = QALossConfig(**no_checkpointing_values(tmp_path), activation_checkpointing=True)
    model = tiny_llama(64)
    with pytest.raises(UsageError) as error:
        SettingsCheck().on_train_begin(args, None, None, model=model)
    message = str(error.value)
    assert "\n" not in message and message.startswith("`activation_checkpointing` is on, but LlamaForCausalLM")
    assert installed_versions() in message and "transformers " in message
    # once the model checkpoints, training goes on
    model.gradient_checkpointing_enable()
    assert is_checkpointing(model)
    SettingsCheck().on_train_begin(args, None, None, model=model)


def test_an_unknown_recipe_field_names_the_installed_releases(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(open(DEMO_RECIPE).read() + "activation_checkpointing_kwarg: {}\n")
    with pytest.raises(ValueError, match=r"^Unknown field `activation_checkpointing_kwarg` in .*recipe\.yaml\. ") as e:
        parse_args(["--config", str(recipe)])
    assert "(transformers " in str(e.value) and ", trl " in str(e.value) and "\n" not in str(e.value)


def test_a_model_that_cannot_checkpoint_is_refused_when_the_trainer_is_made(tmp_path, tokenizer):
    from transformers import LlamaForCausalLM

    from tests.testing_utils import qa_config, qa_dataset
    from trl_qaloss import QALossSFTTrainer

    class LlamaWithoutCheckpointing(LlamaForCausalLM):  # a model class that declares no checkpointing support
        supports_gradient_checkpointing = False

    model = LlamaWithoutCheckpointing(tiny_llama(len(tokenizer)).config)
    args = qa_config(tmp_path, **checkpointing_arguments(True))
    with pytest.raises(UsageError, match=r"^`activation_checkpointing` is on, but LlamaWithoutCheckpointing does not "):
        QALossSFTTrainer(model=model, args=args, train_dataset=qa_dataset(8), processing_class=tokenizer)
    # turned off, the same model trains
    args = qa_config(tmp_path, **checkpointing_arguments(False))
    QALossSFTTrainer(model=model, args=args, train_dataset=qa_dataset(8), processing_class=tokenizer).train()


@slow
def test_an_fsdp_launch_that_accelerate_runs_unsharded_stops_at_start_up(tmp_path):
    """An FSDP config launched where accelerate cannot shard with FSDP (a CPU) would train every process on the whole
    model: `train` stops before the first step and says so, naming the releases and the fix."""
    result = run_cli(
        "train", "--config", DEMO_RECIPE, *SHORT_RUN, "--output_dir", str(tmp_path / "out"),
        cwd=tmp_path,
        env={"ACCELERATE_USE_FSDP": "true", "ACCELERATE_USE_CPU": "true"},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    [line] = error_lines(result.stderr)
    assert "asks for FSDP (ACCELERATE_USE_FSDP=true), but accelerate did not turn it on" in line
    assert "accelerate 1." in line and "recipes/accelerate/zero3-qlora.yaml" in line
    assert not (tmp_path / "out" / "checkpoint-1").exists()
