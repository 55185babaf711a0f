"""`recipes/qwen2.5-0.5b-instruct-lora.yaml`, the recipe for a user's own data on one CPU or a small GPU: read by
`trl-qaloss train`'s parser, with the hub model swapped for a tiny Qwen2 of the same architecture built offline, it
builds the trainer and trains one step with the recipe's settings."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tests.testing_utils import ROOT, build_tokenizer, random_model

RECIPE = Path(ROOT, "recipes", "qwen2.5-0.5b-instruct-lora.yaml")


def tiny_qwen2(directory: Path) -> str:
    """A Qwen2 (the architecture of Qwen2.5) with random weights and a BPE tokenizer, saved to `directory`."""
    from transformers import Qwen2Config

    tokenizer = build_tokenizer()
    sizes = dict(max_position_embeddings=1024, tie_word_embeddings=True)  # tied, as in Qwen2.5-0.5B
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    random_model(Qwen2Config, len(tokenizer), **sizes, **ids).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_small_model_recipe_trains_a_tiny_qwen2_with_its_settings(tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from trl_qaloss.cli.training import build_trainer, parse_args

    model_dir = tiny_qwen2(tmp_path / "tiny-qwen2")
    out = tmp_path / "out"
    argv = ["--config", str(RECIPE), "--model_name_or_path", model_dir, "--output_dir", str(out)]
    parsed = parse_args([*argv, "--max_steps", "1", "--eval_strategy", "no", "--disable_tqdm", "true"])
    script_args, training_args, model_args, _ = parsed
    # the recommended configuration, LoRA on a full-precision model (no bitsandbytes), its own output directory
    assert (training_args.lambda_set, training_args.answer_order) == (0.0, "canonical")
    assert model_args.use_peft and not model_args.load_in_4bit and not model_args.load_in_8bit
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_target_modules) == (16, 32, "all-linear")
    assert training_args.max_length == 512 and training_args.learning_rate == 2e-4
    # a recipe that runs as is on a CPU-only machine: bf16 only where a GPU has it
    assert training_args.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())

    trainer, _ = build_trainer(*parsed)
    assert isinstance(trainer.model, PeftModel)
    lora = [m for m in trainer.model.modules() if isinstance(m, LoraLayer)]
    assert len(lora) == 14 and {m.r["default"] for m in lora} == {16}  # 2 layers x (q, k, v, o, gate, up, down)
    trainer.train()
    assert trainer.state.global_step == 1
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
