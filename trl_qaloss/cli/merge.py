"""`trl-qaloss merge`: a trained LoRA adapter merged into its base model and saved as one model directory, which
`AutoModelForCausalLM.from_pretrained`, vLLM and TGI load alone.

    trl-qaloss merge --adapter outputs/demo-cpu --output outputs/demo-cpu-merged

The base is the one `trl-qaloss train` recorded in `trl_qaloss_base.json`. Quantized weights cannot hold a merge (it
would round the merged weights back to 4 bits), so the merged model is saved unquantized, in `--dtype`. A base trained
in 4 or 8 bits is, by default, loaded quantized as in training and dequantized (`--base_weights dequantized`): the
merged weights are then the weights the adapter was trained and evaluated on, and the merged model answers as the
adapter does. `--base_weights original` loads the base's own 16- or 32-bit weights instead, which the adapter never
saw. The trained rows of added separator tokens and resized embeddings are merged with the LoRA weights.

The result is written to a temporary directory next to `--output`, then renamed: an interrupted merge leaves no
half-written model behind.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import uuid

from ..demo import resolve_demo_path
from ..engine.options import SEPARATOR_FIELDS
from ..errors import ArgumentParser
from .heldout import HELDOUT_FILE, ROWS_FILE
from .inference import BASE_INFO_FILE, LoadedModel

DTYPES = ("bfloat16", "float16", "float32")
BASE_WEIGHTS = ("dequantized", "original")
CARD_FILE = "README.md"


def default_dtype(info: dict, cuda: bool) -> str:
    """The dtype a merge saves in when `--dtype` is not given: the one the base was trained in; for a quantized base,
    bfloat16 on a GPU and float32 on a CPU (where bfloat16 matmuls are slow and float16 ones unsupported)."""
    if info.get("quantization_config"):
        return "bfloat16" if cuda else "float32"
    dtype = info.get("dtype")
    return dtype if dtype in DTYPES else "auto"


def check_output(output: str, adapter: str, overwrite: bool) -> None:
    """Raise a ValueError when `output` cannot take the merged model: a file, a non-empty directory without
    `overwrite`, or the adapter's own directory (or one holding it), which the merge would delete."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output!r} is a file; give a directory for the merged model.")
    target, source = os.path.realpath(output), os.path.realpath(adapter)
    if source == target or source.startswith(target + os.sep):
        raise ValueError(f"--output {output!r} holds the adapter it merges; give another directory.")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ValueError(
            f"--output {output!r} exists and is not empty; pass --overwrite to replace it, or give another directory."
        )


def check_merge_input(adapter: str, output: str, overwrite: bool = False) -> tuple[dict, str]:
    """`(info, base)` of the adapter to merge (see `adapter_base`), the base resolved to a path or hub id, once the
    input is checked: an adapter directory, an `output` that can take the model (`check_output`), a base that is
    there. Raises a ValueError or OSError of one line otherwise."""
    from ..model_source import check_model_source
    from .inference import adapter_base

    info, base = adapter_base(adapter)
    check_output(output, adapter, overwrite)
    base = resolve_demo_path(base)
    recorded = f"`base_model_name_or_path` in {os.path.join(adapter, BASE_INFO_FILE)}"
    check_model_source(base, field=recorded, give=f"as {recorded}")
    return info, base


def load_merged(adapter: str, dtype: str | None = None, base_weights: str = "dequantized"):
    """`(merged model, tokenizer, dtype)`: the adapter in `adapter` merged into its base, and the dtype it was merged
    in (`default_dtype` when `dtype` is None).

    The base is loaded without quantization in `dtype`: a quantized base is loaded as in training and dequantized
    (`base_weights="dequantized"`) or loaded from its original weights (`"original"`). The model is a plain
    transformers model in eval mode, with no `quantization_config`.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .inference import adapter_base, fit_embeddings, load_tokenizer

    info, base = adapter_base(adapter)
    base = resolve_demo_path(base)
    cuda = torch.cuda.is_available()
    dtype = dtype or default_dtype(info, cuda)
    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if cuda:
        kwargs["device_map"] = {"": 0}
    quantized = bool(info.get("quantization_config")) and base_weights == "dequantized"
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(info["quantization_config"])
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if quantized:
        # The weights the adapter was trained on, in `dtype`; transformers also drops the `quantization_config`.
        model = model.dequantize(dtype=kwargs["dtype"])
    tokenizer = load_tokenizer(base, adapter)
    fit_embeddings(model, tokenizer)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return merged.eval(), tokenizer, str(merged.dtype).removeprefix("torch.")


def model_card(info: dict, base: str, adapter: str, dtype: str, base_weights: str) -> str:
    """The README.md of a merged model: where it comes from, how it was trained, how to load it and parse its
    completions. Settings `trl_qaloss_base.json` does not record are given as unknown."""
    from .. import demo

    def recorded(name: str) -> str:
        return f"`{info[name]}`" if name in info else "unknown (not recorded in the adapter's trl_qaloss_base.json)"

    defaults = LoadedModel(model=None, tokenizer=None).separators
    qa_token, answer_token, question_end = (info.get(n, d) for n, d in zip(SEPARATOR_FIELDS, defaults, strict=True))
    quantization = info.get("quantization_config") or {}
    bits = "4-bit" if quantization.get("load_in_4bit") else "8-bit" if quantization.get("load_in_8bit") else None
    trained_on = f"{bits} ({quantization.get('bnb_4bit_quant_type', 'int8')}) base" if bits else "unquantized base"
    if bits:
        weights = (
            f"the {bits} weights the adapter was trained on, dequantized to {dtype}"
            if base_weights == "dequantized"
            else f"the base's original weights in {dtype} (the adapter was trained on its {bits} quantization)"
        )
    else:
        weights = f"the base's weights in {dtype}"
    name = demo.portable_demo_path(base)
    front_matter = f"base_model: {json.dumps(name)}\nlibrary_name: transformers\ntags: [trl-qaloss, merged-lora]"
    separators = f"`{qa_token}` starts each question, `{question_end}` ends it, `{answer_token}` starts each answer"
    return f"""---
{front_matter}
---

# {name} + {os.path.basename(os.path.normpath(adapter))} (merged)

The LoRA adapter `{adapter}`, trained with trl-qaloss on a {trained_on}, merged into `{name}` by
`trl-qaloss merge`. It loads with `AutoModelForCausalLM.from_pretrained` alone: no adapter, no quantization.

| | |
|---|---|
| base model | `{name}` |
| adapter | `{adapter}` |
| merged weights | {weights} |
| answer_order | {recorded("answer_order")} |
| lambda_set | {recorded("lambda_set")} |
| lambda_ce | {recorded("lambda_ce")} |
| separators | {separators} |

## Parse the completions

A completion lists questions with their answer sets,
`{qa_token} question{question_end} {answer_token} answer {answer_token} answer {qa_token} ...`, the answers of a
question in no particular order. Decode it with the separators kept (they are special tokens) and parse it with
trl-qaloss:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl_qaloss.engine.parsing import parse_qa_text

model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
inputs = tokenizer(["your prompt"], return_tensors="pt")
ids = model.generate(**inputs, max_new_tokens=256, do_sample=False)[0, inputs["input_ids"].size(1) :].tolist()
kept = set(tokenizer.convert_tokens_to_ids([{qa_token!r}, {answer_token!r}]))
text = tokenizer.decode([t for t in ids if t in kept or t not in tokenizer.all_special_ids])
items = parse_qa_text(text, {qa_token!r}, {answer_token!r}, {question_end!r})  # [QAItem(question, answers), ...]
```

or let `trl-qaloss generate --model_name_or_path path/to/this/directory --prompt "your prompt"` write each completion
with its parsed questions and answers as a JSON line (it reads the separators from `{BASE_INFO_FILE}`).
"""


def write_directory(output: str, write) -> None:
    """Call `write(directory)` on a new temporary directory next to `output`, then put that directory in place of
    `output` (replacing any existing one); on any error the temporary directory is removed and `output` is left as
    it was."""
    output = os.path.abspath(output)
    parent, name = os.path.split(output)
    os.makedirs(parent, exist_ok=True)
    # Next to `output`, so that the final rename stays on one file system; made by `mkdir`, so with the user's usual
    # permissions (a `mkdtemp` directory is private to its owner, which a server running as another user can't read).
    staging = os.path.join(parent, f".{name}.merging-{uuid.uuid4().hex[:12]}")
    os.mkdir(staging)
    try:
        write(staging)
        if os.path.isdir(output):
            replaced = os.path.join(parent, f".{name}.replaced-{uuid.uuid4().hex[:12]}")
            os.rename(output, replaced)
            os.rename(staging, output)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def merge(
    adapter: str,
    output: str,
    dtype: str | None = None,
    overwrite: bool = False,
    base_weights: str = "dequantized",
    max_shard_size: str = "5GB",
) -> str:
    """Merge the LoRA adapter in `adapter` into its base and save the result to `output`: safetensors shards of at
    most `max_shard_size`, config and generation config, the tokenizer with the separators, `trl_qaloss_base.json`
    (the adapter's, with what the merge did) and a model card. Returns the dtype the model was saved in.

    Bad input (a missing or non-adapter directory, an `output` that exists and is not empty without `overwrite`, a
    base that cannot be found) raises a `UsageError` (a ValueError) of one line before anything is loaded or
    written."""
    from ..errors import user_errors

    with user_errors():
        info, base = check_merge_input(adapter, output, overwrite)
    model, tokenizer, saved_dtype = load_merged(adapter, dtype, base_weights)

    def write(directory: str) -> None:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(directory)
        merged_info = {**info, "merged": {"adapter": adapter, "dtype": saved_dtype, "base_weights": base_weights}}
        with open(os.path.join(directory, BASE_INFO_FILE), "w") as file:
            json.dump(merged_info, file, indent=2)
        with open(os.path.join(directory, CARD_FILE), "w") as file:
            file.write(model_card(info, base, adapter, saved_dtype, base_weights))
        for name in (HELDOUT_FILE, ROWS_FILE):  # so that `evaluate` scores the run's own held-out rows here too
            if os.path.isfile(os.path.join(adapter, name)):
                shutil.copyfile(os.path.join(adapter, name), os.path.join(directory, name))

    write_directory(output, write)
    return saved_dtype


def run_merge(argv: list[str]) -> None:
    """`trl-qaloss merge`: merge an adapter into its base and save the model; prints where it is and what's next."""
    parser = ArgumentParser(
        prog="trl-qaloss merge",
        description="Merge a trained LoRA adapter into its base model and save one model directory (safetensors "
        "shards, tokenizer with the separators, generation config, model card) that transformers, vLLM and TGI load "
        "without the adapter or bitsandbytes.",
    )
    parser.add_argument("--adapter", required=True, help="directory of a trained LoRA adapter (`trl-qaloss train`'s)")
    parser.add_argument("--output", required=True, help="directory to write the merged model to")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="dtype of the merged weights (default: the base's training dtype; for a 4-bit or 8-bit base, bfloat16 "
        "on a GPU and float32 on a CPU)",
    )
    parser.add_argument(
        "--base_weights",
        choices=BASE_WEIGHTS,
        default="dequantized",
        help="for a base trained in 4 or 8 bits: merge into its quantized weights, dequantized (the weights the "
        "adapter was trained on: the merged model answers as the adapter does), or into its original weights "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max_shard_size", default="5GB", help="largest safetensors shard written (default: %(default)s)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    args = parser.parse_args(argv)
    dtype = merge(args.adapter, args.output, args.dtype, args.overwrite, args.base_weights, args.max_shard_size)
    print(f"Merged model ({dtype}) saved to {os.path.abspath(args.output)}")
    print("Next:")
    print(f"  trl-qaloss generate --model_name_or_path {shlex.quote(args.output)} --prompt 'your prompt'")
