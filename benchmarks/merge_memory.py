"""Peak memory of `trl-qaloss merge` on the CPU at a real architecture's size, and the estimate for larger ones.

    python benchmarks/merge_memory.py --model-config benchmarks/configs/qwen2.5-0.5b.json --dtype float32
    python benchmarks/merge_memory.py --model-config ... --estimate benchmarks/configs/qwen2.5-7b.json \
        benchmarks/configs/qwen2.5-72b.json            # adds the computed figures of those configs

Measured: a base of `--model-config`'s architecture with random weights (drawn as `init_from_config` draws them,
saved in the config's dtype with the demo's tokenizer), a LoRA adapter (r=16, every linear layer, random non-zero B)
over its 4-bit quantization as the recipes load it, with the `trl_qaloss_base.json` that `trl-qaloss train` writes;
then `trl-qaloss merge` runs in a process of its own, whose peak resident memory (`ru_maxrss`, from `wait4`) is read,
next to the peak of a process that only imports what the merge imports (torch, transformers, peft, bitsandbytes).
Each is started from a small interpreter of its own: Linux counts in a child's peak the memory of its parent.

Computed, for each `--estimate` config, in bfloat16 and float32: the parameter count (the model built on the meta
device) and the bounds of `estimate`. The merge holds one full copy of the model in the merged dtype (the 4-bit layers
are replaced one by one by their dequantized copies); loading the 4-bit base on the CPU first reads and quantizes the
checkpoint, whose memory the process may keep (the allocator does not always return it), hence an upper bound of two
copies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GB = 1e9


def parameter_count(config_path: str) -> int:
    """Parameters of the model of a config.json, built on the meta device (tied embeddings counted once)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_path))
    return sum(p.numel() for p in model.parameters())


def write_base_and_adapter(config_path: str, work: Path, seed: int = 0) -> Path:
    """A random base of `config_path`'s architecture in `work/base` and a LoRA adapter over its 4-bit quantization in
    `work/adapter`, as `trl-qaloss train` leaves it; returns the adapter's directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from trl_qaloss.demo import MODEL_DIR
    from trl_qaloss.testing_utils import nf4_quantization

    config = AutoConfig.from_pretrained(config_path)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    base.save_pretrained(work / "base")
    del base
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)  # its ids are all below the real vocabulary size
    tokenizer.save_pretrained(work / "base")
    quantized = AutoModelForCausalLM.from_pretrained(work / "base", quantization_config=nf4_quantization())
    model = get_peft_model(quantized, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01)  # trained: B starts at 0, where merging changes nothing
    model.save_pretrained(work / "adapter")
    tokenizer.save_pretrained(work / "adapter")
    info = {
        "base_model_name_or_path": str(work / "base"),
        "quantization_config": json.loads(nf4_quantization().to_json_string()),
        "dtype": "float32",
        "qa_token": "<QA>",
        "answer_token": "<A>",
        "question_end": "?",
    }
    (work / "adapter" / "trl_qaloss_base.json").write_text(json.dumps(info, indent=2))
    return work / "adapter"


# Runs a command and prints its peak resident memory in kilobytes. Linux counts in a child's peak the memory of the
# process it was forked from, so the command is started from this small interpreter, not from the benchmark's own
# (which has held a model by then).
PEAK_RSS = """
import os, subprocess, sys
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(process.pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss(argv: list[str]) -> int:
    """Run `argv` and return its peak resident memory in bytes; raise if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *argv], env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{argv} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return int(result.stdout.split()[-1]) * 1024  # kilobytes on Linux


def measure(config_path: str, dtype: str, max_shard_size: str) -> dict:
    """Peak memory of the merge of a random adapter over a random base of `config_path`'s architecture."""
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        adapter = write_base_and_adapter(config_path, work)
        imports = "import torch, transformers, peft, bitsandbytes, trl_qaloss.cli.merge"
        baseline = peak_rss([sys.executable, "-c", imports])
        merge = [sys.executable, "-m", "trl_qaloss", "merge", "--adapter", str(adapter), "--output", str(work / "m")]
        peak = peak_rss([*merge, "--dtype", dtype, "--max_shard_size", max_shard_size])
        shards = [p.stat().st_size for p in (work / "m").glob("*.safetensors")]
    params = parameter_count(config_path)
    return {
        "config": config_path,
        "dtype": dtype,
        "parameters": params,
        "full_copy_gb": params * DTYPE_BYTES[dtype] / GB,
        "saved_gb": sum(shards) / GB,
        "largest_shard_gb": max(shards) / GB,
        "peak_rss_gb": peak / GB,
        "imports_rss_gb": baseline / GB,
    }


def estimate(config_path: str, dtype: str, imports_gb: float) -> dict:
    """The computed memory of a merge of `config_path`'s model in `dtype` on the CPU: at least one full copy in
    `dtype`; at most two (the second for what loading the 4-bit base leaves behind: the checkpoint is read and
    quantized in the process, and the allocator keeps part of that memory), plus the imports (`imports_gb`,
    measured)."""
    params = parameter_count(config_path)
    full = params * DTYPE_BYTES[dtype] / GB
    return {
        "config": config_path,
        "dtype": dtype,
        "parameters": params,
        "full_copy_gb": full,
        "bound_gb": 2 * full + imports_gb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", default=str(ROOT / "benchmarks" / "configs" / "qwen2.5-0.5b.json"))
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float32")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--estimate", nargs="*", default=[], metavar="CONFIG", help="config.json files to compute")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    measured = measure(args.model_config, args.dtype, args.max_shard_size)
    imports = measured["imports_rss_gb"]
    measured["bound_gb"] = estimate(args.model_config, args.dtype, imports)["bound_gb"]  # the bound, where measured
    estimates = [estimate(config, dtype, imports) for config in args.estimate for dtype in ("bfloat16", "float32")]
    result = {"measured": measured, "estimates": estimates, "torch": torch.__version__}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
