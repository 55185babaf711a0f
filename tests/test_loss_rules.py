"""Each rule of the set loss checked on its own, against values computed by hand or with Python sets (not only
against the reference, which implements the same rules)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from trl_qaloss import QASeparators, set_matching_loss
from trl_qaloss.engine.matching import AnswerSetMatcher, align_answers
from trl_qaloss.engine.similarity import token_iou


def plain_ids(seps: QASeparators, count: int) -> list[int]:
    """`count` ids that are neither separators, question ends nor skip tokens."""
    special = seps.question_end_ids | seps.skip_ids | {seps.qa_id, seps.answer_id}
    return [i for i in range(seps.vocab_size) if i not in special][:count]


def labels_and_logits(targets: list[int], predictions: list[int], vocab_size: int, bump: float = 5.0):
    """Un-shifted `labels` `[1, P + 1]` (the first masked) whose shifted targets are `targets`, and `logits`
    `[1, P + 1, V]`, zero but for `bump` at `predictions[p]` in row p: their argmax spells `predictions`."""
    assert len(targets) == len(predictions)
    labels = torch.tensor([[-100, *targets]])
    logits = torch.zeros(1, len(targets) + 1, vocab_size)
    logits[0, torch.arange(len(predictions)), torch.tensor(predictions)] = bump
    return logits, labels


def neg_log_prob(logits: torch.Tensor, pos: int, token: int) -> float:
    return -float(torch.log_softmax(logits[0, pos].double(), -1)[token])


# Similarity


def test_token_iou_equals_python_sets():
    rng = random.Random(0)
    preds = [set(rng.sample(range(12), rng.randint(0, 5))) for _ in range(7)]
    targets = [set(rng.sample(range(12), rng.randint(0, 5))) for _ in range(7)]
    intersection = torch.tensor([[[len(p & t) for t in targets] for p in preds]])
    iou = token_iou(intersection, torch.tensor([[len(p) for p in preds]]), torch.tensor([[len(t) for t in targets]]))
    expected = [[len(p & t) / len(p | t) if p | t else 0.0 for t in targets] for p in preds]
    assert iou.dtype == torch.float64 and iou.shape == (1, 7, 7)
    assert iou[0].tolist() == expected


def test_matcher_similarities_equal_python_sets(seps):
    """The similarity of every matched pair, from the batched overlap counts, equals the IoU of its token sets."""
    qa, ans, qend = seps.qa_id, seps.answer_id, min(seps.question_end_ids)
    words = plain_ids(seps, 6)
    rng = random.Random(1)
    rows = []
    for _ in range(3):
        row = []
        for _ in range(2):
            row += [qa, words[0], qend]
            for _ in range(rng.randint(1, 5)):
                row += [ans] + rng.choices(words, k=rng.randint(1, 3))
        rows.append(row)
    length = max(map(len, rows))
    targets = torch.tensor([r + [qa] * (length - len(r)) for r in rows])
    predictions = targets.clone()
    predictions[targets != ans] = torch.tensor(rng.choices(words, k=int((targets != ans).sum())))
    predictions[targets == qa] = qa
    predictions[targets == qend] = qend
    alignment = align_answers(targets, predictions, targets != -100, seps, seps.vocab_size)

    def token_sets(tokens, answers):
        return [set(tokens.token[s : s + n].tolist()) for s, n in zip(answers.entry_start, answers.length, strict=True)]

    pred_sets = token_sets(alignment.pred_tokens, alignment.pred_answers)
    target_sets = token_sets(alignment.target_tokens, alignment.target_answers)
    matching = alignment.matching
    assert matching.matched_pred.numel() > 5
    for i, j, sim in zip(matching.matched_pred, matching.matched_target, matching.matched_similarity, strict=True):
        p, t = pred_sets[i], target_sets[j]
        assert float(sim) == len(p & t) / len(p | t)


def test_matcher_uses_the_similarity_it_is_given(seps):
    qa, ans, qend = seps.qa_id, seps.answer_id, min(seps.question_end_ids)
    ann, bob = plain_ids(seps, 2)
    targets = torch.tensor([[qa, ann, qend, ans, ann, ans, bob]])
    predictions = torch.tensor([[qa, ann, qend, ans, bob, ans, ann]])
    valid = targets != -100

    def dissimilarity(intersection, pred_sizes, target_sizes):
        return 1.0 - token_iou(intersection, pred_sizes, target_sizes)

    def pairs(matching):
        return sorted(zip(matching.matched_pred.tolist(), matching.matched_target.tolist(), strict=True))

    by_iou = align_answers(targets, predictions, valid, seps, seps.vocab_size).matching
    assert pairs(by_iou) == [(0, 1), (1, 0)] and by_iou.matched_similarity.tolist() == [1.0, 1.0]
    matcher = AnswerSetMatcher(similarity=dissimilarity)
    other = align_answers(targets, predictions, valid, seps, seps.vocab_size, matcher=matcher).matching
    assert pairs(other) == [(0, 0), (1, 1)] and other.matched_similarity.tolist() == [1.0, 1.0]


# Pair costs, computed by hand


def test_multi_token_missing_answer_costs_its_length_times_log_v(seps):
    """A missing answer of L tokens costs L log V, whatever the logits."""
    qa, ans, qend = seps.qa_id, seps.answer_id, min(seps.question_end_ids)
    x, y, z, u = plain_ids(seps, 4)
    targets = [qa, x, qend, ans, x, y, z]
    logits, labels = labels_and_logits(targets, [qa, x, qend, u, u, u, u], seps.vocab_size)
    out = set_matching_loss(logits, labels, seps, reduction="sum")
    assert out.stats["missing"] == 1 and out.stats["matched"] == 0
    assert out.loss.item() == pytest.approx(3 * math.log(seps.vocab_size), rel=1e-6)
    assert set_matching_loss(logits, labels, seps).loss.item() == pytest.approx(math.log(seps.vocab_size), rel=1e-6)


def test_pair_that_runs_off_the_row_costs_log_v_per_token_past_the_end(seps):
    """The predicted answer starts at the row's last target position: its first token is read there, the two that
    would follow lie past the end of the row and cost log V each."""
    qa, ans, qend = seps.qa_id, seps.answer_id, min(seps.question_end_ids)
    x, y, z, u = plain_ids(seps, 4)
    targets = [qa, x, qend, ans, x, y, z]
    predictions = [qa, x, qend, u, u, ans, x]
    logits, labels = labels_and_logits(targets, predictions, seps.vocab_size)
    out = set_matching_loss(logits, labels, seps, reduction="sum")
    assert out.stats["matched"] == 1 and out.stats["mean_iou"] == pytest.approx(1 / 3)
    expected = neg_log_prob(logits, 6, x) + 2 * math.log(seps.vocab_size)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_aligned_pair_reads_from_where_the_prediction_starts(seps):
    """Each target token of a matched pair costs -log p at the position the predicted answer starts from, plus its
    offset; nothing is read at the target answer's own positions."""
    qa, ans, qend = seps.qa_id, seps.answer_id, min(seps.question_end_ids)
    x, y, z, u = plain_ids(seps, 4)
    targets = [qa, x, qend, ans, x, y, u, u, u]
    predictions = [qa, x, qend, u, ans, y, x, u, u]
    logits, labels = labels_and_logits(targets, predictions, seps.vocab_size)
    out = set_matching_loss(logits, labels, seps, reduction="sum")
    # Target answer (x y u u u), predicted answer (y x u u) starting at position 5.
    assert out.stats["matched"] == 1
    expected = sum(neg_log_prob(logits, 5 + t, tok) for t, tok in enumerate([x, y, u, u, u]))
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_pair_read_never_crosses_into_the_next_packed_sequence(seps):
    """In a packed row, the pair of the first sequence would read its last token in the second sequence: that
    position costs log V, exactly as past the end of the first sequence's own row."""
    qa, ans, qend = seps.qa_id, seps.answer_id, min(seps.question_end_ids)
    x, y, z, u = plain_ids(seps, 4)
    first_targets, first_predictions = [qa, x, qend, ans, x, y, z], [qa, x, qend, u, u, ans, x]
    second_targets = [u, u, z, y, x]  # no item: the second sequence adds no cost of its own
    logits, labels = labels_and_logits(
        first_targets + [-100] + second_targets, first_predictions + [u] * 6, seps.vocab_size
    )
    # The second sequence starts at token 8: target position 7 (masked, as TRL's collator masks it) and 8 onwards.
    position_ids = torch.cat([torch.arange(8), torch.arange(6)])[None]
    out = set_matching_loss(logits, labels, seps, reduction="sum", position_ids=position_ids)
    assert out.stats["matched"] == 1
    expected = neg_log_prob(logits, 6, x) + 2 * math.log(seps.vocab_size)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    # Position 8, where z would be read, is labelled (in the second sequence) and would cost something else.
    assert labels[0, 9] != -100 and neg_log_prob(logits, 8, z) != pytest.approx(math.log(seps.vocab_size))


# Question ends


def bpe_tokenizer_with_merged_question_ends():
    """A byte-level BPE tokenizer trained on text where `?` merges with a quote, a space before it and a newline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.decoder = decoders.ByteLevel()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=" ", behavior="merged_with_next"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    texts = ['<QA> who wrote it?" <A> ann <A> bob', "<QA> who ? <A> ann", "<QA> where?\n<A> rome <A> paris"] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<eos>", "<QA>", "<A>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", additional_special_tokens=["<QA>", "<A>"]
    )


MERGED_QUESTION_ENDS = ['?"', " ?", "?\n"]


def test_merged_question_end_tokens_end_questions():
    tokenizer = bpe_tokenizer_with_merged_question_ends()
    seps = QASeparators.from_tokenizer(tokenizer)
    for text in MERGED_QUESTION_ENDS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1, (text, ids)  # the tokenizer merged it: the test is about that merged token
        assert seps.is_question_end(ids[0]), text


@pytest.mark.parametrize("question_end", MERGED_QUESTION_ENDS)
def test_question_ending_in_a_merged_token_has_answers(question_end):
    """A perfect prediction of an item whose question ends in a merged token: both answers are parsed and matched."""
    tokenizer = bpe_tokenizer_with_merged_question_ends()
    seps = QASeparators.from_tokenizer(tokenizer)
    text = f"<QA> who{question_end}<A> ann <A> bob"
    ids = tokenizer.encode(text, add_special_tokens=False)
    merged = tokenizer.encode(question_end, add_special_tokens=False)[0]
    assert merged in ids
    logits, labels = labels_and_logits(ids, ids, len(tokenizer), bump=30.0)
    out = set_matching_loss(logits, labels, seps, reduction="sum")
    assert (out.stats["target_answers"], out.stats["matched"], out.stats["mean_iou"]) == (2, 2, 1.0)
    after_question = range(ids.index(seps.answer_id), len(ids))
    answer_positions = [p for p in after_question if ids[p] != seps.answer_id and not seps.is_skip(ids[p])]
    assert len(answer_positions) == 2
    expected = sum(neg_log_prob(logits, p, ids[p]) for p in answer_positions)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-9)
