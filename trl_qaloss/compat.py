"""What differs between the supported releases of transformers, TRL and PEFT, and the start-up check that the settings
asked for took effect.

transformers renamed `gradient_checkpointing` and `gradient_checkpointing_kwargs` to `activation_checkpointing` and
`activation_checkpointing_kwargs` (the old names stay as deprecated aliases). `QALossConfig` takes both spellings on
every supported release and resolves them to one setting: with a release that knows only the old names, the new ones
are copied onto them before transformers reads them, and mirror them afterwards, so that code reading either name sees
the same value and no release warns about a name the user did not write.

accelerate turns a launch's FSDP setting on only where there is an accelerator: `check_fsdp_took_effect` stops a run
that asked for FSDP and would train without it.

`config.py` imports this module, so it imports nothing heavy: the standard library, transformers' `TrainingArguments`
and `TrainerCallback`, and `errors.py`.
"""

from __future__ import annotations

import dataclasses
import os
from importlib import metadata

from transformers import TrainerCallback, TrainingArguments

from .errors import UsageError

# (old name, current name) of the checkpointing settings.
CHECKPOINTING_ALIASES = (
    ("gradient_checkpointing", "activation_checkpointing"),
    ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
)
# Whether the installed transformers knows the current names (it then resolves the aliases itself).
CURRENT_CHECKPOINTING_NAMES = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
VERSIONED_PACKAGES = ("transformers", "trl", "peft", "accelerate", "bitsandbytes", "torch")


def installed_versions(packages=VERSIONED_PACKAGES) -> str:
    """`"transformers 5.17.0, trl 1.16.0, ..."`: the installed releases a setting depends on, for error messages."""
    found = []
    for name in packages:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def check_fsdp_took_effect(fsdp_enabled: bool, distributed_type) -> None:
    """Stops at start-up when `accelerate launch` asked for FSDP (its config sets `ACCELERATE_USE_FSDP`) but
    accelerate did not turn it on: accelerate runs its FSDP plugin only on GPUs or other accelerators, and on CPUs
    (`use_cpu`, `ACCELERATE_USE_CPU`) it would otherwise train unsharded, every process holding the whole model."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true") and not fsdp_enabled:
        raise UsageError(
            f"The launch asks for FSDP (ACCELERATE_USE_FSDP=true), but accelerate did not turn it on (distributed "
            f"type {getattr(distributed_type, 'value', distributed_type)}; {installed_versions(('accelerate',))}): "
            "accelerate shards with FSDP only on GPUs or other accelerators, so every process would hold the whole "
            "model. On CPUs launch with recipes/accelerate/zero3-qlora.yaml (DeepSpeed ZeRO-3 shards on CPUs) or "
            "recipes/accelerate/ddp.yaml; on GPUs, check that each process sees one."
        )


def resolve_checkpointing_names(args) -> None:
    """Before `TrainingArguments.__post_init__`: with a transformers that knows only the old names, set them from the
    current ones (an old name the user set wins, as transformers does with the current names)."""
    if CURRENT_CHECKPOINTING_NAMES:
        return
    for old, new in CHECKPOINTING_ALIASES:
        if getattr(args, old) is None:
            setattr(args, old, getattr(args, new))
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = False


def mirror_checkpointing_names(args) -> None:
    """After `TrainingArguments.__post_init__`: the current names read the resolved setting on every release."""
    if not CURRENT_CHECKPOINTING_NAMES:
        for old, new in CHECKPOINTING_ALIASES:
            setattr(args, new, getattr(args, old))


def checkpointing_values(values: dict) -> dict:
    """The field values of another `TrainingArguments` (`{name: value}`) with the checkpointing settings under their
    current names only: the old ones would read as the deprecated spelling and warn."""
    values = dict(values)
    for old, new in CHECKPOINTING_ALIASES:
        value = values.pop(old, None)
        if values.get(new) is None and value is not None:
            values[new] = value
    return values


def checkpointing_arguments(enabled: bool, kwargs: dict | None = None) -> dict:
    """Keyword arguments turning activation checkpointing on or off in a TRL or transformers config of the installed
    release (`SFTConfig`, `TrainingArguments`), under the name it knows."""
    name = "activation_checkpointing" if CURRENT_CHECKPOINTING_NAMES else "gradient_checkpointing"
    arguments = {name: enabled}
    if kwargs is not None:
        arguments[f"{name}_kwargs"] = kwargs
    return arguments


def is_checkpointing(model) -> bool:
    """Whether `model` (a PEFT model, or one wrapped by accelerate) recomputes its activations in the backward pass."""
    model = base_model(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def base_model(model):
    """The model under a PEFT model and accelerate's wrappers."""
    while hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module  # DDP and similar wrappers
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SettingsCheck(TrainerCallback):
    """Stops at start-up when a memory setting asked for cannot or did not take effect on the model: activation
    checkpointing. Made with the trainer, it refuses a model that does not support checkpointing; at the start of
    training, just after transformers turned checkpointing on, it checks that the model checkpoints."""

    def __init__(self, args=None, model=None):
        if getattr(args, "activation_checkpointing", None) and model is not None:
            base = base_model(model)
            if not getattr(base, "supports_gradient_checkpointing", True):
                raise UsageError(
                    f"`activation_checkpointing` is on, but {type(base).__name__} does not support activation "
                    f"checkpointing ({installed_versions()}). Set `activation_checkpointing: false`."
                )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(args, "activation_checkpointing", None) and model is not None and not is_checkpointing(model):
            raise UsageError(
                f"`activation_checkpointing` is on, but {type(base_model(model)).__name__} does not checkpoint its "
                f"activations with {installed_versions()}: training would use far more memory than the recipe "
                "states. Install a supported release (see the README), or set `activation_checkpointing: false`."
            )
