"""`format_qas` and dataset loading: the answers the converter writes are the answers the loss reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.testing_utils import ROOT
from trl_qaloss import QASeparators
from trl_qaloss.data import format_qas, format_qas_dataset, load_qa_dataset, qa_completion
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
from trl_qaloss.engine.parsing import parse_row


@pytest.fixture(scope="module")
def demo_tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def long_tokenizer():
    return AutoTokenizer.from_pretrained(LONG_MODEL_DIR)


def read_back(completion: str, tokenizer) -> list[list[str]]:
    """The items and answers `parse_row` reads from the tokenized completion, as text."""
    seps = QASeparators.from_tokenizer(tokenizer)
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    items = parse_row(ids, list(range(len(ids))), seps)
    return [[tokenizer.decode([tok for _, tok in answer]).strip() for answer in item] for item in items]


TASKS = {  # directory of a task asking for facts: (path, questions, base model, topics per prompt)
    "data": (DATA_DIR, make_demo.QUESTIONS, MODEL_DIR, (2, 3)),
    "data_hard": (HARD_DATA_DIR, make_demo.HARD_QUESTIONS, MODEL_DIR, (2, 3)),
    "data_long": (LONG_DATA_DIR, make_demo.LONG_QUESTIONS, LONG_MODEL_DIR, (1, 2)),
}
ALL_TASKS = {**TASKS, "data_grounded": (GROUNDED_DATA_DIR, None, GROUNDED_MODEL_DIR, (1, 2))}


def demo_rows(split: str, task: str = "data") -> list[dict]:
    with open(ALL_TASKS[task][0] / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("task", list(ALL_TASKS))
@pytest.mark.parametrize("split", ["train", "eval"])
def test_demo_rows_round_trip_through_the_parser(split, task):
    tokenizer = AutoTokenizer.from_pretrained(ALL_TASKS[task][2])
    for i, row in enumerate(demo_rows(split, task)):
        out = format_qas(row, i)
        assert out["prompt"] == row["context"]
        assert read_back(out["completion"], tokenizer) == [qa["answers"] for qa in row["qas"]]


@pytest.mark.parametrize("task", list(TASKS))
def test_demo_prompts_name_the_questions_in_order_and_eval_asks_new_combinations(task):
    questions, low, high = TASKS[task][1], *TASKS[task][3]
    train, held_out = demo_rows("train", task), demo_rows("eval", task)
    assert len(train) == 400 and len(held_out) == 80
    for row in train + held_out:
        prefix, _, topics = row["context"].removesuffix(".").partition(": its ")
        country = prefix.removeprefix("Tell me about ")
        topics = topics.replace(" and ", ", ").split(", ")
        assert [qa["question"] for qa in row["qas"]] == [questions[t].format(c=country) for t in topics]
        assert low <= len(topics) <= high
    # The prompt fixes the combination: a held-out prompt is never a training prompt.
    assert not {r["context"] for r in held_out} & {r["context"] for r in train}
    assert len({r["context"] for r in train}) == 400


def test_demo_answer_lists_come_in_random_order():
    """The same question's answers appear in more than one order across rows (and not only sorted)."""
    for task in TASKS:
        orders: dict[str, set[tuple[str, ...]]] = {}
        for row in demo_rows("train", task):
            for qa in row["qas"]:
                orders.setdefault(qa["question"], set()).add(tuple(qa["answers"]))
        shuffled = [q for q, seen in orders.items() if len(seen) > 1]
        assert len(shuffled) > len(orders) // 2, task


def first_token(tokenizer, answer: str) -> int:
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0]


def test_hard_demo_task_has_big_multi_token_answer_sets_sharing_first_tokens(demo_tokenizer):
    qas = [qa for row in demo_rows("train", "data_hard") for qa in row["qas"]]
    assert all(5 <= len(qa["answers"]) <= 8 for qa in qas)
    assert all(
        len(demo_tokenizer(" " + a, add_special_tokens=False)["input_ids"]) >= 2 for qa in qas for a in qa["answers"]
    )
    # Answer sets hold answers starting with the same token (`new ...`, `lake ...`): always for towns (more towns
    # than prefixes), peaks and lakes, and for most goods (`red wine`, `red clay`).
    for qa in qas:
        first = [first_token(demo_tokenizer, a) for a in qa["answers"]]
        if "export" not in qa["question"]:
            assert len(set(first)) < len(first), qa
    goods = [qa["answers"] for qa in qas if "export" in qa["question"]]
    shared = [a for a in goods if len({first_token(demo_tokenizer, x) for x in a}) < len(a)]
    assert len(shared) > 0.9 * len(goods)


def test_long_demo_task_has_long_multi_token_answer_lists_sharing_first_tokens(long_tokenizer):
    qas = [qa for split in ("train", "eval") for row in demo_rows(split, "data_long") for qa in row["qas"]]
    sizes = [len(qa["answers"]) for qa in qas]
    assert min(sizes) == 12 and max(sizes) == 30
    assert all(len(set(qa["answers"])) == len(qa["answers"]) for qa in qas)
    assert all(
        len(long_tokenizer(" " + a, add_special_tokens=False)["input_ids"]) >= 2 for qa in qas for a in qa["answers"]
    )
    # Every list has answers sharing their first token (more answers than first words, or pools of `red ...`).
    for qa in qas:
        first = [first_token(long_tokenizer, a) for a in qa["answers"]]
        assert len(set(first)) <= len(first) // 2, qa


@pytest.mark.parametrize(
    "name, data_dir, model_dir",
    [("long", LONG_DATA_DIR, LONG_MODEL_DIR), ("grounded", GROUNDED_DATA_DIR, GROUNDED_MODEL_DIR)],
)
def test_demo_rows_fit_the_benchmark_and_the_base_context(name, data_dir, model_dir):
    """Nothing is truncated: every row of the long and the grounded task fits its `max_length` in
    `benchmarks/set_vs_sft.py`, every held-out completion its `max_new_tokens`, and both the base model's 512-token
    context."""
    import importlib.util

    from transformers import AutoConfig

    spec = importlib.util.spec_from_file_location("set_vs_sft", Path(ROOT, "benchmarks", "set_vs_sft.py"))
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    task = bench.TASKS[name]
    assert Path(task.data) == data_dir and Path(task.model) == model_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    context = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    assert context == 512 and task.max_length + 1 <= context  # + the first generated token's position
    train, held_out = bench.split_data(task)
    for split, rows in (("train", train), ("eval", held_out)):
        for row in rows:
            prompt, completion = bench.prompt_completion_ids(tokenizer, row)
            assert len(prompt) + len(completion) <= task.max_length, split
            if split == "eval":
                assert len(completion) <= task.max_new_tokens and len(prompt) + task.max_new_tokens <= context


def test_make_demo_regenerates_the_shipped_data():
    """The generator is deterministic: seed 0 draws exactly the shipped rows of every task (no pretraining needed),
    the long task from a stream of its own."""
    import random

    for directory, (_, _, rows) in make_demo.make_tasks(random.Random(0)).items():
        assert rows == demo_rows("train", directory) + demo_rows("eval", directory), directory
    _, rows = make_demo.make_long_task(make_demo.long_rng(0))
    assert rows == demo_rows("train", "data_long") + demo_rows("eval", "data_long")
    _, rows = make_demo.make_grounded_task(make_demo.grounded_rng(0))
    assert rows == demo_rows("train", "data_grounded") + demo_rows("eval", "data_grounded")


def test_round_trip_with_multi_word_answers_and_an_empty_set(tokenizer):
    qas = [
        {"question": "Who wrote  it", "answers": ["ann  bob", "carl"]},
        {"question": "where?", "answers": []},
        {"question": "what?", "answers": ["the city of paris"]},
    ]
    out = format_qas({"prompt": "context:", "qas": qas})
    assert out["completion"] == " <QA> Who wrote it? <A> ann bob <A> carl <QA> where? <QA> what? <A> the city of paris"
    assert read_back(out["completion"], tokenizer) == [["ann bob", "carl"], [], ["the city of paris"]]


def test_conversational_prompt():
    prompt = [{"role": "user", "content": "Tell me about x."}]
    out = format_qas({"prompt": prompt, "qas": [{"question": "who?", "answers": ["a"]}]})
    assert out == {"prompt": prompt, "completion": [{"role": "assistant", "content": "<QA> who? <A> a"}]}


def test_custom_separators():
    out = format_qas({"context": "c", "qas": [{"question": "q", "answers": ["a"]}]}, qa_token="[Q]", answer_token="[A]")
    assert out["completion"] == " [Q] q? [A] a"


def test_a_question_end_of_several_characters():
    """`question_end="::"`: a question that ends with it is kept as it is, one without gets it appended, and one that
    holds it before its end is refused wherever it is, also within its last characters (the set loss would end the
    question there: `who::x` would be written `who::x::`, read as the question `who::`)."""

    def completion(question: str) -> str:
        return qa_completion([{"question": question, "answers": ["a"]}], question_end="::")

    assert completion("who::") == " <QA> who:: <A> a"
    assert completion("who") == " <QA> who:: <A> a"
    for question in ("who:: x", "who::x", "a::b::"):
        with pytest.raises(ValueError, match=r'`qas\[0\].question` contains "::" before its end'):
            completion(question)


@pytest.mark.parametrize(
    "row, field",
    [
        ({"qas": [{"question": "q?", "answers": ["a"]}]}, r"`context` \(or `prompt`\) is missing"),
        ({"context": "c"}, "`qas` is missing"),
        ({"context": "c", "prompt": "p", "qas": []}, "both `context` and `prompt`"),
        ({"context": "c", "qas": []}, "`qas` must be a non-empty list"),
        ({"context": "c", "qas": [{"answers": ["a"]}]}, r"`qas\[0\].question` is missing"),
        ({"context": "c", "qas": [{"question": "q?", "answers": ["a"]}, {"question": "r?"}]}, r"`qas\[1\].answers`"),
        ({"context": "c", "qas": [{"question": "q?", "answers": "a"}]}, r"`qas\[0\].answers` must be a list"),
        ({"context": "c", "qas": [{"question": "q?", "answers": ["a", 3]}]}, r"`qas\[0\].answers\[1\]` must be a str"),
        ({"context": "c", "qas": [{"question": "q?", "answers": ["a", " "]}]}, r"`qas\[0\].answers\[1\]` is empty"),
        ({"context": "c", "qas": [{"question": "q?", "answers": ["a <A> b"]}]}, r"answers\[0\]` contains the sep"),
        ({"context": "c", "qas": [{"question": "what? why?", "answers": ["a"]}]}, r"`qas\[0\].question` contains"),
        ({"context": 3, "qas": [{"question": "q?", "answers": ["a"]}]}, "`context` must be a string"),
    ],
)
def test_bad_rows_name_the_row_and_the_field(row, field):
    with pytest.raises(ValueError, match=f"Row 7 of f.jsonl: .*{field}"):
        format_qas(row, 7, source="f.jsonl")


def test_local_jsonl_is_converted_and_bad_rows_are_named(tmp_path):
    good = {"context": "c", "qas": [{"question": "q", "answers": ["a", "b"]}]}
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"context": "d", "qas": None}) + "\n")
    # the file's own 1-based line number
    with pytest.raises(ValueError, match=r"qa.jsonl, line 2: field `qas` is missing"):
        load_qa_dataset(str(path))
    path.write_text(json.dumps(good) + "\n")
    dataset = load_qa_dataset(str(path))
    assert dataset["train"].column_names == ["prompt", "completion"]
    assert dataset["train"][0]["completion"] == " <QA> q? <A> a <A> b"


def test_a_file_mixing_context_and_prompt_rows_is_converted(tmp_path):
    """`datasets` gives every row of the file both columns, null in the one a row does not have: each row is
    converted from the column it has, and the null in the other is no second prompt."""
    qas = [{"question": "q", "answers": ["a"]}]
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"context": "c", "qas": qas}) + "\n" + json.dumps({"prompt": "p", "qas": qas}) + "\n")
    dataset = load_qa_dataset(str(path))["train"]
    assert dataset.column_names == ["prompt", "completion"]
    assert list(dataset) == [
        {"prompt": "c", "completion": " <QA> q? <A> a"},
        {"prompt": "p", "completion": " <QA> q? <A> a"},
    ]


def test_a_file_of_blank_lines_only_is_empty(tmp_path):
    """A .jsonl file of blank lines holds no rows: it is said to be empty, not to have a blank line to remove (which
    would leave an empty file, refused next)."""
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"blank\.jsonl is empty: it has no rows\."):
        load_qa_dataset(str(path))


@pytest.mark.parametrize("directory", [DATA_DIR, HARD_DATA_DIR, LONG_DATA_DIR, GROUNDED_DATA_DIR])
def test_demo_directory_loads_both_splits(directory):
    dataset = load_qa_dataset(str(directory))
    assert dataset["train"].num_rows == 400 and dataset["test"].num_rows == 80
    assert set(dataset["test"].column_names) == {"prompt", "completion"}


def test_trl_formats_pass_through_and_unknown_columns_fail():
    from datasets import Dataset

    rows = Dataset.from_list([{"prompt": "p", "completion": " <QA> q? <A> a"}])
    assert format_qas_dataset(rows) is rows
    with pytest.raises(ValueError, match=r'columns \["question"\]'):
        format_qas_dataset(Dataset.from_list([{"question": "q"}]))


def test_every_demo_asset_is_package_data():
    """Every file of the offline demo (models, tokenizers, data, recipe) matches a `package-data` pattern of
    pyproject.toml, so that `pip install` ships it and `trl_qaloss/demo/...` paths resolve in any install."""
    import fnmatch

    import tomllib

    pyproject = tomllib.loads((Path(ROOT) / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["trl_qaloss.demo"]
    demo = Path(ROOT) / "trl_qaloss" / "demo"
    assets = [
        p.relative_to(demo).as_posix() for p in demo.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
    ]
    assert {"model_long/model.safetensors", "data_long/train.jsonl", "data_hard/eval.jsonl"} <= set(assets)
    assert {"model_grounded/model.safetensors", "data_grounded/train.jsonl", "data_grounded/eval.jsonl"} <= set(assets)
    missing = [a for a in assets if not any(fnmatch.fnmatch(a, pattern) for pattern in patterns)]
    assert not missing, f"add to [tool.setuptools.package-data] in pyproject.toml: {missing}"


def test_make_long_part_writes_its_base_and_held_out_combinations(tmp_path):
    """`make_long_part` end to end at a tiny size (16 rows, 2 pretraining steps of 2 paragraphs), into `tmp_path`:
    the base it writes has the 512-position context and the `LONG_VOCAB_SIZE` tokenizer that the long task's rows
    need, and its rows split into train and eval counts as asked, every eval row a question combination that no train
    row asks. The rows are the first ones of the shipped task: the long task's own random stream."""
    from transformers import AutoConfig

    make_demo.make_long_part(0, tmp_path, pretrain_steps=2, num_train=12, num_eval=4, batch_size=2)
    config = AutoConfig.from_pretrained(tmp_path / "model_long")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model_long")
    assert config.max_position_embeddings == 512 and tokenizer.model_max_length == 512
    assert config.vocab_size == len(tokenizer) == make_demo.LONG_VOCAB_SIZE == 1024
    assert tokenizer.convert_tokens_to_ids(["<QA>", "<A>"]) == [3, 4] and config.pad_token_id == tokenizer.pad_token_id
    rows = {}
    for split in ("train", "eval"):
        with open(tmp_path / "data_long" / f"{split}.jsonl") as f:
            rows[split] = [json.loads(line) for line in f]
    assert len(rows["train"]) == 12 and len(rows["eval"]) == 4
    assert not {r["context"] for r in rows["eval"]} & {r["context"] for r in rows["train"]}
    assert rows["train"] + rows["eval"] == demo_rows("train", "data_long")[:16]


@pytest.mark.parametrize(
    "answers, hint",
    [
        ("A, B", r' \(one string per answer: write \["A", "B"\]\), got "A, B"\.'),
        ("ann; bob; carl", r' \(one string per answer: write \["ann", "bob", "carl"\]\)'),
        ("Julie Sussman", r' \(write \["Julie Sussman"\] for one answer\), got "Julie Sussman"\.'),
        ("a,", r' \(write \["a,"\] for one answer\)'),  # an empty part: no list to split into
        (5, r", got 5\."),
    ],
)
def test_answers_given_as_one_string_get_the_list_to_write(answers, hint):
    with pytest.raises(ValueError, match=r"field `qas\[0\]\.answers` must be a list of strings" + hint):
        format_qas({"context": "c", "qas": [{"question": "who?", "answers": answers}]})


def test_a_row_without_a_field_the_others_have_is_named_by_its_line(tmp_path):
    """datasets 4.x cannot infer one schema for such a file (a KeyError inside its JSON builder): the rows are then
    read here, so the row check names the line and the field whichever datasets release is installed."""
    rows = Path(DATA_DIR, "train.jsonl").read_text().splitlines()[:2]
    path = tmp_path / "row3.jsonl"
    path.write_text("\n".join([*rows, '{"context": "c"}']) + "\n")
    with pytest.raises(ValueError, match=r"row3\.jsonl, line 3: field `qas` is missing\."):
        load_qa_dataset(str(path))


@pytest.mark.parametrize("task", list(TASKS))
def test_no_answer_of_the_demo_tasks_is_in_its_prompt_so_appearance_is_canonical(task):
    """The demo's tasks ask for facts the base learned: no answer occurs in its row's prompt, so `appearance` trains on
    exactly the targets `canonical` trains on (checked through `reorder_rows`, the code `trl-qaloss prepare` shares
    with the trainer), and the benchmark's runs of the two differ only where the machine or the releases differ."""
    from trl_qaloss.engine.normalization import first_occurrence, normalize_answer
    from trl_qaloss.reordered_data import reorder_rows

    rows = demo_rows("train", task) + demo_rows("eval", task)
    for row in rows:
        prompt = normalize_answer(row["context"])
        assert not [
            a for qa in row["qas"] for a in qa["answers"] if first_occurrence(normalize_answer(a), prompt) is not None
        ]
    tokenizer = AutoTokenizer.from_pretrained(TASKS[task][2])
    sample = rows[::8]
    canonical = reorder_rows(sample, "canonical", tokenizer)
    assert reorder_rows(sample, "appearance", tokenizer).rows == canonical.rows and canonical.moved > 0
