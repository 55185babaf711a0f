"""Log records of the libraries underneath that tell a user nothing they can act on, filtered out narrowly."""

import logging


def _drop_cpu_kernel_hint(record: logging.LogRecord) -> bool:
    # bitsandbytes logs this on every import on CPUs with AVX512-BF16 when the optional `kernels` package (which fetches
    # a faster CPU kernel from the Hugging Face Hub) is absent: a speed hint for CPU runs, not a problem to fix.
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_cpu_kernel_hint)
