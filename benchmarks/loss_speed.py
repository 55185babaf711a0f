"""Time the vectorized set loss against the naive reference and plain cross-entropy on the same logits.

    python benchmarks/loss_speed.py --batch 16 --length 512 --vocab 32000

Rows hold realistic completions (a masked prompt, then items of 2-6 answers); the logits' argmax spells the target
with its answers shuffled inside each item and 10% of tokens replaced, so most pairs are matched and some are not.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from trl_qaloss import QASeparators, set_matching_loss
from trl_qaloss.reference import set_matching_loss_reference

QA, ANSWER, QEND, EOS = 1, 2, 3, 0


def completion(rng: random.Random, vocab: int, length: int) -> tuple[list[int], list[int]]:
    """Target ids and predicted ids of one completion, cut to `length`."""
    target, predicted = [], []
    while len(target) < length:
        question = [QA] + [rng.randrange(10, vocab) for _ in range(rng.randint(3, 8))] + [QEND]
        answers = [
            [ANSWER] + [rng.randrange(10, vocab) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(2, 6))
        ]
        shuffled = rng.sample(answers, len(answers))
        target += question + [t for a in answers for t in a]
        predicted += question + [t for a in shuffled for t in a]
    predicted = [rng.randrange(10, vocab) if rng.random() < 0.1 else t for t in predicted]
    return target[:length], predicted[:length]


def make_batch(batch: int, length: int, vocab: int, seed: int = 0, dtype=torch.float32):
    rng = random.Random(seed)
    labels = torch.full((batch, length), -100)
    logits = torch.randn(batch, length, vocab, generator=torch.Generator().manual_seed(seed)).to(dtype)
    for b in range(batch):
        prompt = rng.randint(16, length // 4)
        target, predicted = completion(rng, vocab, length - prompt)
        labels[b, prompt:] = torch.tensor(target)
        rows = torch.arange(prompt - 1, length - 1)
        logits[b, rows, torch.tensor(predicted[: rows.numel()])] = 12.0
    seps = QASeparators(QA, ANSWER, frozenset({QEND}), frozenset({EOS}), vocab)
    return logits, labels, seps


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    args = parser.parse_args()

    logits, labels, seps = make_batch(args.batch, args.length, args.vocab)
    logits.requires_grad_(args.backward)

    def run(loss_fn):
        def step():
            loss = loss_fn()
            if args.backward:
                logits.grad = None
                loss.backward()

        return step

    def cross_entropy():
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)

    results = {
        "set_matching_loss": timed(run(lambda: set_matching_loss(logits, labels, seps).loss), args.repeats),
        "set_matching_loss_reference": timed(
            run(lambda: set_matching_loss_reference(logits, labels, seps).loss), max(1, args.repeats // 2)
        ),
        "F.cross_entropy": timed(run(cross_entropy), args.repeats),
    }
    stats = set_matching_loss(logits, labels, seps).stats
    mode = "forward+backward" if args.backward else "forward"
    print(f"B={args.batch} T={args.length} V={args.vocab} float32, {mode}, median of {args.repeats}; stats: {stats}")
    print("| implementation | time (ms) | vs vectorized |")
    print("|---|---:|---:|")
    base = results["set_matching_loss"]
    for name, seconds in results.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
