"""Where a measurement was taken: CPU, threads, library versions."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import torch

_LIBS = (
    "torch",
    "torchao",
    "torch-pruning",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "openvino",
    "numpy",
    "pydantic",
)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="ignore").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU features that decide INT8/bf16 speed (VNNI, AVX-512, AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return []
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in wanted if f in flags]


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the numbers."""
    out = {"python": platform.python_version()}
    for name in _LIBS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def environment(threads: int) -> dict[str, Any]:
    """A JSON-ready description of this machine for the record."""

    cuda = torch.cuda.is_available()
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cpu_flags": flags,
        "kernels": kernels_in_words(flags),
        "logical_cpus": os.cpu_count(),
        "measure_threads": threads,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "libraries": library_versions(),
    }


VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def has_vnni(flags: list[str]) -> bool:
    """True when the CPU flags name an int32-accumulating u8 x s8 instruction."""
    return any(f in flags for f in VNNI_FLAGS)


def kernels_in_words(flags: list[str]) -> str:
    """What the CPU flags mean for the kernels that run the artifacts, in one sentence."""
    if not flags:
        return "no x86 SIMD flags read (not x86, or /proc/cpuinfo unreadable)"
    if has_vnni(flags):
        int8 = (
            "INT8 with VNNI"
            + (" and AMX" if "amx_int8" in flags else "")
            + " (int32 accumulation: 8-bit weights are exact)"
        )
    elif "avx2" in flags:
        int8 = (
            "INT8 without VNNI (AVX2 vpmaddubsw: int16 pair sums saturate with 8-bit "
            "weights; 7-bit weights are exact)"
        )
    else:
        int8 = "INT8 without AVX2 or VNNI"
    bf16 = (
        "bf16 in hardware"
        if "avx512_bf16" in flags or "amx_bf16" in flags
        else "no bf16 in hardware (bf16 autocast is emulated and slow)"
    )
    return f"{int8}; {bf16}"
