"""What a job runs on, in words, for logs and result files (runs move between CPUs and lent GPUs)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """A GPU's name, or the CPU's with its thread count, the vector instructions torch dispatches to and whether its
    bf16 is native (two CPUs of one name differed 20x in bf16 training: AVX512 with bf16 against AVX2)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    isa = torch.backends.cpu.get_cpu_capability() + (", native bf16" if cpu_bf16_native() else "")
    return f"{cpu_name()} ({torch.get_num_threads()} threads, {isa})"


def cpu_bf16_native() -> bool | None:
    """Whether an x86 CPU has native bf16 (AVX512-BF16 or AMX); None where torch cannot say (ARM, an older torch).
    Without it oneDNN emulates bf16 matmuls and bf16 autocast trains about 20x slower than fp32 (seen: 7 against a
    mean 149 tokens/s, AVX2 EPYC, configs/general_chat_long_decay.yaml), where native bf16 is 1.4x faster
    (benchmarks/results/cpu_precision.md)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(c is None for c in checks):
        return None
    return any(c() for c in checks)

