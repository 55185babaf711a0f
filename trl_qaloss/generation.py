"""Greedy completions of tokenized prompts, for the evaluation during training and for `generate`/`evaluate`."""

from __future__ import annotations

import torch
from transformers import GenerationConfig
from trl.trainer.utils import pad


def hidden_token_ids(tokenizer, separators: tuple[str, str]) -> set[int]:
    """The special tokens' ids, except the separators': what completions are decoded without."""
    visible = {tokenizer.convert_tokens_to_ids(t) for t in separators}
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    return special - visible


def greedy_completions(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, progress: bool = False
) -> list[list[int]]:
    """Greedy completions of tokenized prompts, in batches of `batch_size` with left padding.

    Returns the generated ids of each prompt, cut before the first EOS (the tokenizer's or the model's generation
    config's). Call it in eval mode under `torch.no_grad()`; `progress` shows a progress bar over the batches.
    """
    from tqdm.auto import tqdm

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos_ids = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos])
    eos_ids.discard(None)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos_ids),
        use_cache=True,
    )
    completions = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="Generating", unit="batch", disable=not progress):
        chunk = [torch.tensor(p) for p in prompts[start : start + batch_size]]
        input_ids = pad(chunk, padding_value=pad_id, padding_side="left").to(model.device)
        attention_mask = pad([torch.ones_like(p) for p in chunk], padding_side="left").to(model.device)
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        for ids in generated[:, input_ids.size(1) :].tolist():
            completions.append(ids[: next((i for i, token in enumerate(ids) if token in eos_ids), len(ids))])
    return completions
