"""`QALossSFTTrainer`: TRL's `SFTTrainer` trained on `lambda_ce * SFT cross-entropy + lambda_set * set loss`."""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, ProcessorMixin
from trl import SFTTrainer
from trl.trainer.utils import create_model_from_path

from ._log_filters import quiet_dataset_preparation
from .callbacks import QASetEvalCallback
from .checkpoints import resolve_resume_checkpoint
from .compat import SettingsCheck, check_fsdp_took_effect
from .config import QALossConfig, as_qaloss_config, reads_items
from .data_checks import check_set_targets
from .dataset_preparation import (
    check_chat_templates,
    check_datasets_columns,
    format_structured_datasets,
    prepare_with_truncation_report,
)
from .engine.answer_order import reorder_answers
from .engine.appearance import TokenText
from .engine.loss import set_loss_terms, target_counts
from .engine.options import MODEL_ORDERS
from .engine.parsing import seq_starts_from
from .engine.reduction import reduce_set_loss, reduction_count
from .engine.scoring import ModelScorer, accepts_logits_to_keep
from .engine.separators import QASeparators
from .separator_tokens import add_separator_tokens

logger = logging.getLogger(__name__)


def load_model_and_tokenizer(model_id: str, args: QALossConfig, processing_class, kwargs: dict):
    """The model named `model_id` (a hub name or a directory), loaded as SFTTrainer would load it, and
    `processing_class`, or the model's own tokenizer when it is None.

    The model takes `args.model_init_kwargs` and a `quantization_config` given to the trainer (taken out of
    `kwargs`); `args.model_init_kwargs` is then cleared, as SFTTrainer does once it has loaded the model.
    """
    model_init_kwargs = dict(args.model_init_kwargs or {})
    if kwargs.get("quantization_config") is not None:
        model_init_kwargs["quantization_config"] = kwargs.pop("quantization_config")
    if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
        model_init_kwargs["device_map"] = None
    model_init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    model = create_model_from_path(model_id, **model_init_kwargs)
    args.model_init_kwargs = None
    if processing_class is None:
        processing_class = AutoTokenizer.from_pretrained(
            model_id, revision=model_init_kwargs.get("revision"), trust_remote_code=args.trust_remote_code
        )
    return model, processing_class


def tokenizer_of(processing_class) -> PreTrainedTokenizerBase:
    """The tokenizer that `processing_class` is, or holds (a processor's); a TypeError for anything else."""
    tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError("`processing_class` must be a tokenizer or a processor that holds one.")
    return tokenizer


def warn_packing_without_boundaries(packing_strategy: str) -> None:
    logger.warning(
        "packing_strategy=%r without padding_free packs documents into rows without sequence boundaries, so "
        "the set loss pairs the items of a row across its documents. Use packing_strategy='bfd' (the "
        "default) or padding_free=True.",
        packing_strategy,
    )


class QALossSFTTrainer(SFTTrainer):
    """`SFTTrainer` that trains each item's answers in a fixed order, and can add an order-invariant set-matching loss.

    Before the loss, each item's target answers are reordered as `answer_order` says (default `"canonical"`: sorted;
    see [`reorder_answers`]), in `input_ids` and `labels` together, so every position's context agrees with its
    target; evaluation losses read the targets as given. With `lambda_set=0` (the default) the loss is then exactly
    `SFTTrainer`'s on the reordered batch; with `lambda_set > 0` the set loss below is added.

    Takes the same arguments as [`~trl.SFTTrainer`]; `args` is a [`QALossConfig`] (an `SFTConfig` is converted). If
    `qa_token` or `answer_token` is not a single token of the tokenizer, they are added as special tokens, the
    embeddings are resized and, with a `peft_config`, the new rows are made trainable (PEFT's
    `trainable_token_indices`).

    With the set loss, the loss comes from ONE forward that returns logits only at the positions the losses read
    (`logits_to_keep`), and one pass over those logits serves both terms: the SFT cross-entropy (normalized like
    `SFTTrainer`, by `num_items_in_batch`) and the set loss (normalized by the target answer tokens of the same
    accumulation window and devices). Logged next to TRL's metrics: `ce_loss`, `set_loss`, `set/mean_iou`,
    `set/matched`, `set/missing`, `set/extra`, `set/target_answers`. With `eval_generate_samples > 0`, every
    evaluation also generates completions and logs answer-set metrics ([`QASetEvalCallback`]).

    Normalization across micro-batches and devices: whenever the Trainer passes `num_items_in_batch` (the labelled
    tokens of the whole accumulation window, summed over processes with `average_tokens_across_devices`), each
    micro-batch's set sum is divided by the target answer tokens counted over that same window and processes
    (reduction "mean"), or left a plain sum ("sum"), and the loss is scaled by the number of processes exactly as
    `Trainer.compute_loss` scales the CE term, since DDP averages gradients. A step thus gets the gradients of one
    batch holding the whole window, however it is split. Without `num_items_in_batch` (a model without loss kwargs),
    both terms are reduced per micro-batch and the Trainer divides the loss by the accumulation steps.

    Packed (padding-free) batches carry `position_ids`; each 0 there starts a sequence, and no item spans two.
    """

    _tag_names = ["trl", "sft", "trl-qaloss"]

    def __init__(
        self,
        model,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *positional,
        peft_config=None,
        **kwargs,
    ):
        if isinstance(model, os.PathLike):
            model = os.fspath(model)  # a model directory given as a `Path`
        args = as_qaloss_config(args, model)
        if isinstance(model, str):
            # Loaded here rather than by SFTTrainer so the separators can be added to its embeddings first.
            model, processing_class = load_model_and_tokenizer(model, args, processing_class, kwargs)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
        tokenizer = tokenizer_of(processing_class)
        train_dataset, eval_dataset = format_structured_datasets(args, train_dataset, eval_dataset)
        check_chat_templates(train_dataset, eval_dataset, tokenizer, args.chat_template_path)
        self._truncation_hints: dict[str, str] = {}
        if args.lambda_set > 0:
            self._check_supported(args, kwargs, positional)
        if reads_items(args):
            check_datasets_columns(args, train_dataset, eval_dataset, kwargs.get("formatting_func") is not None)
            add_separator_tokens(model, tokenizer, args, peft_config)
        settings_check = SettingsCheck(args, model)  # before TRL prepares the model: it may turn checkpointing on

        super().__init__(
            model,
            args,
            data_collator,
            train_dataset,
            eval_dataset,
            processing_class,
            *positional,
            peft_config=peft_config,
            **kwargs,
        )
        check_fsdp_took_effect(self.is_fsdp_enabled, self.accelerator.distributed_type)
        self.separators = None
        self._answer_text = None  # the text "appearance" reads, decoded with the training tokenizer
        if reads_items(args):
            self.separators = QASeparators.from_tokenizer(
                tokenizer, args.qa_token, args.answer_token, args.question_end
            )
            self._answer_text = TokenText(tokenizer)
        if reads_items(args) and self.train_dataset is not None:
            hint = self._truncation_hints.get("train")
            check_set_targets(self.train_dataset, self.separators, tokenizer, "train_dataset", args, hint)
        if args.lambda_set > 0 and args.packing and not self.padding_free:
            warn_packing_without_boundaries(args.packing_strategy)
        self._accepts_logits_to_keep = accepts_logits_to_keep(self.model)
        # FSDP and DeepSpeed gather the parameters in the wrapped model's forward: there, "aligned" scores through it.
        self._params_sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        self._set_count_in_batch = None
        self.add_callback(settings_check)
        self._add_answer_set_evaluation(args)
        check_full_batch(self.train_dataset, args)

    def _add_answer_set_evaluation(self, args: QALossConfig) -> None:
        """The callback that generates and scores completions at each evaluation, when `eval_generate_samples` asks
        for it and there is an evaluation to hook it on."""
        if args.eval_generate_samples <= 0:
            return
        if self.eval_dataset is None and args.eval_strategy == "no":
            # A recipe that turns evaluation off (`--eval_strategy no`) also turns off its generation metrics.
            logger.warning(
                "`eval_generate_samples` is set, but there is no eval dataset and `eval_strategy` is 'no': "
                "the answer-set evaluation is off."
            )
            return
        self.add_callback(QASetEvalCallback(self))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` skips checkpoints a killed run left half-written."""
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    @quiet_dataset_preparation()
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL's preparation, without its progress bars (a handful per dataset, in seconds); when training reads the
        items, the target answers that truncation to `max_length` cuts are counted first and reported in a warning
        (repeated if no target answer survives)."""
        if not reads_items(args):
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        dataset, hint = prepare_with_truncation_report(
            super()._prepare_dataset, dataset, processing_class, args, packing, formatting_func, dataset_name
        )
        if hint is not None:
            self._truncation_hints[dataset_name] = hint
        return dataset

    @staticmethod
    def _check_supported(args: QALossConfig, kwargs: dict, positional: tuple = ()) -> None:
        if args.loss_type != "nll":
            raise ValueError(f"`loss_type={args.loss_type!r}` is not supported with `lambda_set > 0`; use 'nll'.")
        if args.label_smoothing_factor > 0:
            raise ValueError("`label_smoothing_factor > 0` is not supported with `lambda_set > 0`; set it to 0.")
        # `compute_loss_func` follows `processing_class` in SFTTrainer's signature.
        if kwargs.get("compute_loss_func", positional[0] if positional else None) is not None:
            raise ValueError("`compute_loss_func` replaces the loss; it cannot be combined with `lambda_set > 0`.")

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        # The set term is normalized like the CE term: by the `reduction_count` (target answer tokens for "mean") of
        # the whole accumulation window and, with `average_tokens_across_devices`, of all processes.
        self._set_count_in_batch = None
        if self.args.lambda_set > 0 and num_items_in_batch is not None:
            count = sum(
                reduction_count(
                    self.args.set_loss_reduction,
                    target_counts(batch["labels"][:, 1:], self.separators, seq_starts_from(batch.get("position_ids"))),
                )
                for batch in batch_samples
                if "labels" in batch
            )
            count = torch.tensor(count, device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()
            self._set_count_in_batch = count
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.answer_order != "data" and self.model.training:
            # Both terms below then read the reordered batch: its contexts agree with the targets they predict.
            scorer = None
            if self.args.answer_order in MODEL_ORDERS:
                unwrapped = None if self._params_sharded else self.accelerator.unwrap_model(model)
                scorer = ModelScorer(model, inputs, self._accepts_logits_to_keep, unwrapped)
            input_ids, labels = reorder_answers(
                inputs["input_ids"],
                inputs["labels"],
                self.separators,
                self.args.answer_order,
                position_ids=inputs.get("position_ids"),
                scorer=scorer,
                tokenizer=self._answer_text,
            )
            inputs = {**inputs, "input_ids": input_ids, "labels": labels}
        if self.args.lambda_set == 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        labels = inputs["labels"]
        forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        # Logits only from the first position whose next token is a label: prompts are never scored.
        first = 0
        if self._accepts_logits_to_keep and not return_outputs:
            scored = (labels[:, 1:] != -100).any(0).nonzero()
            first = int(scored[0]) if scored.numel() else 0
            forward_inputs["logits_to_keep"] = labels.size(1) - first
        outputs = model(**forward_inputs)
        targets = labels[:, first + 1 :]  # logits[:, j] predicts targets[:, j]
        # Packed (padding-free) rows: each position id 0 starts a sequence, so no item spans two of them.
        seq_starts = seq_starts_from(inputs.get("position_ids"), first)
        terms = set_loss_terms(
            outputs.logits, targets, self.separators, with_sft=True, with_entropy=True, seq_starts=seq_starts
        )

        nll_sum = -terms.sft_log_probs.sum()
        num_tokens = terms.rows_b.numel()
        ce_loss = nll_sum / torch.as_tensor(num_tokens if num_items_in_batch is None else num_items_in_batch).clamp(
            min=1
        )
        reduction = self.args.set_loss_reduction
        set_count = reduction_count(reduction, terms.stats)
        if num_items_in_batch is not None and self.model.training and self._set_count_in_batch is not None:
            set_count = self._set_count_in_batch
        set_loss = reduce_set_loss(terms.set_sum, set_count, reduction)
        loss = self.args.lambda_ce * ce_loss + self.args.lambda_set * set_loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled and getattr(outputs, "aux_loss", None) is not None:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        self._log_metrics(mode, inputs, terms, nll_sum.detach(), targets)
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(self, mode, inputs, terms, nll_sum, targets) -> None:
        gather = self.accelerator.gather_for_metrics
        device = nll_sum.device
        stats = terms.stats
        num_valid = gather(torch.tensor(float(terms.rows_b.numel()), device=device)).sum()
        correct = (terms.argmax == targets[terms.rows_b, terms.rows_p]).sum().float()
        per_token = torch.stack([nll_sum.float(), terms.entropy.sum(), correct])
        nll, entropy, correct = gather(per_token[None]).sum(0) / num_valid.clamp(min=1)
        reduction = self.args.set_loss_reduction
        set_values = torch.tensor(
            [
                terms.set_sum.item(),
                reduction_count(reduction, stats),
                stats["matched"],
                stats["missing"],
                stats["extra"],
                stats["target_answers"],
                stats["mean_iou"] * stats["matched"],
            ],
            device=device,
        )
        set_sum, set_count, matched, missing, extra, target_answers, iou_sum = gather(set_values[None]).sum(0)
        metrics = self._metrics[mode]
        metrics["entropy"].append(entropy.item())
        metrics["mean_token_accuracy"].append(correct.item())
        metrics["ce_loss"].append(nll.item())
        # This micro-batch's set loss over all processes: "sum" gives the mean of the processes' sums.
        set_loss = reduce_set_loss(set_sum, set_count, reduction, num_batches=self.accelerator.num_processes)
        metrics["set_loss"].append(set_loss.item())
        metrics["set/mean_iou"].append((iou_sum / matched.clamp(min=1)).item())
        for name, value in (
            ("matched", matched),
            ("missing", missing),
            ("extra", extra),
            ("target_answers", target_answers),
        ):
            metrics[f"set/{name}"].append(value.item())
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:
                local = torch.tensor(inputs["position_ids"].size(1), device=device)
            self._total_train_tokens += gather(local).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]


def check_full_batch(train_dataset, args: QALossConfig) -> None:
    """Raise a ValueError when `dataloader_drop_last` would drop every batch: the Trainer would stop with a message
    about a dataloader without a length, or train no step."""
    if not args.dataloader_drop_last or train_dataset is None or not hasattr(train_dataset, "__len__"):
        return
    batch = args.per_device_train_batch_size * args.world_size
    if len(train_dataset) < batch:
        raise ValueError(
            f"`dataloader_drop_last` drops every batch: the {len(train_dataset)} training rows make no full batch of "
            f"{batch} ({args.per_device_train_batch_size} per process x {args.world_size} processes). Lower "
            "`per_device_train_batch_size`, or set `dataloader_drop_last: false`."
        )
