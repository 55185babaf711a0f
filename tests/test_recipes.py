"""The recipe contract: every setting of every recipe in `recipes/` that moves memory or quality takes effect.

Each recipe is parsed by `trl-qaloss train`'s own parser; only the model (a tiny one of the same family, built from
the real model's config with small sizes; the demo keeps its shipped tiny Llama) and the data (a few demo rows) are
swapped, plus what one short CPU run needs (`max_steps: 1`, `use_cpu` for the bf16 recipes, no saving). The trainer
is built as the command builds it, trains one step, and the test reads back from the model, its layers and the
optimizer what the recipe asked for. Runs in both CI lanes (the newest releases and the declared floors).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from tests.testing_utils import slow
from trl_qaloss.cli.training import build_trainer, parse_args
from trl_qaloss.compat import installed_versions, is_checkpointing
from trl_qaloss.demo import DATA_DIR, MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# The real config of each hub model a recipe names (read offline); the test shrinks it to a tiny model of that family.
MODEL_CONFIGS = {
    "Qwen/Qwen2.5-0.5B-Instruct": ROOT / "benchmarks" / "configs" / "qwen2.5-0.5b.json",
    "Qwen/Qwen2.5-7B-Instruct": ROOT / "benchmarks" / "configs" / "qwen2.5-7b.json",
    "Qwen/Qwen2.5-72B-Instruct": ROOT / "benchmarks" / "configs" / "qwen2.5-72b.json",
}
TINY_SIZES = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
LINEAR_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
ROWS = 16  # one optimizer step of every recipe: per_device_train_batch_size x gradient_accumulation_steps rows


def tiny_model_dir(model_name: str, directory: Path) -> str:
    """A tiny random model of `model_name`'s family (its real config, small sizes) with the demo's tokenizer, saved."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if model_name.startswith("trl_qaloss/demo/"):
        return model_name  # the shipped tiny Llama
    assert model_name in MODEL_CONFIGS, f"add the config.json of {model_name} to benchmarks/configs and MODEL_CONFIGS"
    values = json.loads(MODEL_CONFIGS[model_name].read_text())
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    values.update(TINY_SIZES, vocab_size=len(tokenizer), max_window_layers=2, use_sliding_window=False)
    values.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config = AutoConfig.for_model(**values)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def few_rows(directory: Path) -> str:
    directory.mkdir()
    for source, target in (("train.jsonl", "train.jsonl"), ("eval.jsonl", "test.jsonl")):
        lines = (DATA_DIR / source).read_text().splitlines()[:ROWS]
        (directory / target).write_text("\n".join(lines) + "\n")
    return str(directory)


def optimizer_of(trainer):
    optimizer = trainer.optimizer
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper


def check_optimizer(name: str, optimizer) -> None:
    import bitsandbytes as bnb

    if name == "paged_adamw_8bit":
        assert isinstance(optimizer, bnb.optim.AdamW), type(optimizer)
        assert optimizer.is_paged and optimizer.args.optim_bits == 8
    elif name in ("adamw_torch", "adamw_torch_fused"):
        assert type(optimizer) is torch.optim.AdamW, type(optimizer)
        assert bool(optimizer.defaults.get("fused")) == (name == "adamw_torch_fused")
    else:
        pytest.fail(f"the recipe contract does not know optimizer {name!r} yet: add its check here")


def check_4bit_and_lora(config: dict, model) -> None:
    """With `load_in_4bit`: 4-bit on every linear layer of the decoder, with the recipe's quant type, double
    quantization, compute and storage dtypes; without it, no 4-bit layer and the decoder's linear layers in the recipe's
    dtype. The rest in the recipe's dtype; LoRA of the recipe's rank, alpha and dropout on each decoder linear layer."""
    import bitsandbytes as bnb

    base = model.get_base_model()
    dtype = getattr(torch, config["dtype"])
    # LoRA wraps each linear layer it adapts: `...q_proj.base_layer` is the original layer of `...q_proj`
    wrapped = {name.removesuffix(".base_layer"): m for name, m in base.named_modules() if name.endswith(".base_layer")}
    four_bit = {name: m for name, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    if not config.get("load_in_4bit"):
        assert not four_bit and all(m.weight.dtype == dtype for m in wrapped.values())
        adapted = set(wrapped)
        assert {name.rsplit(".", 1)[-1] for name in adapted} == LINEAR_NAMES
    else:
        adapted = {name.removesuffix(".base_layer") for name in four_bit if name.endswith(".base_layer")}
        four_bit = {name.removesuffix(".base_layer"): m for name, m in four_bit.items()}
        assert four_bit and {name.rsplit(".", 1)[-1] for name in four_bit} == LINEAR_NAMES
        storage = getattr(torch, config.get("bnb_4bit_quant_storage", "uint8"))
        for name, layer in four_bit.items():
            assert layer.weight.quant_type == config["bnb_4bit_quant_type"], name
            assert layer.weight.quant_state.nested == config["use_bnb_nested_quant"], name
            assert layer.compute_dtype == dtype and layer.weight.dtype == storage, name
    assert base.get_input_embeddings().weight.dtype == dtype
    if "attn_implementation" in config:
        assert base.config._attn_implementation == config["attn_implementation"]
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (
        config["lora_r"],
        config["lora_alpha"],
        config["lora_dropout"],
    )
    assert config["lora_target_modules"] == "all-linear" and adapted == set(four_bit or wrapped)
    assert all(p.requires_grad == ("lora_" in n or "trainable_tokens" in n) for n, p in model.named_parameters())


# One recipe in the fast tier (the one-GPU 7B QLoRA recipe, the quickest to build); every recipe with RUN_SLOW=1.
FAST_RECIPE = "qwen2.5-7b-instruct-qlora.yaml"


@pytest.mark.parametrize(
    "recipe", [pytest.param(r, marks=() if r.name == FAST_RECIPE else slow) for r in RECIPES], ids=lambda p: p.name
)
def test_recipe_settings_take_effect(recipe, tmp_path):
    config = yaml.safe_load(recipe.read_text())
    swapped = [
        *("--model_name_or_path", tiny_model_dir(config["model_name_or_path"], tmp_path / "model")),
        *("--dataset_name", few_rows(tmp_path / "rows")),
        *("--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--logging_steps", "1"),
        *("--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"),
        *(["--use_cpu", "true"] if config.get("bf16") else []),
    ]
    versions = installed_versions()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # As `trl-qaloss` does: PEFT reads a property newer transformers releases call deprecated.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        trainer, _ = build_trainer(*parse_args(["--config", str(recipe), *swapped]))
        # before training: bitsandbytes repacks 4-bit weights for its CPU kernels on their first use
        check_4bit_and_lora(config, trainer.model)
        trainer.train()
    deprecated = [
        str(w.message) for w in caught if "deprecated" in str(w.message) and "checkpointing" in str(w.message)
    ]
    assert not deprecated, (deprecated, versions)

    # activation checkpointing: on the model, with the recipe's keyword arguments
    wanted = config.get("activation_checkpointing", True)  # TRL's default is on
    assert is_checkpointing(trainer.model) == wanted, (recipe.name, versions)
    if "activation_checkpointing_kwargs" in config:
        assert trainer.args.activation_checkpointing_kwargs == config["activation_checkpointing_kwargs"]
        layer = trainer.model.get_base_model().model.layers[0]
        for key, value in config["activation_checkpointing_kwargs"].items():
            assert layer._gradient_checkpointing_func.keywords[key] == value, (key, versions)
    # the optimizer, the rows' length, the loss
    check_optimizer(config.get("optim", trainer.args.optim), optimizer_of(trainer))
    assert trainer.args.max_length == config["max_length"]
    assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) <= config["max_length"]
    assert trainer.args.answer_order == config["answer_order"] and trainer.args.lambda_set == config["lambda_set"]
    assert trainer.separators is not None  # the answers are parsed: reordered, and scored when lambda_set > 0
    logged = trainer.state.log_history[0]
    assert ("set_loss" in logged) == (config["lambda_set"] > 0), logged
