"""Make the demo's assets: a small closed world, two question/answer-set tasks, a tokenizer and a tiny pretrained Llama.

    python -m trl_qaloss.demo.make_demo [--seed 0] [--out trl_qaloss/demo]

The world: fictional countries. Two tasks ask about them, each row naming a country and 2-3 topics in its prompt
(`Tell me about valdor: its rivers, ruler and cities.`); the completion asks one question per topic, in the order the
prompt names them, so the prompt determines which questions come and in what order. Each answer list is shuffled,
so the order of the answers carries no information: exactly where the set loss differs from cross-entropy.

- `data/`, the default task: cities, rivers, neighbours, languages and a ruler; 1-4 answers of one name each.
- `data_hard/`: towns (`new abo`, `port abo`, ...), peaks (`mount ...`), lakes (`lake ...`) and exported goods (`red
  wine`, `red clay`, ...): 5-8 answers of several tokens each, many sharing their first tokens, so the order of the
  answers and their shared prefixes both matter.
- `data_long/`: long lists, about a world of its own (16 countries): towns, peaks, lakes, goods, birds and trees,
  12-30 answers of several tokens each, many sharing their first tokens; each prompt names 1-2 topics, so a row
  holds up to 60 answers (at most 353 tokens with its tokenizer). With 20 answers a model trained on a fixed order
  must know which answer comes first before writing any: where the order of the training target could matter most.

Each task draws 480 distinct (country, ordered topics) combinations: the first 400 are `train.jsonl`, the last 80
`eval.jsonl`, so every held-out row is a question combination not in the training rows, with its own answer order.

The base model: LoRA on a randomly initialized model learns little, so the generator pretrains the tiny Llama
(full fine-tuning, fp32; 10 min of CPU time, 22 min on 2 cores shared with other jobs) on the facts of the first two
tasks written as plain text (`which rivers flow through valdor? oru and pell.`), never in the `<QA>`/`<A>` format. The
demo's QLoRA run then has to learn the structured format and give each answer set in it, as a real instruct
fine-tune would. The long task has a base of its own (`model_long/`, the same architecture with a 512-token context
and its own tokenizer), pretrained the same way on its facts (6 min on 2 cores); `--part long` makes only the long
task and its base, `--part demo` only the others.
The held-out rows ask about the same countries: they measure how well the facts and the format were learned, not
generalization to unseen countries.
Everything is drawn from `--seed`; the weights are bitwise reproducible on the same torch build and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

NUM_COUNTRIES = 24
NUM_TRAIN, NUM_EVAL = 400, 80
LANGUAGES = ["tavish", "orlen", "mirish", "kelvan", "sudric", "pallan", "vennic", "drusk"]
QUESTIONS = {  # topic, as the prompt names it: the question the completion asks
    "cities": "which cities are in {c}?",
    "rivers": "which rivers flow through {c}?",
    "neighbours": "which countries border {c}?",
    "languages": "which languages are spoken in {c}?",
    "ruler": "who rules {c}?",
}
HARD_QUESTIONS = {
    "towns": "which towns are in {c}?",
    "peaks": "which peaks rise in {c}?",
    "lakes": "which lakes lie in {c}?",
    "goods": "which goods does {c} export?",
}
HARD_ANSWERS = (5, 8)  # answers per question of the hard task
TOWN_PREFIXES = ["new", "port", "san", "upper"]
GOODS = [
    f"{a} {b}"
    for a in ("red", "dry", "raw", "fine", "black", "salt")
    for b in ("wine", "tea", "fish", "figs", "silk", "wool", "clay", "rice")
]
LONG_COUNTRIES = 16
LONG_ANSWERS = (12, 30)  # answers per question of the long task
LONG_TOPICS_PER_ROW = (1, 2)  # 16 countries x (6 + 6 * 5) ordered topic choices = 576 >= 480 distinct rows
LONG_QUESTIONS = {
    "towns": "which towns are in {c}?",
    "peaks": "which peaks rise in {c}?",
    "lakes": "which lakes lie in {c}?",
    "goods": "which goods does {c} export?",
    "birds": "which birds nest in {c}?",
    "trees": "which trees grow in {c}?",
}
LONG_TOWN_PREFIXES = ["new", "port", "san", "upper", "old", "east"]
BIRDS = [
    f"{a} {b}"
    for a in ("red", "grey", "black", "white", "long", "sea")
    for b in ("kite", "owl", "finch", "crow", "hawk", "tern", "wren", "gull")
]
TREES = [
    f"{a} {b}"
    for a in ("red", "white", "black", "dwarf", "sweet", "silver")
    for b in ("oak", "pine", "ash", "elm", "fir", "yew", "birch", "beech")
]
SPECIAL_TOKENS = ["<unk>", "<pad>", "<eos>", "<QA>", "<A>"]
MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
LONG_MODEL_CONFIG = {**MODEL_CONFIG, "max_position_embeddings": 512}
LONG_VOCAB_SIZE = 1024  # tokens of the long task's own tokenizer


def make_names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "n", "r", "l", "s"]
    names = []
    while len(names) < count:
        name = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(2, 3))) + rng.choice(codas)
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def make_world(rng: random.Random) -> dict[str, dict[str, list[str]]]:
    """`{country: {relation: [answers]}}`; every city, river and ruler belongs to one country."""
    taken = set(LANGUAGES)
    countries = make_names(rng, NUM_COUNTRIES, taken)
    world = {c: {} for c in countries}
    for c in countries:
        world[c]["cities"] = make_names(rng, rng.randint(2, 4), taken)
        world[c]["rivers"] = make_names(rng, rng.randint(1, 3), taken)
        world[c]["languages"] = rng.sample(LANGUAGES, rng.randint(1, 3))
        world[c]["ruler"] = make_names(rng, 1, taken)
        world[c]["neighbours"] = []
    # A ring plus a few chords: every country has 2-4 neighbours, and bordering is symmetric.
    for i, c in enumerate(countries):
        for d in [countries[(i + 1) % NUM_COUNTRIES], *([rng.choice(countries)] if rng.random() < 0.4 else [])]:
            if d != c and d not in world[c]["neighbours"]:
                world[c]["neighbours"].append(d)
                world[d]["neighbours"].append(c)
    return world


def make_hard_world(world: dict, rng: random.Random) -> dict[str, dict[str, list[str]]]:
    """`{country: {topic: [answers]}}` of the hard task, for the countries of `world`: 5-8 answers per topic.

    Towns take one of a few prefixes (`new abo`, `port abo`), peaks and lakes all start with `mount`/`lake`, and goods
    come from a shared list of two-word goods (`red wine`, `red clay`, `dry wine`): many answers of one question
    share their first tokens. Names are new: no town, peak or lake is named like anything in `world`.
    """
    taken = set(world) | {a for facts in world.values() for answers in facts.values() for a in answers}
    hard = {}
    for c in world:
        sizes = {topic: rng.randint(*HARD_ANSWERS) for topic in HARD_QUESTIONS}
        hard[c] = answer_lists(rng, sizes, taken, TOWN_PREFIXES, {"goods": GOODS})
    return hard


def answer_lists(
    rng: random.Random, sizes: dict[str, int], taken: set[str], town_prefixes: list[str], pools: dict[str, list[str]]
) -> dict[str, list[str]]:
    """One country's answers of the hard and long tasks, `sizes[topic]` each: new towns (`<prefix> <name>`), peaks
    (`mount <name>`) and lakes (`lake <name>`), then a draw from each shared list of `pools` (`red wine`, ...)."""
    lists = {
        "towns": [f"{rng.choice(town_prefixes)} {n}" for n in make_names(rng, sizes["towns"], taken)],
        "peaks": [f"mount {n}" for n in make_names(rng, sizes["peaks"], taken)],
        "lakes": [f"lake {n}" for n in make_names(rng, sizes["lakes"], taken)],
    }
    return lists | {topic: rng.sample(pool, sizes[topic]) for topic, pool in pools.items()}


def make_long_world(rng: random.Random) -> dict[str, dict[str, list[str]]]:
    """`{country: {topic: [answers]}}` of the long task: its own `LONG_COUNTRIES` countries, 12-30 answers per topic.

    As in the hard task, towns, peaks and lakes share a few first words (`new abo`, `mount ...`, `lake ...`), and
    goods, birds and trees are drawn from shared lists of two-word names (`red kite`, `red owl`, `grey kite`).
    """
    taken = set()
    countries = make_names(rng, LONG_COUNTRIES, taken)
    world = {}
    for c in countries:
        sizes = {topic: rng.randint(*LONG_ANSWERS) for topic in LONG_QUESTIONS}
        world[c] = answer_lists(rng, sizes, taken, LONG_TOWN_PREFIXES, {"goods": GOODS, "birds": BIRDS, "trees": TREES})
    return world


def make_rows(
    world: dict, questions: dict[str, str], rng: random.Random, count: int, topics_per_row: tuple[int, int] = (2, 3)
) -> list[dict]:
    """`count` rows about distinct (country, ordered topics) combinations, `topics_per_row` topics each (inclusive
    bounds), answers shuffled.

    The prompt names the topics in the order the completion asks them: `Tell me about valdor: its rivers and ruler.`
    """
    rows, seen = [], set()
    while len(rows) < count:
        country = rng.choice(sorted(world))
        topics = tuple(rng.sample(sorted(questions), rng.randint(*topics_per_row)))
        if (country, topics) in seen:
            continue
        seen.add((country, topics))
        qas = [
            {
                "question": questions[t].format(c=country),
                "answers": rng.sample(world[country][t], len(world[country][t])),
            }
            for t in topics
        ]
        rows.append({"context": f"Tell me about {country}: its {join(list(topics))}.", "qas": qas})
    return rows


def join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def fact_paragraph(
    world: dict, questions: dict[str, str], country: str, rng: random.Random, topics: int | None = None
) -> str:
    """The facts about one country (all topics, or `topics` of them drawn at random) as plain questions and answers,
    in random order, each list shuffled.

    `which rivers flow through valdor? oru and pell. who rules valdor? ilsa. ...`: the base model learns the facts
    and the questions, never the `<QA>`/`<A>` format.
    """
    topics = rng.sample(sorted(questions), topics or len(questions))
    facts = world[country]
    return " ".join(f"{questions[t].format(c=country)} {join(rng.sample(facts[t], len(facts[t])))}." for t in topics)


def train_bpe_tokenizer(texts: list[str], vocab_size: int, **tokenizer_kwargs):
    """A byte-level BPE tokenizer trained on `texts`, with `<unk>`, `<pad>`, `<eos>` and the separators `<QA>`, `<A>`
    as special tokens (a `PreTrainedTokenizerFast`; `tokenizer_kwargs` go to it, e.g. `model_max_length`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        additional_special_tokens=["<QA>", "<A>"],
        **tokenizer_kwargs,
    )


def make_tokenizer(texts: list[str], vocab_size: int = 768, model_max_length: int = 256):
    return train_bpe_tokenizer(texts, vocab_size=vocab_size, model_max_length=model_max_length)


def pretrain(
    worlds: list[tuple[dict, dict]],
    tokenizer,
    rng: random.Random,
    seed: int,
    steps: int,
    batch_size: int = 32,
    model_config: dict = MODEL_CONFIG,
    topics_per_text: int | None = None,
):
    """Full fine-tuning of a fresh tiny Llama on plain-text fact paragraphs (causal LM loss).

    `worlds`: `(facts, questions)` of each task; every paragraph is about one country of one task, drawn at random,
    with all its topics or `topics_per_text` of them.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **model_config,
    )
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for step in range(steps):
        texts = []
        for _ in range(batch_size):
            facts, questions = rng.choice(worlds)
            country = rng.choice(sorted(facts))
            texts.append(fact_paragraph(facts, questions, country, rng, topics_per_text) + tokenizer.eos_token)
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step:4d}  loss {loss.item():.3f}")
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--pretrain_steps", type=int, default=400, help="of the demo's base (`model/`)")
    parser.add_argument("--long_pretrain_steps", type=int, default=LONG_PRETRAIN_STEPS, help="of `model_long/`")
    parser.add_argument(
        "--part",
        choices=["all", "demo", "long"],
        default="all",
        help="demo: `data/`, `data_hard/` and `model/`; long: `data_long/` and `model_long/`",
    )
    args = parser.parse_args(argv)
    if args.part in ("all", "demo"):
        make_demo_part(args.seed, args.out, args.pretrain_steps)
    if args.part in ("all", "long"):
        make_long_part(args.seed, args.out, args.long_pretrain_steps)


def make_demo_part(seed: int, out: Path, pretrain_steps: int) -> None:
    """`data/`, `data_hard/` and their base `model/`."""
    from trl_qaloss.data import format_qas

    rng = random.Random(seed)
    tasks = make_tasks(rng)
    texts = []
    for directory, (facts, questions, rows) in tasks.items():
        write_split(out / directory, "train", rows[:NUM_TRAIN])
        write_split(out / directory, "eval", rows[NUM_TRAIN:])
        texts += [fact_paragraph(facts, questions, c, rng) for c in sorted(facts) for _ in range(5)]
        texts += [r["prompt"] + r["completion"] for r in (format_qas(row, i) for i, row in enumerate(rows[:NUM_TRAIN]))]
    tokenizer = make_tokenizer(texts)
    worlds = [(facts, questions) for facts, questions, _ in tasks.values()]
    model = pretrain(worlds, tokenizer, rng, seed, pretrain_steps)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    print(f"wrote {NUM_TRAIN} train and {NUM_EVAL} eval rows of each task ({', '.join(tasks)}) and their base to {out}")


LONG_PRETRAIN_STEPS = 1600


def long_rng(seed: int) -> random.Random:
    """The long task's own stream, so that adding it left the other tasks' draws (and their base) unchanged."""
    return random.Random(f"long-{seed}")


def make_long_task(rng: random.Random, num_rows: int = NUM_TRAIN + NUM_EVAL) -> tuple[dict, list[dict]]:
    """`(facts, rows)` of the long task, `num_rows` rows; the first `NUM_TRAIN` rows train, the rest eval."""
    world = make_long_world(rng)
    return world, make_rows(world, LONG_QUESTIONS, rng, num_rows, LONG_TOPICS_PER_ROW)


def make_long_part(
    seed: int,
    out: Path,
    pretrain_steps: int,
    num_train: int = NUM_TRAIN,
    num_eval: int = NUM_EVAL,
    batch_size: int = 32,
) -> None:
    """`data_long/` and its base `model_long/`: the tiny Llama with a 512-token context and a `LONG_VOCAB_SIZE`
    tokenizer, pretrained on the long task's facts two topics at a time (a paragraph of all six would be up to 700
    tokens). `num_train`, `num_eval` and `batch_size` (of the pretraining) make it smaller, for a test; the defaults
    make the shipped assets."""
    from trl_qaloss.data import format_qas

    rng = long_rng(seed)
    world, rows = make_long_task(rng, num_train + num_eval)
    write_split(out / "data_long", "train", rows[:num_train])
    write_split(out / "data_long", "eval", rows[num_train:])
    texts = [fact_paragraph(world, LONG_QUESTIONS, c, rng) for c in sorted(world) for _ in range(5)]
    texts += [r["prompt"] + r["completion"] for r in (format_qas(row, i) for i, row in enumerate(rows[:num_train]))]
    tokenizer = make_tokenizer(texts, vocab_size=LONG_VOCAB_SIZE, model_max_length=512)
    model = pretrain(
        [(world, LONG_QUESTIONS)],
        tokenizer,
        rng,
        seed,
        pretrain_steps,
        batch_size=batch_size,
        model_config=LONG_MODEL_CONFIG,
        topics_per_text=2,
    )
    model.save_pretrained(out / "model_long")
    tokenizer.save_pretrained(out / "model_long")
    print(f"wrote {num_train} train and {num_eval} eval rows of the long task and its base to {out}")


def make_tasks(rng: random.Random) -> dict[str, tuple[dict, dict[str, str], list[dict]]]:
    """`{data directory: (facts, questions, rows)}` of `data/` and `data_hard/`; the first `NUM_TRAIN` rows train, the
    rest eval."""
    world = make_world(rng)
    hard_world = make_hard_world(world, rng)
    tasks = {}
    for directory, facts, questions in (("data", world, QUESTIONS), ("data_hard", hard_world, HARD_QUESTIONS)):
        tasks[directory] = (facts, questions, make_rows(facts, questions, rng, NUM_TRAIN + NUM_EVAL))
    return tasks


def write_split(directory: Path, split: str, rows: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{split}.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
