"""Where a measurement was taken: CPU, threads, library versions."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import torch

_LIBS = ("torch", "torchao", "torch-pruning", "onnx", "onnxscript", "onnxruntime", "openvino",
         "numpy", "pydantic")


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
    from pqd.target import kernels_in_words

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
