"""The grounded demo task (`trl_qaloss/demo/data_grounded`): answers read off the prompt, and a base that can copy.

What the task must hold for the comparison of answer orders on it to mean something: passages of 15-30 names, 1-2
questions of 4-12 answers each, one question in five mixing names in the passage with names only the base knows,
held-out passages that are new, and `appearance` giving exactly the passage's order.
"""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoTokenizer

from trl_qaloss.demo import (
    DATA_DIR,
    GROUNDED_DATA_DIR,
    GROUNDED_MODEL_DIR,
    HARD_DATA_DIR,
    LONG_DATA_DIR,
    LONG_MODEL_DIR,
    MODEL_DIR,
    make_demo,
)
from trl_qaloss.engine.normalization import first_occurrence, normalize_answer
from trl_qaloss.reordered_data import reorder_rows


def rows_of(directory, split: str) -> list[dict]:
    with open(directory / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def grounded():
    """`(world, train rows, eval rows)` of the shipped task, the world redrawn from its seed."""
    world, _ = make_demo.make_grounded_task(make_demo.grounded_rng(0), num_rows=0)
    return world, rows_of(GROUNDED_DATA_DIR, "train"), rows_of(GROUNDED_DATA_DIR, "eval")


@pytest.fixture(scope="module")
def grounded_tokenizer():
    return AutoTokenizer.from_pretrained(GROUNDED_MODEL_DIR)


def passage_and_asks(context: str) -> tuple[str, str]:
    passage, _, asks = context.partition(" which ")  # no sentence of a passage has the word
    return passage, "which " + asks


def mentions(passage: str) -> list[str]:
    """The names a passage mentions, in order: each sentence is an opener and a list `a, b and c`."""
    names = []
    for sentence in passage.removesuffix(".").split(". "):
        opener = next(o for o in make_demo.GROUNDED_OPENERS if sentence.startswith(o + " "))
        names += re.split(r", | and ", sentence[len(opener) + 1 :])
    return names


def test_rows_are_passages_with_questions_about_them(grounded):
    world, train, held_out = grounded
    assert len(train) == 400 and len(held_out) == 80
    world_names = {n for facts in world.values() for names in facts.values() for n in names}
    questions = about_country = 0
    for row in train + held_out:
        passage, _ = passage_and_asks(row["context"])
        names = mentions(passage)
        assert 15 <= len(names) <= 30 and len(set(names)) == len(names)
        assert 1 <= len(row["qas"]) <= 2
        assert row["context"] == make_demo.grounded_prompt(passage, row["qas"])  # the prompt asks the questions
        kinds = [qa["question"].split()[1] for qa in row["qas"]]
        assert len(set(kinds)) == len(kinds)
        for qa, kind in zip(row["qas"], kinds, strict=True):
            questions += 1
            if qa["question"] == make_demo.GROUNDED_KINDS[kind]:  # about the passage: exactly its names of that kind
                assert 4 <= len(qa["answers"]) <= 12
                assert sorted(qa["answers"]) == sorted(n for n in names if make_demo.grounded_kind(n) == kind)
                assert not set(qa["answers"]) & world_names  # only the passage tells them
            else:  # about a country: all its names of that kind, some in the passage and some not
                about_country += 1
                country = qa["question"].removesuffix("?").split()[-1]
                assert qa["question"] == make_demo.GROUNDED_FACTS[kind].format(c=country)
                assert sorted(qa["answers"]) == sorted(world[country][kind])
                present = [a for a in qa["answers"] if a in names]
                assert 1 <= len(present) < len(qa["answers"])
    assert 0.15 < about_country / questions < 0.25
    assert not {r["context"] for r in held_out} & {r["context"] for r in train}  # held-out passages are new


def test_appearance_order_is_the_passages_order_then_canonical(grounded, grounded_tokenizer):
    """`answer_order="appearance"` on the shipped rows, through the code `trl-qaloss prepare` and the trainer share:
    the answers in the passage in the order it mentions them, then the others in `canonical` order."""
    _, train, held_out = grounded
    rows = train[:60] + held_out[:20]
    appearance = reorder_rows(rows, "appearance", grounded_tokenizer).rows
    canonical = reorder_rows(rows, "canonical", grounded_tokenizer).rows
    moved = 0
    for row, by_appearance, by_canonical in zip(rows, appearance, canonical, strict=True):
        names = mentions(passage_and_asks(row["context"])[0])
        for qa, ordered, sorted_qa in zip(row["qas"], by_appearance["qas"], by_canonical["qas"], strict=True):
            present = sorted((a for a in qa["answers"] if a in names), key=names.index)
            absent = [a for a in sorted_qa["answers"] if a not in names]
            assert ordered["answers"] == present + absent
            moved += ordered["answers"] != sorted_qa["answers"]
    assert moved > 0.9 * sum(len(r["qas"]) for r in rows)  # the two orders differ on nearly every item


@pytest.mark.parametrize(
    "data_dir, model_dir", [(DATA_DIR, MODEL_DIR), (HARD_DATA_DIR, MODEL_DIR), (LONG_DATA_DIR, LONG_MODEL_DIR)]
)
def test_on_the_fact_tasks_no_answer_is_in_the_prompt_so_appearance_is_canonical(data_dir, model_dir):
    """The three other demo tasks ask for facts: no answer occurs in its prompt, so `appearance` trains on exactly the
    targets `canonical` trains on, and the benchmark's runs of the two on them differ only by chance."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = rows_of(data_dir, "train") + rows_of(data_dir, "eval")
    for row in rows:
        prompt = normalize_answer(row["context"])
        assert not [a for qa in row["qas"] for a in qa["answers"] if first_occurrence(normalize_answer(a), prompt)]
    sample = rows[::8]
    assert reorder_rows(sample, "appearance", tokenizer).rows == reorder_rows(sample, "canonical", tokenizer).rows


def test_make_grounded_part_writes_its_base_and_new_held_out_passages(tmp_path):
    """`make_grounded_part` end to end at a tiny size (16 rows, 1 copy step, 2 pretraining steps of 2 texts before and
    2 after deepening): the base has its final depth, the 512-position context and the `GROUNDED_VOCAB_SIZE`
    tokenizer with the separators, and the rows are the first ones of the shipped task, drawn from the task's own
    random stream."""
    from transformers import AutoConfig

    make_demo.make_grounded_part(
        0,
        tmp_path,
        pretrain_steps=2,
        num_train=12,
        num_eval=4,
        batch_size=2,
        copy_batch_size=4,
        copy_until_loss=99.0,
        deep_steps=2,
    )
    config = AutoConfig.from_pretrained(tmp_path / "model_grounded")
    assert config.num_hidden_layers == make_demo.GROUNDED_DEEP_LAYERS
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model_grounded")
    assert config.max_position_embeddings == 512 and tokenizer.model_max_length == 512
    assert config.vocab_size == len(tokenizer) == make_demo.GROUNDED_VOCAB_SIZE
    assert tokenizer.convert_tokens_to_ids(["<QA>", "<A>"]) == [3, 4]
    written = rows_of(tmp_path / "data_grounded", "train") + rows_of(tmp_path / "data_grounded", "eval")
    assert written == rows_of(GROUNDED_DATA_DIR, "train")[:16]


def test_the_shipped_base_copies_names_from_its_prompt(grounded, grounded_tokenizer):
    """Before any fine-tuning, the base answers a held-out passage's plain-text question by naming names of the
    passage: the ability the task needs, which the other demo bases lack."""
    import torch
    from transformers import AutoModelForCausalLM

    _, _, held_out = grounded
    model = AutoModelForCausalLM.from_pretrained(GROUNDED_MODEL_DIR, dtype=torch.float32).eval()
    f1s = []
    for row in held_out[:16]:
        passage, _ = passage_and_asks(row["context"])
        qa = row["qas"][0]
        # as in pretraining: the question asked after the passage, then asked again to be answered
        ids = grounded_tokenizer(f"{passage} {qa['question']} {qa['question']}", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=64, do_sample=False, pad_token_id=grounded_tokenizer.pad_token_id)
        text = grounded_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split(".")[0]
        said = {a.strip() for a in re.split(r", | and ", text) if a.strip()}
        right = len(said & set(qa["answers"]))
        f1s.append(2 * right / (len(said) + len(qa["answers"])))
    assert sum(f1s) / len(f1s) > 0.5


def test_random_repeats_label_only_the_repeated_span():
    """The copy pretraining's rows: a span comes again after a gap, and only its second coming is a target (its first
    token excepted: nothing in the row says where the repeat starts)."""
    import random

    import torch

    ids, labels = make_demo.random_repeats(100, 32, torch.Generator().manual_seed(0), random.Random(0))
    assert ids.shape == labels.shape and ids.shape[0] == 32
    spans, starts = set(), set()
    for row, label in zip(ids.tolist(), labels.tolist(), strict=True):
        targets = [i for i, x in enumerate(label) if x != -100]
        assert targets == list(range(targets[0], targets[-1] + 1))  # one run, up to the row's end
        assert all(row[i] == label[i] for i in targets) and min(row[: targets[-1] + 1]) >= 5
        span = len(targets) + 1
        first = targets[0] - 1  # where the repeat starts
        assert 8 <= span <= 32 and row[first : first + span] in [row[j : j + span] for j in range(0, first - span + 1)]
        spans.add(span)
        starts.add(first)
    assert len(spans) > 5 and len(starts) > 5  # lengths and distances vary: no fixed offset to copy from


def test_learn_to_copy_stops_once_the_loss_is_low_and_says_so_when_it_is_not():
    tokenizer = AutoTokenizer.from_pretrained(LONG_MODEL_DIR)  # any shipped tokenizer: only its size matters here
    model = make_demo.fresh_model(tokenizer, 0, make_demo.LONG_MODEL_CONFIG)
    assert make_demo.learn_to_copy(model, 0, max_steps=5, batch_size=2, until_loss=99.0) == 1
    with pytest.raises(RuntimeError, match="did not learn to copy random tokens in 2 steps"):
        make_demo.learn_to_copy(model, 0, max_steps=2, batch_size=2, until_loss=0.0)


def test_the_grounded_pretraining_mix_is_mostly_passages_with_their_questions_answered(grounded):
    """Pretraining texts are plain text, never the `<QA>`/`<A>` format. An answered passage asks its questions as
    the task's prompts do, then answers each, listing exactly the names of the passage of each kind asked about (and
    a country's names from memory); such texts make up `answered_share` of the mix plus a third of the rest."""
    import random

    world, _, _ = grounded
    rng = random.Random(0)
    texts = [make_demo.grounded_pretraining_mix(world, rng) for _ in range(600)]
    assert not any("<QA>" in t or "<A>" in t for t in texts)
    answered = [t for t in texts if "once more:" not in t and not t.startswith("which ")]
    share = make_demo.GROUNDED_ANSWERED_SHARE
    assert abs(len(answered) / len(texts) - (share + (1 - share) / 3)) < 0.06
    checked = 0
    for text in answered[:50]:
        passage, _, answers = text.partition(" which ")
        named = set(mentions(passage))
        asked = re.findall(r"which [a-z ]+?\?", "which " + answers)
        assert asked[: len(asked) // 2] == asked[len(asked) // 2 :], text  # asked as a prompt asks, then answered
        for question, listed in re.findall(r"(which [a-z ]+?\?) ([^?]+?)\.(?: |$)", "which " + answers):
            names = re.split(r", | and ", listed)
            assert len(set(names)) == len(names), text  # no name twice
            if "passage" in question:
                kind = question.split()[1]
                assert set(names) == {n for n in named if make_demo.grounded_kind(n) == kind}, text
                checked += 1
    assert checked > 20
    everything = [make_demo.grounded_pretraining_mix(world, random.Random(1), answered_share=1.0) for _ in range(5)]
    assert all(" once more: " not in t and not t.startswith("which ") for t in everything)


def test_deepen_adds_layers_that_start_as_the_identity():
    """The deeper base computes exactly what the shallower one did (the copying it learned is kept), keeps its
    weights, and its new layers are trainable: their output projections get gradients."""
    import torch

    tokenizer = AutoTokenizer.from_pretrained(LONG_MODEL_DIR)  # any shipped tokenizer: only its size matters here
    shallow = make_demo.fresh_model(tokenizer, 0, make_demo.GROUNDED_MODEL_CONFIG).eval()
    deep = make_demo.deepen(shallow, 4, seed=1).eval()
    assert deep.config.num_hidden_layers == 4 and shallow.config.num_hidden_layers == 2
    for name, weight in shallow.state_dict().items():
        assert torch.equal(deep.state_dict()[name], weight), name
    ids = torch.randint(5, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(deep(input_ids=ids).logits, shallow(input_ids=ids).logits, atol=1e-5)
    deep.train()
    deep(input_ids=ids, labels=ids).loss.backward()
    for layer in deep.model.layers[2:]:
        assert layer.self_attn.o_proj.weight.grad.abs().sum() > 0 and layer.mlp.down_proj.weight.grad.abs().sum() > 0
