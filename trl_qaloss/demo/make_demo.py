"""Make the demo's assets: small closed worlds, four question/answer-set tasks, their tokenizers and tiny Llamas.

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
- `data_grounded/`: answers read off the prompt. Each prompt is a passage of 15-30 names of six kinds (`we saw new
  abo, mount kiru and red kite. ...`) followed by its 1-2 questions, which the completion asks again and answers: most
  of them `which birds does the passage mention?` (4-12 answers, all in the passage), one in five about a country of
  the task's own world (`which towns are in valdor?`, 5-8 answers, some in the passage and the others known only from
  pretraining). Its base (`model_grounded/`, 512-token context, own tokenizer, 8 attention heads) first learns to copy
  on random tokens (a span repeated at a random distance: an induction head), then is pretrained on plain-text
  passages followed by their questions, asked and then answered in random order (about three quarters of the texts),
  on passages written twice and on the countries' facts, with 2 layers and then deepened to 4: a base must be able to
  copy from its prompt before fine-tuning can teach it which names to copy.

Each of the first three tasks draws 480 distinct (country, ordered topics) combinations, the grounded task 480
distinct passages: the first 400 are `train.jsonl`, the last 80 `eval.jsonl`, so every held-out row is a question
combination (or a passage) not in the training rows, with its own answer order.

The base model: LoRA on a randomly initialized model learns little, so the generator pretrains the tiny Llama
(full fine-tuning, fp32; 10 min of CPU time, 22 min on 2 cores shared with other jobs) on the facts of the first two
tasks written as plain text (`which rivers flow through valdor? oru and pell.`), never in the `<QA>`/`<A>` format. The
demo's QLoRA run then has to learn the structured format and give each answer set in it, as a real instruct
fine-tune would. The long task has a base of its own (`model_long/`, the same architecture with a 512-token context
and its own tokenizer), pretrained the same way on its facts (6 min on 2 cores); `--part long` makes only the long
task and its base, `--part grounded` only the grounded task and its base (its pretraining: about 70 min on one torch
thread, cores shared with other jobs), `--part demo` only the first two tasks and their base.
The held-out rows ask about the same countries: they measure how well the facts and the format were learned, not
generalization to unseen countries (the grounded task's held-out passages are new, its countries the same).
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

    def fact_text() -> str:
        facts, questions = rng.choice(worlds)
        country = rng.choice(sorted(facts))
        return fact_paragraph(facts, questions, country, rng, topics_per_text)

    return pretrain_on(fact_text, tokenizer, seed, steps, batch_size, model_config)


def fresh_model(tokenizer, seed: int, model_config: dict = MODEL_CONFIG):
    """A randomly initialized tiny Llama (`model_config`) for `tokenizer`, its weights drawn from `seed`."""
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
    return AutoModelForCausalLM.from_config(config)


def pretrain_on(
    next_text,
    tokenizer,
    seed: int,
    steps: int,
    batch_size: int = 32,
    model_config: dict = MODEL_CONFIG,
    model=None,
    next_extra_batch=None,
    warmup_steps: int = 0,
    learning_rate: float = 3e-3,
):
    """Full fine-tuning of a tiny Llama (causal LM loss, AdamW at `learning_rate` with a cosine schedule) on `steps`
    batches of `batch_size` texts, each drawn by calling `next_text()` and ended by EOS. `model`: go on from this one
    instead of a fresh one. `next_extra_batch()`: `(input_ids, labels)` of a second batch whose loss is added at every
    step. `warmup_steps`: a linear warm-up before the cosine, for a model that has learned something already."""
    import torch

    model = fresh_model(tokenizer, seed, model_config) if model is None else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup(s) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    for step in range(steps):
        texts = [next_text() + tokenizer.eos_token for _ in range(batch_size)]
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        if next_extra_batch is not None:
            extra_ids, extra_labels = next_extra_batch()
            loss = loss + model(input_ids=extra_ids, labels=extra_labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step:4d}  loss {loss.item():.3f}")
    return model


def random_repeats(vocab_size: int, count: int, generator, rng: random.Random, first_id: int = 5):
    """`(input_ids, labels)`, each `[count, T]`: rows of random tokens in which a random span of 8-32 tokens comes
    again after a random gap, labelled only where it comes again (`-100` elsewhere, also on the right padding).

    Predicting the repeat needs an induction head (find the earlier occurrence of the current token, copy what
    followed it). Fixed lengths and gaps would let a model copy from a fixed distance instead, which does not carry
    over to text. Ids below `first_id` (the special tokens) are never drawn."""
    import torch

    rows, labels = [], []
    for _ in range(count):
        before, span, gap = rng.randint(0, 30), rng.randint(8, 32), rng.randint(0, 20)
        head, repeated, between = (
            torch.randint(first_id, vocab_size, (n,), generator=generator) for n in (before, span, gap)
        )
        row = torch.cat([head, repeated, between, repeated])
        label = row.clone()
        label[: before + span + gap + 1] = -100  # the repeat's first token is a guess, the rest are copies
        rows.append(row)
        labels.append(label)
    pad = lambda xs, value: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True, padding_value=value)  # noqa: E731
    return pad(rows, 0), pad(labels, -100)


def learn_to_copy(model, seed: int, max_steps: int, batch_size: int = 64, until_loss: float = 0.3):
    """Train `model` on `random_repeats` until its loss on them is below `until_loss` (an induction head has formed:
    the loss falls from ~log(vocab) to near 0 within a few dozen steps, after a plateau of a few hundred) or for
    `max_steps`. AdamW at 3e-3 after 100 warm-up steps. Returns the steps taken."""
    import torch

    generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    model.train()
    for step in range(max_steps):
        ids, labels = random_repeats(model.config.vocab_size, batch_size, generator, rng)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(f"copy step {step:4d}  loss {loss.item():.3f}")
        if loss.item() < until_loss:
            print(f"copy step {step:4d}  loss {loss.item():.3f}: copies")
            return step + 1
    raise RuntimeError(
        f"the base did not learn to copy random tokens in {max_steps} steps (loss {loss.item():.3f}): pass a larger "
        "max_steps or another seed"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--pretrain_steps", type=int, default=400, help="of the demo's base (`model/`)")
    parser.add_argument("--long_pretrain_steps", type=int, default=LONG_PRETRAIN_STEPS, help="of `model_long/`")
    parser.add_argument(
        "--grounded_pretrain_steps", type=int, default=GROUNDED_PRETRAIN_STEPS, help="of `model_grounded/`"
    )
    parser.add_argument(
        "--part",
        choices=["all", "demo", "long", "grounded"],
        default="all",
        help="demo: `data/`, `data_hard/` and `model/`; long: `data_long/` and `model_long/`; grounded: "
        "`data_grounded/` and `model_grounded/`",
    )
    args = parser.parse_args(argv)
    if args.part in ("all", "demo"):
        make_demo_part(args.seed, args.out, args.pretrain_steps)
    if args.part in ("all", "long"):
        make_long_part(args.seed, args.out, args.long_pretrain_steps)
    if args.part in ("all", "grounded"):
        make_grounded_part(args.seed, args.out, args.grounded_pretrain_steps)


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


GROUNDED_COUNTRIES = 16
GROUNDED_OWN = (5, 8)  # towns, peaks and lakes of each country of the grounded task
GROUNDED_KINDS = {  # kind of name, as the prompt asks for it: the question the completion asks
    "towns": "which towns does the passage mention?",
    "peaks": "which peaks does the passage mention?",
    "lakes": "which lakes does the passage mention?",
    "goods": "which goods does the passage mention?",
    "birds": "which birds does the passage mention?",
    "trees": "which trees does the passage mention?",
}
GROUNDED_FACTS = {  # the questions about a country's own names, answered from memory and the passage together
    "towns": "which towns are in {c}?",
    "peaks": "which peaks rise in {c}?",
    "lakes": "which lakes lie in {c}?",
}
GROUNDED_MENTIONS = (15, 30)  # names a passage mentions
GROUNDED_ANSWERS = (4, 12)  # answers of a question about the passage
GROUNDED_FRESH = 24  # new towns, peaks and lakes drawn for each passage
GROUNDED_FACT_SHARE = 0.2  # of the questions: about a country, some of its names in the passage and some not
GROUNDED_OPENERS = ["we saw", "the map shows", "they spoke of", "the notes name", "a trader named", "we passed"]
GROUNDED_VOCAB_SIZE = 1024
GROUNDED_PRETRAIN_STEPS = 4000
GROUNDED_ANSWERED_SHARE = 0.67  # of the grounded base's pretraining texts, besides the third of the others
# 8 attention heads with keys and values of their own: the base copies a passage's names better than with 4 heads
# sharing 2 (a plain-text copy probe of 0.60 against 0.46, `benchmarks/RESULTS.md`).
GROUNDED_MODEL_CONFIG = {**LONG_MODEL_CONFIG, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 16}
GROUNDED_COPY_STEPS = 3000  # at most: `learn_to_copy` stops once the base copies
# Then the base is deepened to 4 layers and pretrained on: plain SFT on the task gained 0.01-0.10 set-F1 from the two
# more layers (`benchmarks/RESULTS.md`). A deeper model learns to copy later, so the copying is learned at 2 layers.
GROUNDED_DEEP_LAYERS = 4
GROUNDED_DEEP_STEPS = 2000


def grounded_rng(seed: int) -> random.Random:
    """The grounded task's own stream, so that adding it left the other tasks' draws (and their bases) unchanged."""
    return random.Random(f"grounded-{seed}")


def make_grounded_world(rng: random.Random) -> dict[str, dict[str, list[str]]]:
    """`{country: {"towns"|"peaks"|"lakes": [names]}}`: `GROUNDED_COUNTRIES` countries of their own, 5-8 of each."""
    taken = set()
    countries = make_names(rng, GROUNDED_COUNTRIES, taken)
    return {
        c: answer_lists(rng, {t: rng.randint(*GROUNDED_OWN) for t in GROUNDED_FACTS}, taken, LONG_TOWN_PREFIXES, {})
        for c in countries
    }


def grounded_pools(world: dict, rng: random.Random) -> dict[str, list[str]]:
    """The names of each kind one passage draws from: `GROUNDED_FRESH` new towns, peaks and lakes, named as the
    world names them but none of them the world's (so that only the passage can tell them), and the shared lists of
    goods, birds and trees."""
    # `make_names` draws and records bare names (`kiru` of `mount kiru`): the world's are taken.
    taken = {n.split()[-1] for facts in world.values() for names in facts.values() for n in names} | set(world)
    sizes = dict.fromkeys(GROUNDED_FACTS, GROUNDED_FRESH)
    return answer_lists(rng, sizes, taken, LONG_TOWN_PREFIXES, {}) | {"goods": GOODS, "birds": BIRDS, "trees": TREES}


def grounded_kind(name: str) -> str:
    """The kind of a name of the grounded task, read off its form (`mount ...` is a peak, `red kite` a bird)."""
    first = name.split()[0]
    if first in LONG_TOWN_PREFIXES:
        return "towns"
    if first in ("mount", "lake"):
        return {"mount": "peaks", "lake": "lakes"}[first]
    return next(kind for kind, pool in (("goods", GOODS), ("birds", BIRDS), ("trees", TREES)) if name in pool)


def passage_text(mentions: list[str], rng: random.Random) -> str:
    """The mentions, in their order, as sentences of 1-4 names: `we saw new abo, mount kiru and red kite. ...`."""
    sentences, i = [], 0
    while i < len(mentions):
        size = rng.randint(1, 4)
        sentences.append(f"{rng.choice(GROUNDED_OPENERS)} {join(mentions[i : i + size])}.")
        i += size
    return " ".join(sentences)


def grounded_item(world: dict, rng: random.Random, fact_share: float) -> tuple[list[dict], list[str]]:
    """The questions of one row and the names its passage mentions, unordered.

    1-2 questions of different kinds. Each is, with probability `fact_share`, about a country (`which towns are in
    valdor?`: all 5-8 of its towns, 1 to all-but-one of them in the passage, the others known from pretraining), else
    about the passage (`which birds does the passage mention?`: 4-12 names of that kind, all in the passage; towns,
    peaks and lakes new ones, see `grounded_pools`). Names of the kinds not asked about fill the passage up to 15-30
    mentions.
    """
    while True:
        pools = grounded_pools(world, rng)
        kinds, qas, mentioned = [], [], []
        for _ in range(rng.randint(1, 2)):
            about_country = rng.random() < fact_share
            choices = sorted(GROUNDED_FACTS if about_country else GROUNDED_KINDS)
            kind = rng.choice([k for k in choices if k not in kinds])
            kinds.append(kind)
            if about_country:
                country = rng.choice(sorted(world))
                own = world[country][kind]
                mentioned += rng.sample(own, rng.randint(1, len(own) - 1))
                qas.append({"question": GROUNDED_FACTS[kind].format(c=country), "answers": list(own)})
            else:
                names = rng.sample(pools[kind], rng.randint(*GROUNDED_ANSWERS))
                mentioned += names
                qas.append({"question": GROUNDED_KINDS[kind], "answers": list(names)})
        total = rng.randint(*GROUNDED_MENTIONS)
        if len(mentioned) > total:
            continue
        # Fillers of the kinds not asked about: a question's answers are exactly the names of its kind it asks for.
        others = [n for kind in sorted(GROUNDED_KINDS) if kind not in kinds for n in pools[kind]]
        mentioned += rng.sample(others, total - len(mentioned))
        return qas, mentioned


def grounded_prompt(passage: str, qas: list[dict]) -> str:
    """`<passage> which birds does the passage mention? which towns are in valdor?`: the passage, then its questions
    in the order the completion answers them."""
    return " ".join([passage] + [qa["question"] for qa in qas])


def make_grounded_rows(
    world: dict, rng: random.Random, count: int, fact_share: float = GROUNDED_FACT_SHARE
) -> list[dict]:
    """`count` rows with distinct passages; each answer list in random order."""
    rows, seen = [], set()
    while len(rows) < count:
        qas, mentioned = grounded_item(world, rng, fact_share)
        rng.shuffle(mentioned)
        passage = passage_text(mentioned, rng)
        if passage in seen:
            continue
        seen.add(passage)
        for qa in qas:
            rng.shuffle(qa["answers"])
        rows.append({"context": grounded_prompt(passage, qas), "qas": qas})
    return rows


def make_grounded_task(rng: random.Random, num_rows: int = NUM_TRAIN + NUM_EVAL) -> tuple[dict, list[dict]]:
    """`(world, rows)` of the grounded task, `num_rows` rows; the first `NUM_TRAIN` rows train, the rest eval."""
    world = make_grounded_world(rng)
    return world, make_grounded_rows(world, rng, num_rows)


def grounded_passage(world: dict, rng: random.Random) -> tuple[str, list[dict]]:
    """`(passage, its 1-2 questions)`: a passage drawn as the task's are, half of its questions about a country."""
    qas, mentioned = grounded_item(world, rng, fact_share=0.5)
    rng.shuffle(mentioned)
    return passage_text(mentioned, rng), qas


def answered_passage(world: dict, rng: random.Random) -> str:
    """A passage, its questions (as the task's prompts ask them), then each question again with its answers in plain
    text, each answer list in random order: `<passage> which lakes ...? which towns ...? which lakes ...? lake a and
    lake b. which towns ...? ...`."""
    passage, qas = grounded_passage(world, rng)
    asked = " ".join(qa["question"] for qa in qas)
    answers = " ".join(f"{qa['question']} {join(rng.sample(qa['answers'], len(qa['answers'])))}." for qa in qas)
    return f"{passage} {asked} {answers}"


def grounded_pretraining_text(world: dict, rng: random.Random) -> str:
    """One plain-text paragraph for the grounded base, never in the `<QA>`/`<A>` format; a third each of:

    - a country's facts (`which towns are in valdor? new abo, port kel and ...`);
    - a passage followed by its questions answered (`answered_passage`);
    - a passage written twice (`... once more: ...`), as text repeats in real pretraining data: the plain copying
      that the answers to a passage's questions need, which a tiny model does not learn from the questions alone.
    """
    kind = rng.randrange(3)
    if kind == 0:
        return fact_paragraph(world, GROUNDED_FACTS, rng.choice(sorted(world)), rng)
    if kind == 1:
        return answered_passage(world, rng)
    passage, _ = grounded_passage(world, rng)
    return f"{passage} once more: {passage}"


def grounded_pretraining_mix(world: dict, rng: random.Random, answered_share: float = GROUNDED_ANSWERED_SHARE) -> str:
    """What the grounded base is pretrained on: `answered_share` of the texts are `answered_passage`, the others
    `grounded_pretraining_text` (of which a third are answered passages too). Listing a passage's names of one kind
    without naming one twice is the skill the task needs, and the one a tiny model learns slowest."""
    return answered_passage(world, rng) if rng.random() < answered_share else grounded_pretraining_text(world, rng)


def make_grounded_part(
    seed: int,
    out: Path,
    pretrain_steps: int,
    num_train: int = NUM_TRAIN,
    num_eval: int = NUM_EVAL,
    batch_size: int = 24,
    copy_steps: int = GROUNDED_COPY_STEPS,
    copy_batch_size: int = 64,
    copy_until_loss: float = 0.3,
    deep_steps: int = GROUNDED_DEEP_STEPS,
) -> None:
    """`data_grounded/` and its base `model_grounded/`: the tiny Llama with a 512-token context and a
    `GROUNDED_VOCAB_SIZE` tokenizer. It first learns to copy (`learn_to_copy`: random tokens, until their loss is below
    `copy_until_loss`, at most `copy_steps` steps), then `pretrain_steps` steps on plain-text passages with their
    questions answered and on the countries' facts, with a quarter batch of random repeats at every step; then it is
    deepened to `GROUNDED_DEEP_LAYERS` layers (`deepen`) and pretrained `deep_steps` more steps on the same mix.
    `num_train`, `num_eval`, the step counts and the batch sizes make it smaller, for a test."""
    from trl_qaloss.data import format_qas

    rng = grounded_rng(seed)
    world, rows = make_grounded_task(rng, num_train + num_eval)
    write_split(out / "data_grounded", "train", rows[:num_train])
    write_split(out / "data_grounded", "eval", rows[num_train:])
    texts = [grounded_pretraining_text(world, rng) for _ in range(2000)]
    texts += [r["prompt"] + r["completion"] for r in (format_qas(row, i) for i, row in enumerate(rows[:num_train]))]
    tokenizer = make_tokenizer(texts, vocab_size=GROUNDED_VOCAB_SIZE, model_max_length=512)
    model = fresh_model(tokenizer, seed, GROUNDED_MODEL_CONFIG)
    learn_to_copy(model, seed, max_steps=copy_steps, batch_size=copy_batch_size, until_loss=copy_until_loss)
    model = pretrain_grounded(model, world, tokenizer, seed, pretrain_steps, batch_size, copy_batch_size, stream=0)
    model = deepen(model, GROUNDED_DEEP_LAYERS, seed)
    model = pretrain_grounded(
        model, world, tokenizer, seed, deep_steps, batch_size, copy_batch_size, stream=1, learning_rate=1.5e-3
    )
    model.save_pretrained(out / "model_grounded")
    tokenizer.save_pretrained(out / "model_grounded")
    print(f"wrote {num_train} train and {num_eval} eval rows of the grounded task and its base to {out}")


def pretrain_grounded(
    model,
    world: dict,
    tokenizer,
    seed: int,
    steps: int,
    batch_size: int,
    copy_batch_size: int,
    stream: int,
    learning_rate: float = 3e-3,
):
    """`steps` steps of `grounded_pretraining_mix`, with a quarter batch of random repeats at every step. `stream`
    numbers the phase: each phase draws its texts and repeats from random streams of its own, so a phase depends only
    on the model it starts from."""
    import torch

    text_rng = random.Random(1000 * (stream + 1) + seed)
    generator = torch.Generator().manual_seed(1000 * stream + seed)
    copy_rng = random.Random(1000 * stream + seed)
    return pretrain_on(
        lambda: grounded_pretraining_mix(world, text_rng),
        tokenizer,
        seed,
        steps,
        batch_size=batch_size,
        model=model,
        warmup_steps=50,
        # Keeps the copying learned first from fading while the passages and facts are learned.
        next_extra_batch=lambda: random_repeats(len(tokenizer), copy_batch_size // 4, generator, copy_rng),
        learning_rate=learning_rate,
    )


def deepen(model, layers: int, seed: int):
    """A `layers`-deep copy of a tiny Llama: its layers first, then new ones (drawn from `seed`) whose attention and
    MLP output projections are zero, so that the deeper model starts out computing exactly what `model` does."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    deeper = AutoModelForCausalLM.from_config(config)
    new = deeper.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert all(".layers." in key for key in new), new  # only the new layers are left as drawn
    for layer in deeper.model.layers[model.config.num_hidden_layers :]:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    return deeper


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
