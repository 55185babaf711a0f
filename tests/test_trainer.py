"""QALossSFTTrainer on a tiny Llama built from a config, with real TRL, PEFT and bitsandbytes."""

from __future__ import annotations

import copy

import pytest
import torch
from trl import SFTConfig, SFTTrainer

from tests.testing_utils import (
    CHAT_TEMPLATE,
    build_tokenizer,
    config_values,
    first_batch,
    nf4_quantization,
    qa_config,
    qa_dataset,
    slow,
    tiny_llama,
)
from trl_qaloss import QALossSFTTrainer


@pytest.fixture()
def model(tokenizer):
    return tiny_llama(len(tokenizer))


def sft_loss(model, tokenizer, tmp_path, batch, **overrides):
    args = SFTConfig(**config_values(tmp_path, **overrides.pop("args", {})))
    trainer = SFTTrainer(model=model, args=args, train_dataset=qa_dataset(), processing_class=tokenizer, **overrides)
    trainer.model.train()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(batch))


def mean_squared_logit(outputs, labels, num_items_in_batch=None):
    """A `compute_loss_func` unlike any built-in loss."""
    return outputs.logits.float().pow(2).mean()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"args": {"loss_type": "dft"}},
        {"args": {"label_smoothing_factor": 0.1}},
        {"compute_loss_func": mean_squared_logit},
    ],
    ids=["nll", "dft", "label_smoothing", "compute_loss_func"],
)
def test_lambda_set_zero_is_sft(model, tokenizer, tmp_path, overrides):
    """With `lambda_set=0` (and the data order) the loss is `SFTTrainer`'s, whatever loss options it is given."""
    args = qa_config(tmp_path, lambda_set=0.0, **overrides.get("args", {}))
    extra = {k: v for k, v in overrides.items() if k != "args"}
    trainer = QALossSFTTrainer(
        model=copy.deepcopy(model), args=args, train_dataset=qa_dataset(), processing_class=tokenizer, **extra
    )
    batch = first_batch(trainer)
    trainer.model.train()
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(batch))
    expected = sft_loss(copy.deepcopy(model), tokenizer, tmp_path, batch, **copy.copy(overrides))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=0)
    if overrides:  # the option changes the loss: the test would see a QALossSFTTrainer that ignored it
        plain = sft_loss(copy.deepcopy(model), tokenizer, tmp_path, batch)
        assert not torch.allclose(expected, plain, rtol=1e-4, atol=0)


def test_ce_term_matches_sft_normalization(model, tokenizer, tmp_path):
    """The CE term, computed from our own logits pass, equals SFTTrainer's fused loss on the same batch."""
    trainer = QALossSFTTrainer(
        model=copy.deepcopy(model), args=qa_config(tmp_path), train_dataset=qa_dataset(), processing_class=tokenizer
    )
    batch = first_batch(trainer)
    trainer.model.train()
    num_items = (batch["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    ce = trainer._metrics["train"]["ce_loss"][-1]
    expected = sft_loss(copy.deepcopy(model), tokenizer, tmp_path, batch).item()
    assert ce == pytest.approx(expected, rel=1e-4)
    # TRL's own metrics are logged next to ours.
    for key in (
        "entropy",
        "mean_token_accuracy",
        "set_loss",
        "set/mean_iou",
        "set/missing",
        "set/extra",
        "set/matched",
    ):
        assert key in trainer._metrics["train"]


@slow
def test_logged_terms_combine_to_the_loss_and_set_loss_falls(model, tokenizer, tmp_path):
    # A small dataset the tiny model can fit: the set loss starts at a uniform guess (nothing parses) and falls
    # once the model has learnt the format.
    args = qa_config(tmp_path, lambda_ce=0.7, lambda_set=1.3, max_steps=150, learning_rate=1e-2)
    trainer = QALossSFTTrainer(model=model, args=args, train_dataset=qa_dataset(8), processing_class=tokenizer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "set_loss" in entry]
    assert len(logs) == 150
    for entry in logs:
        assert entry["loss"] == pytest.approx(0.7 * entry["ce_loss"] + 1.3 * entry["set_loss"], rel=1e-3)
        assert entry["set/target_answers"] > 0
    first = sum(e["set_loss"] for e in logs[:10]) / 10
    last = sum(e["set_loss"] for e in logs[-10:]) / 10
    assert last < 0.5 * first
    assert logs[-1]["set/matched"] > 0 and logs[-1]["set/mean_iou"] > 0.5


def test_lora_trains(model, tokenizer, tmp_path):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = QALossSFTTrainer(
        model=model,
        args=qa_config(tmp_path, max_steps=3),
        train_dataset=qa_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert before and all(n.count("lora_") for n in before)
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_qlora_4bit_trains(model, tokenizer, tmp_path):
    import bitsandbytes as bnb
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "base")
    quantization = nf4_quantization(torch.float32)
    model4 = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model4.modules())
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = QALossSFTTrainer(
        model=model4,
        args=qa_config(tmp_path / "out", max_steps=3),
        train_dataset=qa_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "set_loss" in e]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor([e["loss"], e["set_loss"]])).all() for e in logs)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())


@pytest.mark.parametrize("own_indices", [None, [5], {"embed_tokens": [5]}], ids=["none", "list", "dict"])
def test_separators_are_added_when_missing(tmp_path, own_indices):
    """A tokenizer without the separators gets them as special tokens; PEFT trains their embedding rows, next to the
    rows the user's `trainable_token_indices` already lists."""
    from peft import LoraConfig

    tokenizer = build_tokenizer()
    args = qa_config(tmp_path, qa_token="<Q>", answer_token="<ANS>", max_steps=1)
    dataset = qa_dataset().map(lambda r: {"completion": r["completion"].replace("<QA>", "<Q>").replace("<A>", "<ANS>")})
    vocab = len(tokenizer)
    model = tiny_llama(vocab)
    peft_config = LoraConfig(
        r=4, target_modules="all-linear", task_type="CAUSAL_LM", trainable_token_indices=copy.deepcopy(own_indices)
    )
    trainer = QALossSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    assert len(tokenizer) == vocab + 2
    assert trainer.separators.qa_id == tokenizer.convert_tokens_to_ids("<Q>")
    assert trainer.model.get_base_model().config.vocab_size == vocab + 2
    added = tokenizer.convert_tokens_to_ids(["<Q>", "<ANS>"])
    indices = peft_config.trainable_token_indices
    assert sorted(indices["embed_tokens"] if isinstance(own_indices, dict) else indices) == sorted(
        (own_indices and [5] or []) + added
    )
    assert any("trainable_tokens" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    trainer.train()


def test_a_formatting_function_is_applied_once(model, tokenizer, tmp_path, caplog):
    """With a `max_length`, the rows are tokenized in full before truncation: the formatting function is applied
    then, and TRL is not handed it again for rows it already tokenized (it would warn that it ignores it)."""
    import logging

    dataset = qa_dataset(8).map(
        lambda r: {"question_text": r["prompt"] + r["completion"]}, remove_columns=["prompt", "completion"]
    )
    args = qa_config(tmp_path, completion_only_loss=False, max_length=64)
    with caplog.at_level(logging.WARNING):
        trainer = QALossSFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            formatting_func=lambda row: row["question_text"],
        )
    assert "formatting_func` will be ignored" not in caplog.text
    assert len(trainer.train_dataset[0]["input_ids"]) <= 64


def test_added_separator_rows_follow_the_seed(tmp_path):
    """The embedding rows of added separators are sampled; two runs with the same `seed` get the same rows, whatever
    the random state before, and another `seed` gets others."""

    def new_rows(seed: int, state: int) -> torch.Tensor:
        tokenizer = build_tokenizer()
        args = qa_config(tmp_path, qa_token="<Q>", answer_token="<ANS>", seed=seed)
        dataset = qa_dataset(8).map(
            lambda r: {"completion": r["completion"].replace("<QA>", "<Q>").replace("<A>", "<ANS>")}
        )
        model = tiny_llama(len(tokenizer))
        torch.manual_seed(state)
        trainer = QALossSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        ids = tokenizer.convert_tokens_to_ids(["<Q>", "<ANS>"])
        model = trainer.model
        return torch.cat([model.get_input_embeddings().weight[ids], model.get_output_embeddings().weight[ids]])

    first = new_rows(seed=3, state=1)
    torch.testing.assert_close(new_rows(seed=3, state=2), first, rtol=0, atol=0)
    assert not torch.equal(new_rows(seed=4, state=1), first)


def test_conversational_dataset(model, tokenizer, tmp_path):
    from datasets import Dataset

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    rows = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in qa_dataset()
    ]
    args = qa_config(tmp_path, assistant_only_loss=True, max_steps=2)
    trainer = QALossSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.train()
    assert any(e.get("set/target_answers", 0) > 0 for e in trainer.state.log_history)


def test_sft_config_is_converted(model, tokenizer, tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=1, report_to=[])
    trainer = QALossSFTTrainer(model=model, args=args, train_dataset=qa_dataset(), processing_class=tokenizer)
    assert trainer.args.max_steps == 1
    assert trainer.args.lambda_set == 0.0 and trainer.args.answer_order == "canonical"  # QALossConfig's defaults


@pytest.mark.parametrize(
    "model_name, output_dir",
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B-Instruct-QALoss"),
        ("/models/tiny/", "tiny-QALoss"),
        ("m", "m-QALoss"),
    ],
)
def test_without_args_the_output_dir_is_named_after_the_model(model_name, output_dir):
    """As `SFTTrainer` names its default `output_dir` `<model>-SFT`: the last part of the model's name or path."""
    from trl_qaloss.config import as_qaloss_config

    assert as_qaloss_config(None, model_name).output_dir == output_dir


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("lambda_ce", -1.0, "lambda_ce"),
        ("lambda_set", -0.5, "lambda_set"),
        ("set_loss_reduction", "avg", "set_loss_reduction"),
        ("qa_token", "", "qa_token"),
        ("answer_token", " ", "answer_token"),
        ("question_end", "", "question_end"),
    ],
)
def test_config_validation(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        qa_config(tmp_path, **{field: value})


def test_config_both_weights_zero(tmp_path):
    with pytest.raises(ValueError, match="both 0"):
        qa_config(tmp_path, lambda_ce=0.0, lambda_set=0.0)


@pytest.mark.parametrize("options", [{"loss_type": "dft"}, {"label_smoothing_factor": 0.1}], ids=["dft", "smoothing"])
def test_sft_loss_options_work_with_an_answer_order_when_lambda_set_is_zero(model, tokenizer, tmp_path, options):
    """`lambda_set=0` with `answer_order="canonical"` (the defaults) is SFT on reordered targets: the loss options
    that only the set loss refuses are accepted, and they change the loss."""

    def loss(**extra):
        args = qa_config(tmp_path, lambda_set=0.0, answer_order="canonical", **extra)
        trainer = QALossSFTTrainer(
            model=copy.deepcopy(model), args=args, train_dataset=qa_dataset(), processing_class=tokenizer
        )
        trainer.model.train()
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, dict(first_batch(trainer)))

    assert not torch.allclose(loss(**options), loss(), rtol=1e-4, atol=0)


CUSTOM_CODE = """from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "custom-llama"


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


def test_trust_remote_code_in_model_init_kwargs_loads_a_model_with_its_own_code(model, tokenizer, tmp_path):
    """A model directory that brings its own modeling code loads when `model_init_kwargs` trusts it, as the command
    line passes a recipe's `trust_remote_code: true`; the field's default (False) does not override it."""
    import json

    directory = tmp_path / "custom"
    model.save_pretrained(directory)
    (directory / "modeling_custom.py").write_text(CUSTOM_CODE)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"], config["architectures"] = "custom-llama", ["CustomForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "modeling_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    (directory / "config.json").write_text(json.dumps(config))

    def build(**init_kwargs):
        args = qa_config(tmp_path, model_init_kwargs=init_kwargs or None)
        return QALossSFTTrainer(model=str(directory), args=args, train_dataset=qa_dataset(), processing_class=tokenizer)

    assert type(build(trust_remote_code=True).model).__name__ == "CustomForCausalLM"
    with pytest.raises(ValueError, match="trust_remote_code"):
        build()  # its own code runs only when trusted


def test_unsupported_combinations(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        QALossSFTTrainer(
            model=model,
            args=qa_config(tmp_path, loss_type="dft"),
            train_dataset=qa_dataset(),
            processing_class=tokenizer,
        )
