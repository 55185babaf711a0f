"""The offline demo's assets, shipped inside the package so `trl-qaloss train` runs anywhere after `pip install`.

Layout (made by `python -m trl_qaloss.demo.make_demo`, deterministic given its seed):

- `model/`: a tiny Llama (`config.json`, `model.safetensors`: pretrained by the generator on plain-text facts of the
  demo's world) and its byte-level BPE tokenizer (`tokenizer.json`, `tokenizer_config.json`) with `<QA>` and `<A>`
  as special tokens;
- `data/train.jsonl` (400 rows), `data/eval.jsonl` (80 rows): structured rows
  `{"context", "qas": [{"question", "answers"}]}` about the same world, whose prompt names the questions to answer
  and their order, each answer list in random order; the eval rows ask question combinations no train row asks;
- `data_hard/train.jsonl`, `data_hard/eval.jsonl`: a harder task of the same form, 5-8 multi-token answers per
  question, many sharing their first tokens (`new abo`, `new kel`, `lake ...`);
- `data_long/train.jsonl`, `data_long/eval.jsonl`: long lists about a world of its own, 12-30 multi-token answers
  per question, 1-2 questions per prompt; `model_long/`: its base, the same tiny Llama with a 512-token context and
  its own tokenizer, pretrained on the long task's facts;
- `data_grounded/train.jsonl`, `data_grounded/eval.jsonl`: answers read off the prompt, a passage of 15-30 names
  followed by 1-2 questions of 4-12 answers (`which birds does the passage mention?`; one question in five asks for a
  country's towns, peaks or lakes, some named in the passage and some known only to the base); `model_grounded/`:
  its base, the same tiny Llama with a 512-token context, pretrained to answer such questions in plain text (copying
  from the passage) and on the countries' facts;
- `demo-cpu.yaml`: the default recipe, a copy of `recipes/demo-cpu.yaml`.

Recipes name these files as `trl_qaloss/demo/...`; `resolve_demo_path` finds them inside the installed package.
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEMO_DIR / "model"
DATA_DIR = DEMO_DIR / "data"
HARD_DATA_DIR = DEMO_DIR / "data_hard"
LONG_DATA_DIR = DEMO_DIR / "data_long"
LONG_MODEL_DIR = DEMO_DIR / "model_long"
GROUNDED_DATA_DIR = DEMO_DIR / "data_grounded"
GROUNDED_MODEL_DIR = DEMO_DIR / "model_grounded"
DEFAULT_RECIPE = DEMO_DIR / "demo-cpu.yaml"
PREFIX = "trl_qaloss/demo/"


def resolve_demo_path(value: str | None) -> str | None:
    """`trl_qaloss/demo/<rest>` -> the absolute path of `<rest>` in the installed package; anything else unchanged."""
    if isinstance(value, str) and value.replace("\\", "/").startswith(PREFIX):
        return str(DEMO_DIR / value[len(PREFIX) :])
    return value


def portable_demo_path(value: str | None) -> str | None:
    """The inverse of `resolve_demo_path`: a path inside the installed demo -> `trl_qaloss/demo/<rest>`, so that a
    file recording it (an adapter's base model) still names the demo on another machine; anything else unchanged."""
    if isinstance(value, str) and os.path.isabs(value) and Path(value).resolve().is_relative_to(DEMO_DIR):
        return PREFIX + Path(value).resolve().relative_to(DEMO_DIR).as_posix()
    return value
