"""`QALossSFTTrainer`: TRL's `SFTTrainer` trained on `lambda_ce * SFT cross-entropy + lambda_set * set loss`."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import os

import torch
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, ProcessorMixin, TrainingArguments, set_seed
from transformers.trainer_utils import enable_full_determinism
from trl import SFTTrainer
from trl.trainer.utils import create_model_from_path

from .answer_order import (
    aligned_keys,
    apply_answer_order,
    argmax_predictions,
    canonical_keys,
    cores_of,
    new_answer_order,
    parse_cores,
    preferred_keys,
    preferred_score_positions,
)
from .callbacks import QASetEvalCallback
from .checkpoints import resolve_resume_checkpoint
from .config import QALossConfig
from .data import format_structured
from .data_checks import check_chat_template, check_columns, check_set_targets, truncation_report
from .logprobs import CHUNK_ELEMENTS, CUDA_CHUNK_ELEMENTS
from .loss import seq_starts_from, set_loss_terms, target_counts
from .matching import align_answers
from .reduction import reduce_set_loss, reduction_count
from .separators import QASeparators, is_single_token

logger = logging.getLogger(__name__)


def _as_qaloss_config(args, model) -> QALossConfig:
    if isinstance(args, QALossConfig):
        return args
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path or "model"
        return QALossConfig(f"{name.rstrip('/').split('/')[-1]}-QALoss")
    if isinstance(args, TrainingArguments):
        # Not `to_dict()`: it masks every field named `*_token`, which would replace `eos_token` or `pad_token`.
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        # The old `gradient_checkpointing*` names mirror the `activation_checkpointing*` ones once set; copying them
        # too would read as the deprecated spelling and warn again.
        values.pop("gradient_checkpointing", None)
        values.pop("gradient_checkpointing_kwargs", None)
        return QALossConfig(**{k: v for k, v in values.items() if k in QALossConfig.__dataclass_fields__})
    raise TypeError(f"`args` must be a QALossConfig, SFTConfig or TrainingArguments, got {type(args).__name__}.")


def _reads_items(args: QALossConfig) -> bool:
    """Whether training parses the items (for the set loss or the reordering); if not, this is `SFTTrainer`."""
    return args.lambda_set > 0 or args.answer_order != "data"


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
        args = _as_qaloss_config(args, model)
        if isinstance(model, str):
            # Loaded here rather than by SFTTrainer so the separators can be added to its embeddings first.
            model_init_kwargs = dict(args.model_init_kwargs or {})
            if kwargs.get("quantization_config") is not None:
                model_init_kwargs["quantization_config"] = kwargs.pop("quantization_config")
            if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
                model_init_kwargs["device_map"] = None
            model_init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            model_id = model
            model = create_model_from_path(model_id, **model_init_kwargs)
            args.model_init_kwargs = None
            if processing_class is None:
                processing_class = AutoTokenizer.from_pretrained(
                    model_id, revision=model_init_kwargs.get("revision"), trust_remote_code=args.trust_remote_code
                )
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
        tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError("`processing_class` must be a tokenizer or a processor that holds one.")
        reads_items = _reads_items(args)
        train_dataset, eval_dataset = self._format_structured(args, train_dataset, eval_dataset)
        for name, dataset in self._named_datasets(train_dataset, eval_dataset).items():
            check_chat_template(dataset, name, tokenizer, args.chat_template_path)
        self._truncation_hints: dict[str, str] = {}
        if args.lambda_set > 0:
            self._check_supported(args, kwargs, positional)
        if reads_items:
            self._check_datasets(args, train_dataset, eval_dataset, kwargs.get("formatting_func") is not None)
            self._add_separator_tokens(model, tokenizer, args, peft_config)

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
        self.separators = None
        if reads_items:
            self.separators = QASeparators.from_tokenizer(
                tokenizer, args.qa_token, args.answer_token, args.question_end
            )
        if reads_items and self.train_dataset is not None:
            hint = self._truncation_hints.get("train")
            check_set_targets(self.train_dataset, self.separators, tokenizer, "train_dataset", args, hint)
        if args.lambda_set > 0 and args.packing and not self.padding_free:
            logger.warning(
                "packing_strategy=%r without padding_free packs documents into rows without sequence boundaries, so "
                "the set loss pairs the items of a row across its documents. Use packing_strategy='bfd' (the "
                "default) or padding_free=True.",
                args.packing_strategy,
            )
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(type(base).forward).parameters
        # FSDP and DeepSpeed gather parameters in the wrapped model's forward: there, "aligned" scores through it.
        self._argmax_from_hidden_states = not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
        self._set_count_in_batch = None
        if args.eval_generate_samples > 0 and self.eval_dataset is None and args.eval_strategy == "no":
            # A recipe that turns evaluation off (`--eval_strategy no`) also turns off its generation metrics.
            logger.warning(
                "`eval_generate_samples` is set, but there is no eval dataset and `eval_strategy` is 'no': "
                "the answer-set evaluation is off."
            )
        elif args.eval_generate_samples > 0:
            self.add_callback(QASetEvalCallback(self))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` skips checkpoints a killed run left half-written."""
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    @staticmethod
    def _named_datasets(train_dataset, eval_dataset) -> dict:
        """`{"train_dataset": ..., "eval_dataset": ...}` (`eval_dataset['name']` for a dict), without the `None`s."""
        datasets = {"train_dataset": train_dataset}
        if isinstance(eval_dataset, dict):
            datasets.update({f"eval_dataset[{k!r}]": v for k, v in eval_dataset.items()})
        else:
            datasets["eval_dataset"] = eval_dataset
        return {name: dataset for name, dataset in datasets.items() if dataset is not None}

    @staticmethod
    def _format_structured(args: QALossConfig, train_dataset, eval_dataset):
        """The datasets with structured `{"context", "qas"}` rows converted by `format_qas_dataset`, as the CLI does."""
        separators = {name: getattr(args, name) for name in ("qa_token", "answer_token", "question_end")}
        train_dataset = format_structured(train_dataset, source="train_dataset", **separators)
        if isinstance(eval_dataset, dict):
            return train_dataset, {
                k: format_structured(v, source=f"eval_dataset[{k!r}]", **separators) for k, v in eval_dataset.items()
            }
        return train_dataset, format_structured(eval_dataset, source="eval_dataset", **separators)

    @staticmethod
    def _check_datasets(args: QALossConfig, train_dataset, eval_dataset, has_formatting_func: bool) -> None:
        for name, dataset in QALossSFTTrainer._named_datasets(train_dataset, eval_dataset).items():
            check_columns(dataset, name, args.dataset_text_field, has_formatting_func)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL's preparation; before truncating to `max_length`, counts the rows and target answers it cuts and warns
        (the hint is repeated if no target answer survives)."""
        if not (_reads_items(args) and args.max_length is not None and not packing and isinstance(dataset, Dataset)):
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        untruncated_args = copy.copy(args)
        untruncated_args.max_length, untruncated_args.shuffle_dataset = None, False
        full = super()._prepare_dataset(
            dataset, processing_class, untruncated_args, packing, formatting_func, dataset_name
        )
        tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
        seps = QASeparators.from_tokenizer(tokenizer, args.qa_token, args.answer_token, args.question_end)
        report = truncation_report(full, args.max_length, args.truncation_mode == "keep_end", seps)
        if report.cut_answers:
            self._truncation_hints[dataset_name] = report.message(f"{dataset_name}_dataset", args.max_length)
            logger.warning(self._truncation_hints[dataset_name])
        # `full` is tokenized and labelled, so TRL only truncates it (and shuffles it if asked).
        return super()._prepare_dataset(full, processing_class, args, packing, None, dataset_name)

    @staticmethod
    def _check_supported(args: QALossConfig, kwargs: dict, positional: tuple = ()) -> None:
        if args.loss_type != "nll":
            raise ValueError(f"`loss_type={args.loss_type!r}` is not supported with `lambda_set > 0`; use 'nll'.")
        if args.label_smoothing_factor > 0:
            raise ValueError("`label_smoothing_factor > 0` is not supported with `lambda_set > 0`; set it to 0.")
        # `compute_loss_func` follows `processing_class` in SFTTrainer's signature.
        if kwargs.get("compute_loss_func", positional[0] if positional else None) is not None:
            raise ValueError("`compute_loss_func` replaces the loss; it cannot be combined with `lambda_set > 0`.")

    @staticmethod
    def _add_separator_tokens(model, tokenizer, args: QALossConfig, peft_config) -> None:
        missing = [t for t in (args.qa_token, args.answer_token) if not is_single_token(tokenizer, t)]
        if not missing:
            return
        if hasattr(model, "peft_config"):
            raise ValueError(
                f"The separators {missing} are not single tokens and the model is already a PeftModel, whose "
                "embeddings cannot be resized here. Pass the base model and a `peft_config` instead, or add the tokens "
                "and resize the embeddings before wrapping it."
            )
        tokenizer.add_tokens(missing, special_tokens=True)
        new_ids = tokenizer.convert_tokens_to_ids(missing)
        # The new rows are sampled (mean resizing): seeded here, as `Trainer` would seed, so that they follow `seed`.
        if args.full_determinism:
            enable_full_determinism(args.seed)
        else:
            set_seed(args.seed)
        model.resize_token_embeddings(len(tokenizer))
        logger.warning("Added %s to the tokenizer as special tokens %s and resized the embeddings.", missing, new_ids)
        if peft_config is not None:
            indices = peft_config.trainable_token_indices
            if indices is None:
                peft_config.trainable_token_indices = list(new_ids)  # PEFT reads a list as the input embeddings
            elif isinstance(indices, dict):
                name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings()).split(".")[-1]
                indices.setdefault(name, []).extend(new_ids)
            else:
                indices.extend(new_ids)
            if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
                logger.warning(
                    "The embeddings are not tied: the LM head rows of %s stay frozen under PEFT. Add the LM head to "
                    "`modules_to_save` to train them, or use a tokenizer that already has the separators.",
                    missing,
                )

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
            inputs = self._reorder_answers(model, inputs)
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

    def _reorder_answers(self, model, inputs: dict) -> dict:
        """`inputs` with `input_ids` and `labels` rewritten in the configured `answer_order` (see `reorder_answers`).

        "preferred" and "aligned" run one forward without gradient on the batch as given, dropout off, building
        only the logits they read: one position per item for "preferred", the argmax of the labelled positions for
        "aligned".
        The batch is left as it is when no item has two answers.
        """
        order = self.args.answer_order
        labels = inputs["labels"]
        targets = labels[:, 1:]
        seq_starts = seq_starts_from(inputs.get("position_ids"))
        num_ids = self.separators.num_ids(targets)
        cores = parse_cores(targets, self.separators, num_ids, seq_starts)
        if not cores.sets.per_item.numel() or int(cores.sets.per_item.max()) < 2:
            return inputs
        if order == "canonical":
            keys = canonical_keys(cores)
        elif order == "preferred":
            rows, positions = preferred_score_positions(cores)
            kept, index = positions.unique(return_inverse=True)
            logits = self._scoring_logits(model, inputs, kept)
            keys = preferred_keys(logits[rows, index, cores.first_token])
        else:
            predictions = self._scoring_argmax(model, inputs, targets)
            valid = targets != -100
            # Models often have more output rows than the tokenizer has tokens; those ids are skip tokens.
            num_ids = self.separators.num_ids(targets, predictions)
            alignment = align_answers(targets, predictions, valid, self.separators, num_ids, seq_starts)
            cores = cores_of(alignment.target_tokens, alignment.target_answers, valid)
            keys = aligned_keys(alignment)
        input_ids, labels = apply_answer_order(inputs["input_ids"], labels, cores, new_answer_order(cores, keys))
        return {**inputs, "input_ids": input_ids, "labels": labels}

    @contextlib.contextmanager
    def _dropout_off(self, model):
        """Dropout layers in eval mode, so that a scoring forward does not depend on a random mask. Only them: in
        eval mode, bitsandbytes' 4-bit layers repack their weights in place on some CPUs, which breaks the next
        training step."""
        dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
        for m in dropouts:
            m.eval()
        try:
            yield
        finally:
            for m in dropouts:
                m.train()

    @torch.no_grad()
    def _scoring_logits(self, model, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
        """`[B, K, V]` logits at the sorted `positions` `[K]` of a forward without gradient on `inputs`."""
        forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        forward_inputs["use_cache"] = False
        if self._accepts_logits_to_keep:
            # A tail is kept with an int (every model takes it); other positions with a 1-D index tensor.
            contiguous = int(positions[-1]) - int(positions[0]) + 1 == positions.numel()
            ends_the_row = contiguous and int(positions[-1]) == inputs["labels"].size(1) - 1
            forward_inputs["logits_to_keep"] = positions.numel() if ends_the_row else positions
        with self._dropout_off(model):
            logits = model(**forward_inputs).logits
        return logits if self._accepts_logits_to_keep else logits[:, positions]

    @torch.no_grad()
    def _scoring_argmax(self, model, inputs: dict, targets: torch.Tensor) -> torch.Tensor:
        """`[B, P]` the argmax of a forward without gradient at every labelled target position (0 elsewhere).

        When the model can be split into its backbone and LM head (not under FSDP or DeepSpeed, which shard them),
        only the backbone's hidden states are kept and the LM head runs on chunks of the labelled rows: no
        `[B, T, V]` logits are built. Final-logit scaling and soft-capping, which some models apply after the head,
        are monotone and leave the argmax as it is.
        """
        valid = targets != -100
        first = int(valid.any(0).nonzero()[0])
        predictions = torch.zeros_like(targets)
        parts = self._backbone_and_head(model) if self._argmax_from_hidden_states else None
        if parts is None:
            tail = torch.arange(first, targets.size(1) + 1, device=targets.device)  # logits positions first..T-1
            logits = self._scoring_logits(model, inputs, tail)
            predictions[:, first:] = argmax_predictions(logits, targets[:, first:])
            return predictions
        backbone, head = parts
        forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        forward_inputs["use_cache"] = False
        with self._dropout_off(model):
            hidden = backbone(**forward_inputs).last_hidden_state  # [B, T, H]
        rows_b, rows_p = valid.nonzero(as_tuple=True)  # logits[:, p] predicts targets[:, p]
        step = max(1, (CHUNK_ELEMENTS if hidden.device.type == "cpu" else CUDA_CHUNK_ELEMENTS) // head.out_features)
        for start in range(0, rows_b.numel(), step):
            b, p = rows_b[start : start + step], rows_p[start : start + step]
            predictions[b, p] = head(hidden[b, p].to(head.weight.device)).argmax(-1).to(predictions.device)
        return predictions

    def _backbone_and_head(self, model):
        """`(backbone, lm_head)` of the model being trained, or None if it has no such split."""
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        backbone = getattr(base, "base_model", None)
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if backbone is None or backbone is base or not isinstance(getattr(head, "weight", None), torch.Tensor):
            return None
        if not hasattr(head, "out_features"):
            return None
        return backbone, head

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
