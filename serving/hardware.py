"""What this machine does fast: the default dtype and thread count, chosen once, overridable.

bfloat16 is native on CPUs with AVX-512 BF16 or AMX and on recent GPUs; elsewhere (AVX2-only
CPUs such as AMD Zen 3, most laptops) it is emulated, and a bfloat16 linear layer was measured
3-13x slower than float32 there. So the default is bfloat16 only where the hardware has it.
`CHAT_DTYPE` (bfloat16, float32 or auto) and `CHAT_THREADS` override the choice; the command
lines take `--dtype` as well. The choice is logged once, with its reason.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DTYPE_ENV = "CHAT_DTYPE"
THREADS_ENV = "CHAT_THREADS"
DTYPES = ("bfloat16", "float32")
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


class BadSetting(ValueError):
    """A machine setting (CHAT_DTYPE, CHAT_THREADS, --dtype) with a value we cannot use."""


def _cpuinfo(field: str) -> str:
    """The first `field` line's value in /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def cpu_name() -> str:
    return _cpuinfo("model name") or "unknown CPU"


def detect_dtype() -> tuple[str, str]:
    """(dtype, why) from what the hardware does natively."""
    try:
        import torch
        if torch.cuda.is_available():
            if torch.cuda.is_bf16_supported():
                return "bfloat16", f"GPU {torch.cuda.get_device_name(0)} has bfloat16"
            return "float32", f"GPU {torch.cuda.get_device_name(0)} lacks bfloat16"
    except ImportError:
        pass
    native = sorted(BF16_CPU_FLAGS & cpu_flags())
    if not native:
        return "float32", ("the CPU has no native bfloat16 (it would be emulated, several times "
                           "slower)")
    off = bf16_kernels_off()
    if off:
        return "float32", (f"the CPU has native bfloat16 ({', '.join(native)}) but this process "
                           f"may not use it ({off}); bfloat16 would be emulated")
    return "bfloat16", f"the CPU has native bfloat16 ({', '.join(native)})"


def bf16_kernels_off() -> str | None:
    """Why torch in this process cannot use the CPU's bfloat16 instructions, or None: oneDNN,
    which does its matrix products, capped below AVX-512 BF16 (`ONEDNN_MAX_CPU_ISA=AVX2`, say).
    So capped (ATen too) on an AMX Xeon, a bfloat16 autocast training step took 7.6 times
    float32's (`bench.train_step`, a loop running beside it): the flags in /proc/cpuinfo are
    not enough."""
    try:
        import torch
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return (f"its oneDNN has no bfloat16, ONEDNN_MAX_CPU_ISA="
                    f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}")
    except (ImportError, AttributeError, RuntimeError):  # no torch, or no such (private) op
        pass
    return None


def resolve_dtype(requested: str | None = None) -> str:
    """`requested` (a flag), else `CHAT_DTYPE`, else what the machine does fast."""
    value = (requested or os.environ.get(DTYPE_ENV) or "auto").strip().lower()
    if value == "auto":
        return machine_dtype()
    if value not in DTYPES:
        raise BadSetting(f"dtype must be one of auto, {', '.join(DTYPES)}; got {value!r} "
                         f"(from {'--dtype' if requested else DTYPE_ENV}).")
    return value


@functools.cache
def machine_dtype() -> str:
    dtype, why = detect_dtype()
    log.info("dtype %s: %s (set %s to choose)", dtype, why, DTYPE_ENV)
    return dtype


def autocast(model):
    """bfloat16 autocast on `model`'s device where that dtype is native (as `resolve_dtype`
    decides), else a no-op: scoring with the trained judges runs as fast as the training did.
    Measured on a Zen 4 CPU: 1.6x faster log-probabilities, their correlation with float32's
    0.997."""
    import torch

    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=resolve_dtype() == "bfloat16")


def dtype_reason() -> str:
    """One line for status displays: the dtype in use and why."""
    if os.environ.get(DTYPE_ENV, "auto").strip().lower() not in ("", "auto"):
        return f"{resolve_dtype()} (set by {DTYPE_ENV})"
    dtype, why = detect_dtype()
    return f"{dtype} ({why})"


def threads() -> int:
    """Threads for inference: `CHAT_THREADS`, else the CPUs this process may use."""
    value = os.environ.get(THREADS_ENV)
    if value:
        if not value.isdigit() or int(value) < 1:
            raise BadSetting(f"{THREADS_ENV} must be a whole number of at least 1, got {value!r}.")
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
