"""Offline demo: swap SFTTrainer for QALossSFTTrainer on a tiny Llama, no hub and no GPU needed.

    python examples/offline_demo.py

Trains a byte-level BPE tokenizer and a tiny Llama (built from a config) on synthetic question/answer-set data whose
answer order is random (full fine-tuning: LoRA on a randomly initialized base learns little),
and prints how the SFT cross-entropy and the set loss evolve.
"""

from __future__ import annotations

import random
import tempfile

from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from trl_qaloss import QALossConfig, QALossSFTTrainer
from trl_qaloss.demo.make_demo import train_bpe_tokenizer

CAPITALS = {"france": "paris", "italy": "rome", "germany": "berlin", "spain": "madrid", "japan": "tokyo"}
RIVERS = {"france": ["seine", "loire", "rhone"], "germany": ["rhine", "elbe", "danube"], "italy": ["po", "tiber"]}


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        country = rng.choice(list(RIVERS))
        rivers = rng.sample(RIVERS[country], len(RIVERS[country]))  # random order: the set loss does not mind
        completion = f" <QA> which rivers flow in {country}? " + " ".join(f"<A> {r}" for r in rivers)
        completion += f" <QA> what is the capital of {country}? <A> {CAPITALS[country]}"
        rows.append({"prompt": f"facts about {country}:", "completion": completion})
    return rows


def make_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    # A byte-level BPE tokenizer trained on the rows, with <QA> and <A> as special tokens.
    return train_bpe_tokenizer(texts, vocab_size=400)


def main() -> None:
    rows = make_rows(64)
    tokenizer = make_tokenizer([r["prompt"] + r["completion"] for r in rows])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(config)
    args = QALossConfig(
        output_dir=tempfile.mkdtemp(prefix="qaloss-demo-"),
        lambda_ce=1.0,
        lambda_set=1.0,
        answer_order="data",  # the answers as given: the cross-entropy then stalls at the entropy of their order
        max_steps=120,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=20,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        save_strategy="no",
    )
    trainer = QALossSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.train()
    print("step  ce_loss  set_loss  set/mean_iou  set/missing")
    for log in trainer.state.log_history:
        if "set_loss" in log:
            print(
                f"{log['step']:>4}  {log['ce_loss']:7.3f}  {log['set_loss']:8.3f}  {log['set/mean_iou']:12.3f}"
                f"  {log['set/missing']:11.1f}"
            )


if __name__ == "__main__":
    main()
