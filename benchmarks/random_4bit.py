"""A causal LM with RANDOM weights, already quantized to 4-bit, built from a config.json without bf16 weights.

For memory and speed checks at a model's real size (7B, 72B) with no hub access: the bf16 checkpoint of a 72B model
(145 GB) fits neither on the GPU nor on a small disk, so each linear weight is drawn and quantized one at a time on
the device (bitsandbytes' `quantize_4bit`, the same call transformers makes when it quantizes a checkpoint on
loading), and the packed weights are handed to `from_pretrained` as a pre-quantized state dict. The model that comes
out is the one `from_pretrained(path, quantization_config=...)` gives: bitsandbytes `Linear4bit` layers,
`is_loaded_in_4bit`, and the LM head and embeddings in the compute dtype.

Random values follow transformers' initialization of these models: normal(0, `initializer_range`) weights and
embeddings, zero biases, unit norms.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, PretrainedConfig


def with_overrides(config: str | PretrainedConfig, overrides: dict | None = None) -> PretrainedConfig:
    """`config` (or the config.json at that path) with `overrides`, built anew so that the fields derived from the
    overridden ones (e.g. one `layer_types` entry per layer) follow them."""
    if isinstance(config, PretrainedConfig):
        values = config.to_dict()
    else:
        values, _ = PretrainedConfig.get_config_dict(config)
    values = {**values, **(overrides or {})}
    values.pop("layer_types", None)  # derived from num_hidden_layers and the sliding-window fields
    return AutoConfig.for_model(**values)


def skeleton(config: PretrainedConfig) -> torch.nn.Module:
    """The model's module tree on the meta device: names and shapes of every parameter, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def not_quantized(model: torch.nn.Module, quantization_config: BitsAndBytesConfig) -> set[str]:
    """Module names transformers leaves unquantized: the output embeddings and `llm_int8_skip_modules`."""
    output = model.get_output_embeddings()
    names = {name for name, module in model.named_modules() if module is output}
    return names | set(quantization_config.llm_int8_skip_modules or [])


def random_quantized_state_dict(
    config: PretrainedConfig, quantization_config: BitsAndBytesConfig, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """State dict of a pre-quantized 4-bit checkpoint of `config` with random weights, on the CPU.

    Each linear weight (`[out, in]`) is drawn in the compute dtype on `device`, quantized there and copied to the host,
    so the device never holds more than one unquantized weight.
    """
    import bitsandbytes as bnb

    model = skeleton(config)
    skipped = not_quantized(model, quantization_config)
    dtype = quantization_config.bnb_4bit_compute_dtype
    generator = torch.Generator(device).manual_seed(seed)
    std = getattr(config.get_text_config(), "initializer_range", 0.02)
    state = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{name}" if module_name else name
            if name == "bias":
                state[key] = torch.zeros(param.shape, dtype=dtype)
            elif "norm" in module_name.rsplit(".", 1)[-1]:
                state[key] = torch.ones(param.shape, dtype=dtype)
            else:
                value = torch.randn(param.shape, generator=generator, device=device, dtype=dtype).mul_(std)
                quantize = isinstance(module, torch.nn.Linear) and module_name not in skipped
                if not quantize:
                    state[key] = value.cpu()
                    continue
                packed, quant_state = bnb.functional.quantize_4bit(
                    value,
                    compress_statistics=quantization_config.bnb_4bit_use_double_quant,
                    quant_type=quantization_config.bnb_4bit_quant_type,
                    quant_storage=quantization_config.bnb_4bit_quant_storage,
                )
                # The keys bitsandbytes' `Linear4bit` writes into a checkpoint next to its packed weight.
                state[key] = packed.cpu()
                for suffix, tensor in quant_state.as_dict(packed=True).items():
                    state[f"{key}.{suffix}"] = tensor.cpu()
    return state


def write_checkpoint(state: dict[str, torch.Tensor], config: PretrainedConfig, path: Path, shard_bytes: int) -> None:
    """Write `state` and `config` to `path` as a sharded safetensors checkpoint, the layout `save_pretrained` gives."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    shards, size = [{}], 0
    for key, tensor in state.items():
        tensor_bytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + tensor_bytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.contiguous()
        size += tensor_bytes
    weight_map = {}
    for index, shard in enumerate(shards):
        name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def load_random_4bit(
    config: str | PretrainedConfig,
    quantization_config: BitsAndBytesConfig,
    device: torch.device,
    seed: int = 0,
    overrides: dict | None = None,
    checkpoint_dir: str | Path | None = None,
    **load_kwargs,
):
    """`(model, seconds_to_draw, seconds_to_load)`: the 4-bit model of `config` (a config, or the path of a
    config.json or of a directory holding one; `overrides` applied to a path's), random weights drawn on `device` and
    loaded there by `from_pretrained`.

    The drawn state dict is handed to `from_pretrained` directly; with `checkpoint_dir`, it is written there as a
    checkpoint (about 0.55 bytes per parameter) and loaded from the files instead, exactly as a downloaded pre-quantized
    model is. `load_kwargs` go to `from_pretrained` (`dtype`, `attn_implementation`, ...), as a recipe's
    `model_init_kwargs` do.
    """
    import transformers

    config = with_overrides(config, overrides)
    started = time.perf_counter()
    state = random_quantized_state_dict(config, quantization_config, device, seed)
    drawn = time.perf_counter()
    config.quantization_config = quantization_config.to_dict()  # what a saved 4-bit checkpoint's config holds
    architecture = getattr(transformers, config.architectures[0])  # AutoModel's from_pretrained wants a path
    device_map = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    kwargs = dict(quantization_config=quantization_config, device_map=device_map, **load_kwargs)
    if checkpoint_dir is None:
        model = architecture.from_pretrained(None, config=config, state_dict=state, **kwargs)
    else:
        write_checkpoint(state, config, Path(checkpoint_dir), shard_bytes=4 << 30)
        del state
        model = architecture.from_pretrained(checkpoint_dir, **kwargs)
    return model, drawn - started, time.perf_counter() - drawn
