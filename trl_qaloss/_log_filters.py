"""What the libraries underneath print that tells a user nothing they can act on, kept off the terminal narrowly:
each filter matches one message of one library, and `quiet_dataset_preparation` turns off only the progress bars of
the dataset steps this package runs (loading, converting, TRL's tokenization), not the Trainer's."""

import contextlib
import logging
import warnings
from collections.abc import Iterator

# bitsandbytes asks the optional `kernels` package for a faster CPU kernel from the Hugging Face Hub on every import, on
# CPUs with AVX512-BF16. Neither line below is a problem to fix: without the kernel, bitsandbytes uses its own.
CPU_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"


def _drop_cpu_kernel_hint(record: logging.LogRecord) -> bool:
    # bitsandbytes, when the kernel cannot be had (no `kernels`, no Hub access, not in the cache).
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def _drop_offline_trust_check(record: logging.LogRecord) -> bool:
    # kernels >= 0.19, with HF_HUB_OFFLINE=1, before it finds the kernel missing from the cache.
    return not record.getMessage().startswith(f"Skipping publisher trust check for '{CPU_KERNEL_REPO}'")


def _drop_cpu_accelerator_notice(record: logging.LogRecord) -> bool:
    # DeepSpeed (installed for ZeRO-3), when transformers or accelerate import it on a machine without a GPU.
    return not record.getMessage().startswith("Setting accelerator to CPU. If you have GPU or other accelerator")


def _drop_dequantize_notice(record: logging.LogRecord) -> bool:
    # transformers, when `trl-qaloss merge` dequantizes a 4-bit base: the dtype it names is the one `--dtype` chose.
    return not record.getMessage().startswith("The modules are dequantized in ")


def _drop_checkpoint_mtime_notice(record: logging.LogRecord) -> bool:
    # transformers, when it sorts checkpoints to rotate (`save_total_limit`) and two have the same modification time.
    return not record.getMessage().startswith("mtime may not be reliable on this filesystem")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_cpu_kernel_hint)
logging.getLogger("transformers.trainer_utils").addFilter(_drop_checkpoint_mtime_notice)
logging.getLogger("transformers.integrations.bitsandbytes").addFilter(_drop_dequantize_notice)
logging.getLogger("kernels._internals.hf_hub").addFilter(_drop_offline_trust_check)
logging.getLogger("DeepSpeed").addFilter(_drop_cpu_accelerator_notice)
# PEFT reads `model.is_gradient_checkpointing`, which transformers now calls deprecated.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# The Trainer's DataLoader asks for pinned memory, which torch ignores, with this warning, on a machine without a GPU.
warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true but no accelerator is found")


@contextlib.contextmanager
def quiet_dataset_preparation() -> Iterator[None]:
    """Within: no progress bars from `datasets` (a `map` or `filter` per preparation step, about 20 before a run's
    first step), unless they were already off; restored after."""
    from datasets.utils import logging as datasets_logging

    enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets_logging.enable_progress_bar()
