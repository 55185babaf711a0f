"""Make the demo's assets: a small closed world, its question/answer-set data, a tokenizer and a tiny pretrained Llama.

    python -m trl_qaloss.demo.make_demo [--seed 0] [--out trl_qaloss/demo]

The world: fictional countries, each with cities, rivers, neighbours, languages and a ruler. Every row's context
names a country; its 2-3 questions ask for those sets, and each answer list is shuffled, so the order of the answers
carries no information: exactly where the set loss differs from cross-entropy.

The base model: LoRA on a randomly initialized model learns little, so the generator pretrains the tiny Llama
(full fine-tuning, fp32, a few minutes on 2 CPU cores) on the same facts written as plain text
(`which rivers flow through valdor? oru and pell.`), never in the `<QA>`/`<A>` format. The demo's QLoRA run then
has to learn the structured format and give each answer set in it, as a real instruct fine-tune would.
`data/eval.jsonl` holds fresh rows (new question combinations and answer orders) about the same countries: it
measures how well the facts and the format were learned, not generalization to unseen countries.
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
QUESTIONS = {
    "cities": "which cities are in {c}?",
    "rivers": "which rivers flow through {c}?",
    "neighbours": "which countries border {c}?",
    "languages": "which languages are spoken in {c}?",
    "ruler": "who rules {c}?",
}
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


def make_rows(world: dict, rng: random.Random, count: int) -> list[dict]:
    rows = []
    for _ in range(count):
        country = rng.choice(sorted(world))
        relations = rng.sample(sorted(QUESTIONS), rng.randint(2, 3))
        answers = {r: world[country][r] for r in relations}
        qas = [
            {"question": QUESTIONS[r].format(c=country), "answers": rng.sample(a, len(a))} for r, a in answers.items()
        ]
        rows.append({"context": f"Tell me about {country}.", "qas": qas})
    return rows


def join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def fact_paragraph(world: dict, country: str, rng: random.Random) -> str:
    """All facts about one country as plain questions and answers, in random order, each list shuffled.

    `which rivers flow through valdor? oru and pell. who rules valdor? ilsa. ...`: the base model learns the facts
    and the questions, never the `<QA>`/`<A>` format.
    """
    relations = rng.sample(sorted(QUESTIONS), len(QUESTIONS))
    facts = world[country]
    return " ".join(f"{QUESTIONS[r].format(c=country)} {join(rng.sample(facts[r], len(facts[r])))}." for r in relations)


def make_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=768, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        additional_special_tokens=["<QA>", "<A>"],
        model_max_length=256,
    )


def pretrain(world: dict, tokenizer, rng: random.Random, seed: int, steps: int, batch_size: int = 32):
    """Full fine-tuning of a fresh tiny Llama on plain-text fact paragraphs (causal LM loss)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **MODEL_CONFIG,
    )
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    countries = sorted(world)
    model.train()
    for step in range(steps):
        texts = [fact_paragraph(world, rng.choice(countries), rng) + tokenizer.eos_token for _ in range(batch_size)]
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
    parser.add_argument("--pretrain_steps", type=int, default=400)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    world = make_world(rng)
    train_rows = make_rows(world, rng, NUM_TRAIN)
    eval_rows = make_rows(world, rng, NUM_EVAL)
    data_dir = args.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        with open(data_dir / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    from trl_qaloss.data import format_qas

    formatted = [format_qas(row, i) for i, row in enumerate(train_rows)]
    corpus = [fact_paragraph(world, c, rng) for c in sorted(world) for _ in range(5)]
    tokenizer = make_tokenizer(corpus + [r["prompt"] + r["completion"] for r in formatted])
    model = pretrain(world, tokenizer, rng, args.seed, args.pretrain_steps)
    model_dir = args.out / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    print(f"wrote {len(train_rows)} train rows, {len(eval_rows)} eval rows, the tokenizer and the model to {args.out}")


if __name__ == "__main__":
    main()
