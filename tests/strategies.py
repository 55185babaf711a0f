"""Hypothesis strategies of adversarial token rows and batches for the set loss, shared by the property tests."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.testing_utils import build_tokenizer
from trl_qaloss import QASeparators

# Derandomized, so CI runs the same examples every time; no deadline, since the naive reference is slow by design.
settings.register_profile(
    "qaloss-robustness",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("qaloss-robustness")

TOKENIZER = build_tokenizer()
SEPS = QASeparators.from_tokenizer(TOKENIZER)
VOCAB = len(TOKENIZER)
QA, ANS = SEPS.qa_id, SEPS.answer_id
QEND = sorted(SEPS.question_end_ids)
SKIP = sorted(SEPS.skip_ids)  # EOS, pad, unk and whitespace-only tokens
PLAIN = [i for i in range(VOCAB) if i not in SEPS.question_end_ids and i not in SEPS.skip_ids and i not in (QA, ANS)]
# Separators and `?`-tokens are frequent, so that every malformed arrangement of them comes up.
TOKEN = st.one_of(st.sampled_from([QA, ANS]), st.sampled_from(QEND), st.sampled_from(SKIP), st.sampled_from(PLAIN[:12]))


@st.composite
def long_item(draw) -> list[int]:
    """A well-formed item with hundreds of answers, cut anywhere (a truncated row ends inside an answer)."""
    question = draw(st.lists(st.sampled_from([ANS, *SKIP, *PLAIN[:12]]), max_size=4)) + [QEND[0]]
    answers = []
    for k in range(draw(st.integers(100, 160))):
        answers += [ANS] + [PLAIN[(k * 7 + j) % len(PLAIN)] for j in range(k % 2 + 1)]
    tokens = [QA] + question + answers
    return tokens[: draw(st.integers(len(tokens) // 2, len(tokens)))]


@st.composite
def short_item(draw) -> list[int]:
    """An item with random tokens sprinkled over its question and answers."""
    tokens = [QA] + draw(st.lists(TOKEN, max_size=3)) + [draw(st.sampled_from(QEND))]
    for _ in range(draw(st.integers(0, 4))):
        tokens += [ANS] + draw(st.lists(st.one_of(TOKEN, st.sampled_from(PLAIN[:12])), max_size=3))
    return tokens


@st.composite
def token_row(draw) -> list[int]:
    """Random tokens and items, now and then a long item."""
    parts = draw(st.lists(st.one_of(st.lists(TOKEN, max_size=30), short_item()), min_size=1, max_size=4))
    if draw(st.integers(0, 5)) == 0:
        parts.insert(draw(st.integers(0, len(parts))), draw(long_item()))
    return [t for p in parts for t in p]


def packed_position_ids(shape: torch.Size, cuts: list[list[int]]) -> torch.Tensor:
    """`[B, T]` position ids of rows cut into sequences: they restart at 0 at each of `cuts[b]` (sorted, in 1..T-1)."""
    position_ids = torch.zeros(shape, dtype=torch.long)
    for b, row_cuts in enumerate(cuts):
        for s, e in zip([0] + row_cuts, row_cuts + [shape[1]], strict=True):
            position_ids[b, s:e] = torch.arange(e - s)
    return position_ids


@st.composite
def batches(draw):
    """`(logits [B, T, V], labels [B, T], position_ids [B, T] or None)` for adversarial rows.

    Labels: random rows with a masked prompt, masked padding, masked holes, or masked entirely. Predictions: a noisy
    copy of the target, or unrelated tokens (garbage). Position ids, now and then: packed sequences.
    """
    rows = draw(st.lists(token_row(), min_size=1, max_size=3))
    length = max(len(r) for r in rows) + 1
    labels = torch.full((len(rows), length), -100)
    predicted = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        labels[b, 1 : 1 + len(row)] = torch.tensor(row, dtype=torch.long)
        mode = draw(st.sampled_from(["plain", "prompt", "hole", "all_masked"]))
        if mode == "prompt":
            labels[b, : draw(st.integers(0, length))] = -100
        elif mode == "hole":
            start = draw(st.integers(0, length - 1))
            labels[b, start : start + draw(st.integers(1, 8))] = -100
        elif mode == "all_masked":
            labels[b] = -100
        if draw(st.booleans()):  # a noisy copy of the target
            flips = draw(st.lists(st.tuples(st.integers(0, length - 1), TOKEN), max_size=10))
            predicted[b] = torch.where(labels[b] == -100, 0, labels[b])
            for pos, tok in flips:
                predicted[b, pos] = tok
        else:
            predicted[b] = torch.tensor(draw(st.lists(TOKEN, min_size=length, max_size=length)))
    # Models often pad their vocabulary past the tokenizer's; the padded ids decode to nothing and are skipped.
    vocab = draw(st.sampled_from([VOCAB, VOCAB + 5]))
    if vocab > VOCAB:
        for pos in draw(st.lists(st.tuples(st.integers(0, len(rows) - 1), st.integers(0, length - 1)), max_size=4)):
            predicted[pos] = draw(st.integers(VOCAB, vocab - 1))
    seed = draw(st.integers(0, 2**16))
    logits = torch.randn(len(rows), length, vocab, generator=torch.Generator().manual_seed(seed))
    logits[:, :-1].scatter_(2, predicted[:, 1:, None], 6.0)
    position_ids = None
    if length > 1 and draw(st.booleans()):
        # Each row cut into sequences.
        cuts = [sorted(set(draw(st.lists(st.integers(1, length - 1), max_size=3)))) for _ in rows]
        position_ids = packed_position_ids(labels.shape, cuts)
        if draw(st.booleans()):  # as TRL's collator does; a caller may also leave them
            labels[position_ids == 0] = -100
    return logits, labels, position_ids
