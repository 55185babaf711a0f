"""Shared test helpers, importable by tests and benchmarks: a byte-level BPE tokenizer trained on the fly, a tiny Llama
built from a config, configs, random loss batches, and the command-line runner. Test modules import from here, never
from one another; `conftest.py` holds only the pytest fixtures."""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from trl_qaloss import QASeparators

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

WORDS = (
    "who what where when which wrote built painted discovered founded city river mountain paris london rome berlin "
    "ann bob carl dana eve frank gina hugo iris jack the a of in and"
).split()


def qa_text(rng: random.Random, num_items: int | None = None) -> str:
    """A completion in the product's format with random questions and answer sets."""
    items = []
    for _ in range(num_items or rng.randint(1, 3)):
        question = " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))
        answers = [" ".join(rng.choices(WORDS, k=rng.randint(1, 3))) for _ in range(rng.randint(1, 4))]
        items.append(f"<QA> {question}? " + " ".join(f"<A> {a}" for a in answers))
    return " ".join(items)


def build_tokenizer():
    from trl_qaloss.demo.make_demo import train_bpe_tokenizer

    rng = random.Random(0)
    texts = [qa_text(rng) for _ in range(400)] + ['what?" he asked. why ? "who?"'] * 20
    return train_bpe_tokenizer(texts, vocab_size=600)


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<eos>{% endgeneration %}"
    "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


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


def qa_dataset(num_rows: int = 32, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [
        {"prompt": f"context {' '.join(rng.choices(WORDS, k=3))}:", "completion": " " + qa_text(rng)}
        for _ in range(num_rows)
    ]
    return Dataset.from_list(rows)


def config_values(tmp_path, **overrides) -> dict:
    """Arguments shared by the QALossConfig and SFTConfig of the tests: CPU, fp32, quiet, no checkpoints."""
    from trl_qaloss.compat import checkpointing_arguments

    values = dict(
        output_dir=str(tmp_path),
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


def qa_config(tmp_path, **overrides):
    from trl_qaloss import QALossConfig

    # The tests pin the set loss on and the order the data gives, unless they test something else.
    return QALossConfig(**config_values(tmp_path, **{"lambda_set": 1.0, "answer_order": "data", **overrides}))


def first_batch(trainer) -> dict:
    """The first batch of the trainer's train dataloader, on its device."""
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to(trainer.args.device) for k, v in batch.items()}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_RECIPE = os.path.join(ROOT, "recipes", "demo-cpu.yaml")
# What the end-to-end command runs add to the demo recipe: 2 steps, logged each, short rows, no progress bars, and
# the evaluation that ends the run completing 4 held-out rows instead of all.
SHORT_RUN = ["--max_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true", "--max_length", "96"]
SHORT_RUN += ["--eval_generate_samples", "4"]


def run_cli(*args: str, cwd, env: dict | None = None, timeout: int = 300):
    """`python -m trl_qaloss <args>` in a subprocess, as a user runs it, on this checkout's code.

    Returns the `subprocess.CompletedProcess` (text stdout and stderr).
    """
    import subprocess
    import sys

    full_env = {k: v for k, v in os.environ.items() if k != "TRL_QALOSS_DEBUG"}
    full_env.update({"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "trl_qaloss", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(stderr: str) -> list[str]:
    """The lines of `stderr` that report an error to the user."""
    return [line for line in stderr.splitlines() if line.startswith("trl-qaloss: error:")]


STAT_KEYS = ("target_answers", "target_tokens", "matched", "missing", "extra", "mean_iou")


def token_pool(seps: QASeparators, vocab_size: int) -> tuple[list[int], list[float]]:
    """Ids with weights that make separators, question ends and skip tokens frequent."""
    qend = sorted(seps.question_end_ids)
    skip = sorted(i for i in seps.skip_ids if i < vocab_size)
    plain = [i for i in range(vocab_size) if i not in seps.question_end_ids and i not in seps.skip_ids]
    plain = [i for i in plain if i not in (seps.qa_id, seps.answer_id)][:40]
    ids = [seps.qa_id, seps.answer_id] + qend + skip + plain
    weights = (
        [3.0, 6.0] + [4.0 / len(qend)] * len(qend) + [2.0 / len(skip)] * len(skip) + [20.0 / len(plain)] * len(plain)
    )
    return ids, weights


def random_batch(seps, vocab_size, batch=4, length=64, seed=0, agree=0.6, dtype=torch.float32):
    """Labels with prompt, padding and holes masked; logits whose argmax copies the target with probability `agree`."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    ids, weights = token_pool(seps, vocab_size)
    labels = torch.tensor([rng.choices(ids, weights, k=length) for _ in range(batch)])
    predicted = labels.clone()
    for b in range(batch):
        for p in range(length - 1):
            if rng.random() > agree:
                predicted[b, p + 1] = rng.choices(ids, weights)[0]
        prompt, pad = rng.randint(0, length // 4), rng.randint(0, length // 4)
        labels[b, :prompt] = -100
        labels[b, length - pad :] = -100
        if rng.random() < 0.3:  # a hole, as multi-turn assistant-only masks leave
            start = rng.randint(0, length - 1)
            labels[b, start : start + rng.randint(1, 6)] = -100
    logits = torch.randn(batch, length, vocab_size, generator=gen)
    # Prediction at position p targets label p + 1.
    logits[:, :-1].scatter_(2, predicted[:, 1:, None], 8.0)
    return logits.to(dtype), labels


def encode_pair(tokenizer, target_text, predicted_text, prompt_len=3, length=None):
    """Labels from `target_text` after a masked prompt; logits whose argmax spells `predicted_text` in step."""
    target = tokenizer.encode(target_text, add_special_tokens=False)
    predicted = tokenizer.encode(predicted_text, add_special_tokens=False)
    length = length or prompt_len + max(len(target), len(predicted)) + 1
    labels = torch.full((1, length), -100)
    body = target[: length - prompt_len]
    labels[0, prompt_len : prompt_len + len(body)] = torch.tensor(body)
    logits = torch.randn(1, length, len(tokenizer), generator=torch.Generator().manual_seed(len(target)))
    # After the predicted text the model predicts EOS, a skip token, so nothing is appended to its last answer.
    predicted = predicted + [tokenizer.eos_token_id] * length
    for k, tok in enumerate(predicted[: length - prompt_len + 1]):
        logits[0, prompt_len - 1 + k, tok] = 10.0
    return logits, labels


# The fast tier, by the convention of transformers, TRL and PEFT: tests marked `@slow` (the launches, the README's
# demo, the benchmarks, whole training runs through the command line) are skipped unless RUN_SLOW is set to a true
# value (1, true, yes, on). CI and the README's test command set it.
RUN_SLOW = os.environ.get("RUN_SLOW", "").strip().lower() in ("1", "y", "yes", "t", "true", "on")
slow = pytest.mark.skipif(not RUN_SLOW, reason="slow: set RUN_SLOW=1 to run it")
