"""What this machine's CPU can do, for settings that depend on it."""
from __future__ import annotations

import torch


def cpu_has_bf16() -> bool:
    """Whether this CPU has the bfloat16 instructions torch's CPU kernels use (AVX512-BF16 or AMX;
    oneDNN's own check). Without them torch emulates bf16, several times slower than fp32: a Stage I
    step ran 4.5x slower on this project's AVX2 machine, where a CPU with them ran 1.3-1.5x faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def emulated_bf16_message(setting: str) -> str:
    """The warning for `setting` (e.g. "stage1.bf16") switched on where cpu_has_bf16() is False."""
    return (f"{setting} is on, but this CPU has no bfloat16 instructions (AVX512-BF16 or AMX; it has "
            f"{torch.backends.cpu.get_cpu_capability()}), so bf16 is emulated and slower than fp32; set {setting}=false")
