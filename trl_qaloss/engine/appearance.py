"""Where the `"appearance"` order reads its text: each item's prompt and answers, decoded and normalized.

The prompt of an item is everything its completion follows: the tokens of its sequence (its row, or its packed
sequence) before the first `qa_token` of the labelled run that holds the item. With a completion-only loss that is
the prompt (and any completion text before the first item); with a chat whose assistant turns alone are trained, every
turn before the item's turn and that turn's header; with every token trained, everything before the first item.

Text is read as the metrics read answers: decoded with the tokenizer that made the tokens, then normalized by
`normalize_answer`. An answer occurs in its prompt when its normalized text appears in the prompt's normalized text
on word boundaries (`first_occurrence`): reading text, not token ids, finds the same word tokenized with and without
a leading space.

Dimension letters as in `loss.py`: B rows, T positions (un-shifted), P = T - 1 target positions, A target answers of
the batch, I items.
"""

from __future__ import annotations

import numpy as np
import torch

from .normalization import first_occurrence, normalize_answer
from .separators import QASeparators, special_token_ids

# The rank of an answer that does not occur in its prompt: after every answer that does.
ABSENT = 1


class TokenText:
    """Token ids read as normalized text, decoded with `tokenizer` (a `PreTrainedTokenizerBase`, or any object with
    `batch_decode`, `all_special_ids` and `added_tokens_decoder`).

    A special token (a separator, EOS, a chat-template marker) reads as a word break: the runs of other tokens
    between special tokens are decoded one by one and joined with a space, so that no two words merge across one.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = special_token_ids(tokenizer)

    def normalized(self, spans: list[list[int]]) -> list[str]:
        """The normalized text of each list of token ids in `spans`, decoded in one batch."""
        runs, owners = [], []
        for k, ids in enumerate(spans):
            run: list[int] = []
            for token in [*ids, None]:  # None closes the last run
                if token is None or token in self.special:
                    if run:
                        runs.append(run)
                        owners.append(k)
                    run = []
                else:
                    run.append(token)
        texts = self.tokenizer.batch_decode(runs, clean_up_tokenization_spaces=False) if runs else []
        parts: list[list[str]] = [[] for _ in spans]
        for k, text in zip(owners, texts, strict=True):
            parts[k].append(text)
        return [normalize_answer(" ".join(p)) for p in parts]


def as_token_text(tokenizer) -> TokenText:
    return tokenizer if isinstance(tokenizer, TokenText) else TokenText(tokenizer)


def prompt_bounds(
    targets: torch.Tensor, seps: QASeparators, seq_starts: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`([I], [I], [I])`: the row, first token and end token (exclusive, un-shifted) of every item's prompt.

    Items are numbered as the loss numbers them, which is the order of their labelled `qa_token`s in the batch.
    `targets`: `[B, P]` shifted labels, -100 where ignored; `seq_starts`: optional `[B, P]` bool, where a packed
    sequence starts.
    """
    valid = targets != -100
    positions = torch.arange(1, targets.size(1) + 1, device=targets.device)  # target p is token p + 1
    starts = torch.zeros_like(valid) if seq_starts is None else seq_starts.to(valid.device, torch.bool)
    previous_valid = torch.nn.functional.pad(valid[:, :-1], (1, 0), value=False)
    run_start = valid & (~previous_valid | starts)
    # The last run start and sequence start at or before each position, as the token that holds it (0: none).
    run_token = (positions * run_start).cummax(1).values
    seq_token = (positions * starts).cummax(1).values
    row, pos = (valid & (targets == seps.qa_id)).nonzero(as_tuple=True)
    # The first item of each run: the items come in (row, position) order, so it is the first with its run.
    run_key = row * targets.size(1) + run_token[row, pos]
    _, run_of, counts = torch.unique_consecutive(run_key, return_inverse=True, return_counts=True)
    first_of_run = (counts.cumsum(0) - counts)[run_of]
    return row, seq_token[row, pos], pos[first_of_run] + 1


def appearance_ranks(
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    seps: QASeparators,
    seq_starts: torch.Tensor | None,
    answers: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ordered: torch.Tensor,
    text: TokenText,
) -> np.ndarray:
    """`[A, 2]` sort keys: `(0, offset)` for an answer that occurs in its item's prompt, first at character `offset`
    of the normalized prompt, and `(ABSENT, 0)` for one that does not.

    Args:
        input_ids: `[B, T]` the tokens; targets, seq_starts: as in `prompt_bounds`.
        answers: `([A], [A], [A], [A])` the row, global item, and shifted positions of the `answer_id` token and of
            the last non-skip token of each answer (its core).
        ordered: `[A]` bool, the answers whose items are reordered; the others are not read and rank absent.
        text: decodes and normalizes token ids.
    """
    row, item, start, end = (t.tolist() for t in answers)
    ranks = np.zeros((len(row), 2), dtype=np.int64)
    ranks[:, 0] = ABSENT
    read = ordered.nonzero().flatten().tolist()
    if not read:
        return ranks
    prompt_row, prompt_first, prompt_end = (t.tolist() for t in prompt_bounds(targets, seps, seq_starts))
    ids = input_ids.tolist()
    # Items of one sequence often share their prompt: each distinct prompt is decoded once.
    prompts: dict[tuple[int, int, int], int] = {}
    prompt_of = [
        prompts.setdefault((prompt_row[item[a]], prompt_first[item[a]], prompt_end[item[a]]), len(prompts))
        for a in read
    ]
    prompt_texts = text.normalized([ids[b][first:end] for b, first, end in prompts])
    # The core's tokens after its `answer_id` token: shifted positions start + 1 .. end are tokens start + 2 .. end + 1.
    answer_texts = text.normalized([ids[row[a]][start[a] + 2 : end[a] + 2] for a in read])
    for a, prompt, answer in zip(read, prompt_of, answer_texts, strict=True):
        offset = first_occurrence(answer, prompt_texts[prompt])
        if offset is not None:
            ranks[a] = (0, offset)
    return ranks
