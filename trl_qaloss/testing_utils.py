"""Tiny offline components for tests and benchmarks, as `transformers.testing_utils` holds transformers' own.

Everything here is built on the spot, without the model hub: a byte-level BPE tokenizer trained on random `<QA>`
completions, causal LMs with random weights built from a config, the 4-bit setting of the recipes, and the
`QALossConfig`/`SFTConfig` values of a short CPU run. Nothing imports this module on `import trl_qaloss`.
"""

from __future__ import annotations

import random

import torch

WORDS = (
    "who what where when which wrote built painted discovered founded city river mountain paris london rome berlin "
    "ann bob carl dana eve frank gina hugo iris jack the a of in and"
).split()


def qa_text(rng: random.Random, num_items: int | None = None) -> str:
    """A completion in the `<QA> question? <A> answer` format, with `num_items` (default 1-3) random questions, each
    with 1-4 random answers drawn from `WORDS`."""
    items = []
    for _ in range(num_items or rng.randint(1, 3)):
        question = " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))
        answers = [" ".join(rng.choices(WORDS, k=rng.randint(1, 3))) for _ in range(rng.randint(1, 4))]
        items.append(f"<QA> {question}? " + " ".join(f"<A> {a}" for a in answers))
    return " ".join(items)


def build_tokenizer():
    """A byte-level BPE tokenizer of 600 tokens trained on 400 `qa_text` completions (seed 0), with `<QA>` and `<A>`
    as special tokens; the same tokenizer at every call."""
    from .demo.make_demo import train_bpe_tokenizer

    rng = random.Random(0)
    # Quoted questions teach it tokens that hold `?` with other characters (`?"`), as real tokenizers have.
    texts = [qa_text(rng) for _ in range(400)] + ['what?" he asked. why ? "who?"'] * 20
    return train_bpe_tokenizer(texts, vocab_size=600)


def random_llama(vocab_size: int, seed: int = 0, **sizes):
    """A Llama with random weights drawn after `torch.manual_seed(seed)`; `sizes` override the tiny default sizes."""
    from transformers import LlamaConfig

    return random_model(LlamaConfig, vocab_size, seed, **sizes)


def random_model(config_class, vocab_size: int, seed: int = 0, **sizes):
    """A causal LM of `config_class`'s architecture (Llama, Qwen2, ...) with the tiny default sizes of `random_llama`
    and random weights drawn after `torch.manual_seed(seed)`; `sizes` override any config value."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=1,
        eos_token_id=2,
        bos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(config_class(**{**config, **sizes}))


def tiny_llama(vocab_size: int, seed: int = 0):
    """The tests' model: hidden 32, 2 layers."""
    return random_llama(vocab_size, seed)


def nf4_quantization(compute_dtype=torch.float32):
    """The recipes' 4-bit setting: bitsandbytes nf4 with double quantization, computing in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def config_values(output_dir, **overrides) -> dict:
    """Arguments of a short run that a `QALossConfig` and an `SFTConfig` both take: 2 steps on the CPU, fp32, rows of
    at most 128 tokens, logged at each step, no reports, no checkpoints; `overrides` replace or add any."""
    from .compat import checkpointing_arguments

    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        max_length=128,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **checkpointing_arguments(False),  # SFTConfig takes the name the installed transformers knows
    )
    values.update(overrides)
    return values
