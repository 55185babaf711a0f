"""Log records of the libraries underneath that tell a user nothing they can act on, filtered out narrowly."""

import logging

# bitsandbytes asks the optional `kernels` package for a faster CPU kernel from the Hugging Face Hub on every import, on
# CPUs with AVX512-BF16. Neither line below is a problem to fix: without the kernel, bitsandbytes uses its own.
CPU_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"


def _drop_cpu_kernel_hint(record: logging.LogRecord) -> bool:
    # bitsandbytes, when the kernel cannot be had (no `kernels`, no Hub access, not in the cache).
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def _drop_offline_trust_check(record: logging.LogRecord) -> bool:
    # kernels >= 0.19, with HF_HUB_OFFLINE=1, before it finds the kernel missing from the cache.
    return not record.getMessage().startswith(f"Skipping publisher trust check for '{CPU_KERNEL_REPO}'")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_cpu_kernel_hint)
logging.getLogger("kernels._internals.hf_hub").addFilter(_drop_offline_trust_check)
