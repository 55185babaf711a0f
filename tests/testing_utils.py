"""Shared test helpers: the package's offline components (`trl_qaloss.testing_utils`: a byte-level BPE tokenizer trained
on the fly, a tiny Llama built from a config, a short run's config values), and the tests' own: datasets and configs,
random loss batches, the command-line runner. Test modules import from here, never from one another; `conftest.py`
holds only the pytest fixtures."""

from __future__ import annotations

import os
import random
import re
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from trl_qaloss import QASeparators

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

# The package's offline components, under the names the tests import from here (after the offline settings above).
from trl_qaloss.testing_utils import (  # noqa: E402, F401
    WORDS,
    build_tokenizer,
    config_values,
    nf4_quantization,
    qa_text,
    random_llama,
    random_model,
    tiny_llama,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<eos>{% endgeneration %}"
    "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def qa_dataset(num_rows: int = 32, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [
        {"prompt": f"context {' '.join(rng.choices(WORDS, k=3))}:", "completion": " " + qa_text(rng)}
        for _ in range(num_rows)
    ]
    return Dataset.from_list(rows)


NAMES = ("ann", "bob", "carl", "dana", "eve", "frank", "gina", "hugo", "iris", "jack")
CITIES = ("paris", "london", "rome", "berlin")


def grounded_rows(num_rows: int = 16, seed: int = 0) -> list[dict]:
    """Structured rows `{"context", "qas"}` whose context names some of the answers (capitalized now and then, in
    another order than the answers list), and whose answers are partly not in it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        people, cities = rng.sample(NAMES, rng.randint(2, 5)), rng.sample(CITIES, rng.randint(1, 3))
        named = rng.sample(people, rng.randint(0, len(people))) + rng.sample(cities, rng.randint(0, len(cities)))
        rng.shuffle(named)
        words = [w.title() if rng.random() < 0.3 else w for w in named + rng.sample(NAMES, 2)]
        qas = [{"question": "who was there?", "answers": people}, {"question": "which cities?", "answers": cities}]
        rows.append({"context": "notes: " + ", ".join(words) + ".", "qas": qas[: rng.randint(1, 2)]})
    return rows


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


# A progress bar as tqdm draws it: an optional description, then the percentage, the bar and the counts, or a count
# alone (a bar without a total, as `datasets`' "Generating train split: 40 examples"), then the times.
PROGRESS = re.compile(r"^(?:[\w .-]+: )?(?:\s*\d+%\|.*\|\s*\d+/\d+|\d+ ?[a-z/]+) \[[^\]]*\]$")


def terminal_lines(text: str) -> list[str]:
    """The non-empty lines a terminal shows of `text`: progress bars redraw with `\\r` and move up with `ESC[A`."""
    return [line.strip() for line in re.split(r"[\r\n]", text.replace("\x1b[A", "\n")) if line.strip()]


def foreign_lines(stderr: str) -> list[str]:
    """The lines of `stderr` that are not the package's own (`trl-qaloss: ...` from the command, `trl_qaloss...: ...`
    from Python with the logger named) nor a progress bar."""
    own = ("trl-qaloss: ", "trl_qaloss")
    return [line for line in terminal_lines(stderr) if not line.startswith(own) and not PROGRESS.match(line)]
