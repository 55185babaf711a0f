"""The separator tokens in the tokenizer and the model: added as special tokens when they are not single tokens, the
embeddings resized, and the new rows made trainable under PEFT."""

from __future__ import annotations

import logging

from transformers import set_seed
from transformers.trainer_utils import enable_full_determinism

from .config import QALossConfig
from .engine.separators import is_single_token

logger = logging.getLogger(__name__)


def missing_separators(tokenizer, qa_token: str, answer_token: str) -> list[str]:
    """The separators that are not single tokens of `tokenizer`: those `QALossSFTTrainer` adds as special tokens."""
    return [t for t in (qa_token, answer_token) if not is_single_token(tokenizer, t)]


def add_separator_tokens(model, tokenizer, args: QALossConfig, peft_config) -> None:
    """Add `args.qa_token` and `args.answer_token` to `tokenizer` as special tokens if either is not a single token,
    resize `model`'s embeddings (new rows drawn after seeding with `args.seed`) and, with a `peft_config`, list the
    new rows in its `trainable_token_indices`. A model already wrapped by PEFT cannot be resized: ValueError."""
    missing = missing_separators(tokenizer, args.qa_token, args.answer_token)
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
