"""One optimizer step of `QALossSFTTrainer` with LoRA under a sharding engine (DeepSpeed ZeRO-3), for each answer
order and set-loss weight: the logged loss, the LoRA gradients and the reordered rows the step trained on.

Run by `tests/test_sharded.py`, once in-process (the reference: one process, no sharding) and once under
`accelerate launch --config_file recipes/accelerate/zero3-qlora.yaml --num_processes 2`:
`python tests/sharded_worker.py OUT_DIR WORLD_SIZE`, which runs each setting on LoRA and on 4-bit QLoRA (`VARIANTS`).
Each setting trains on the same global batch of 8 rows.

The gradients are read back from the step itself: plain SGD with learning rate 1 and no clipping moves each LoRA
weight by minus its gradient, and under ZeRO-3 the weights before and after are gathered from their shards.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from pathlib import Path

import torch

from tests.distributed_worker import GLOBAL_BATCH, one_step_config, swapping_llama
from tests.testing_utils import build_tokenizer, qa_dataset

ORDERS = ("data", "canonical", "appearance", "preferred", "aligned")
# (name, config overrides): each answer order, with the CE term alone and with the set term added.
SETTINGS = {
    f"{order}_set{int(lambda_set)}": dict(answer_order=order, lambda_ce=1.0, lambda_set=lambda_set)
    for order in ORDERS
    for lambda_set in (0.0, 1.0)
}
# LoRA on the float32 Llama, and 4-bit QLoRA of it (whose LoRA weights TRL keeps in bfloat16).
VARIANTS = {"lora": False, "qlora": True}


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def base_model(tokenizer, out_dir: Path, quantized: bool):
    """The swapping Llama (see `swapping_llama`); with `quantized`, saved and reloaded in 4 bits, the 4-bit weights
    stored as float32, the model's dtype, as the sharded recipe stores them in its dtype."""
    model = swapping_llama(tokenizer)
    if not quantized:
        return model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = out_dir / f"base-{os.environ.get('RANK', '0')}"  # one copy per process: none writes over another's
    model.save_pretrained(path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32)


class RecordRows:
    """Records the `input_ids` of every forward with gradient: the reordered rows a training step learns from."""

    def __init__(self, model):
        self.rows: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if torch.is_grad_enabled():
            self.rows.extend(row.detach().cpu() for row in kwargs["input_ids"])


@contextlib.contextmanager
def gathered(trainer, params):
    """The full values of `params`, gathered from their ZeRO-3 shards while inside (a no-op without ZeRO-3)."""
    if trainer.is_deepspeed_enabled:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            yield
    else:
        yield


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    with gathered(trainer, [p for _, p in named]):
        return {n: p.detach().clone().cpu() for n, p in named}


def unpadded(rows, pad_id: int) -> list[tuple[int, ...]]:
    """Each row without its right padding, sorted: the rows of the global batch, however processes split it."""
    out = []
    for row in rows:
        row = row.tolist()
        while row and row[-1] == pad_id:
            row.pop()
        out.append(tuple(row))
    return sorted(out)


def train_one_step(out_dir, model, tokenizer, world_size: int = 1, accumulation: int = 1, **overrides):
    """`{"loss", "grads", "rows", "sharded"}` of one step on the first `GLOBAL_BATCH` rows (sequential order)."""
    from trl_qaloss import QALossSFTTrainer

    args = one_step_config(
        out_dir,
        world_size,
        accumulation,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        # DeepSpeed on CPU: not `use_cpu` (accelerate turns DeepSpeed off with it), and gloo for its processes.
        use_cpu=world_size == 1,
        ddp_backend="gloo" if world_size > 1 else None,
        **overrides,
    )
    trainer = QALossSFTTrainer(
        model=model,
        args=args,
        train_dataset=qa_dataset(GLOBAL_BATCH),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    record = RecordRows(trainer.model)
    before = lora_weights(trainer)
    trainer.train()
    after = lora_weights(trainer)
    record.handle.remove()
    rows = unpadded(record.rows, tokenizer.pad_token_id)
    if world_size > 1:
        everyone = [None] * world_size
        torch.distributed.all_gather_object(everyone, rows)
        rows = sorted(r for part in everyone for r in part)
    return {
        "loss": trainer.state.log_history[0]["loss"],
        "grads": {n: before[n] - after[n] for n in before},  # SGD, learning rate 1: the step is minus the gradient
        "rows": rows,
        "sharded": trainer._params_sharded,
        "world_size": trainer.args.world_size,
        "main": trainer.accelerator.is_main_process,
    }


def run(out_dir, world_size: int = 1) -> dict:
    """`{variant: {setting: result of train_one_step}}` for each of the `VARIANTS`; with 2 processes, each
    accumulates 2 micro-batches."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    # Built before any training arguments: under ZeRO-3 those turn on sharded initialization of later models.
    models = {variant: base_model(tokenizer, out_dir / variant, q) for variant, q in VARIANTS.items()}
    accumulation = 2 if world_size > 1 else 1
    return {
        variant: {
            name: train_one_step(
                out_dir / variant / name, copy.deepcopy(model), tokenizer, world_size, accumulation, **overrides
            )
            for name, overrides in SETTINGS.items()
        }
        for variant, model in models.items()
    }


def main(out_dir: str, world_size: int) -> None:
    results = run(out_dir, world_size)
    if results["lora"]["data_set0"]["main"]:
        torch.save(results, Path(out_dir) / "results.pt")


if __name__ == "__main__":
    from trl_qaloss.cli.training import end_processes

    main(sys.argv[1], int(sys.argv[2]))
    end_processes()  # as `trl-qaloss train` does: a launch whose run finished exits 0
