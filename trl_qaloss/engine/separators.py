"""Token classes the parser needs, read once from a tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def is_single_token(tokenizer, text: str) -> bool:
    """Whether the tokenizer encodes `text` as exactly one known token (not split, not mapped to the unknown token)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    unknown = ids[:1] == [getattr(tokenizer, "unk_token_id", None)] and text != getattr(tokenizer, "unk_token", None)
    return len(ids) == 1 and not unknown


def special_token_ids(tokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens: its named ones and every added token marked special."""
    special = set(tokenizer.all_special_ids)
    return special | {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}


def _single_token_id(tokenizer, text: str, field_name: str) -> int:
    """Id of `text` if the tokenizer keeps it as one token; a ValueError that says how to fix it otherwise."""
    if not text:
        raise ValueError(f"`{field_name}` must be a non-empty string.")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not is_single_token(tokenizer, text):
        raise ValueError(
            f"`{field_name}`={text!r} is not a single token of this tokenizer (it encodes to {ids}). Add it as a "
            f"special token and resize the embeddings: `tokenizer.add_tokens([{text!r}], special_tokens=True)` then "
            f"`model.resize_token_embeddings(len(tokenizer))`. `QALossSFTTrainer` does this itself."
        )
    return ids[0]


@dataclass(frozen=True)
class QASeparators:
    """Ids of the separators and the token classes used to parse `<QA> question? <A> answer <A> answer ...`.

    Attributes:
        qa_id: id of the token that starts a question/answer item.
        answer_id: id of the token that starts an answer.
        question_end_ids: every non-special token whose text contains the question end (`?`, ` ?`, `?"`, ...).
        skip_ids: special tokens other than the two separators (EOS, pad, ...) and whitespace-only tokens; they never
            count as answer tokens.
        vocab_size: number of ids the classes were read from; ids at or above it (padded embedding rows) are skipped.
    """

    qa_id: int
    answer_id: int
    question_end_ids: frozenset[int]
    skip_ids: frozenset[int] = frozenset()
    vocab_size: int | None = None
    _masks: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        if self.qa_id == self.answer_id:
            raise ValueError(f"`qa_token` and `answer_token` must be different tokens; both are id {self.qa_id}.")
        # The separators are never question ends nor skipped, whatever their text.
        object.__setattr__(self, "question_end_ids", frozenset(self.question_end_ids) - {self.qa_id, self.answer_id})
        object.__setattr__(self, "skip_ids", frozenset(self.skip_ids) - {self.qa_id, self.answer_id})

    @classmethod
    def from_tokenizer(
        cls, tokenizer, qa_token: str = "<QA>", answer_token: str = "<A>", question_end: str = "?"
    ) -> QASeparators:
        """Read the separators and token classes from `tokenizer` (a `PreTrainedTokenizerBase`).

        Raises:
            ValueError: if `qa_token` or `answer_token` is not a single token, or `question_end` is empty.
        """
        if not question_end:
            raise ValueError("`question_end` must be a non-empty string, e.g. '?'.")
        qa_id = _single_token_id(tokenizer, qa_token, "qa_token")
        answer_id = _single_token_id(tokenizer, answer_token, "answer_token")
        special = special_token_ids(tokenizer)
        vocab_size = len(tokenizer)
        # One batched decode of every id: BPE tokens carry their spaces and punctuation merged in.
        texts = tokenizer.batch_decode(
            [[i] for i in range(vocab_size)], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        question_end_ids = {i for i, t in enumerate(texts) if question_end in t and i not in special}
        skip_ids = (special - {qa_id, answer_id}) | {i for i, t in enumerate(texts) if not t.strip()}
        if not question_end_ids:
            raise ValueError(
                f"No token of this tokenizer contains `question_end`={question_end!r}; questions could never end. "
                "Set `question_end` to text the tokenizer has."
            )
        return cls(qa_id, answer_id, frozenset(question_end_ids), frozenset(skip_ids), vocab_size)

    def is_question_end(self, token: int) -> bool:
        return token in self.question_end_ids

    def is_skip(self, token: int) -> bool:
        return token in self.skip_ids or (self.vocab_size is not None and token >= self.vocab_size)

    def num_ids(self, *token_ids: torch.Tensor) -> int:
        """How many ids the token-class tables must cover: the tokenizer's vocabulary, or more if `token_ids` (any
        shapes; -100 and other negative labels ignored) hold larger ids, as a model with padded embeddings predicts."""
        largest = max((int(t.max()) for t in token_ids if t.numel()), default=0)
        return max(self.vocab_size or 0, largest + 1)

    def masks(self, num_ids: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean lookup tables `(is_question_end, is_skip)`, each `[num_ids]`, cached per size and device.

        `num_ids` is the model's vocabulary size, which may exceed the tokenizer's (padded embeddings): those extra
        ids decode to nothing, so they are skip tokens.
        """
        key = (num_ids, str(device))
        if key not in self._masks:
            is_qend = torch.zeros(num_ids, dtype=torch.bool)
            is_skip = torch.zeros(num_ids, dtype=torch.bool)
            is_qend[[i for i in self.question_end_ids if i < num_ids]] = True
            is_skip[[i for i in self.skip_ids if i < num_ids]] = True
            if self.vocab_size is not None and self.vocab_size < num_ids:
                is_skip[self.vocab_size :] = True
            self._masks[key] = (is_qend.to(device), is_skip.to(device))
        return self._masks[key]
