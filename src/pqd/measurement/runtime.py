"""Run an ONNX artifact on a CPU inference runtime: onnxruntime, or OpenVINO when installed.

Both are pinned to ``threads`` intra-op threads with one stream, as a
latency-bound deployment would run them. OpenVINO is told to compute in f32
(its default on bf16-capable CPUs is bf16, which would make an "FP32"
artifact silently lower-precision); INT8 QDQ layers still run as INT8.

``openvino-ir`` is OpenVINO on its own IR (``.xml`` + ``.bin``, written next to the ONNX
file by :func:`export_openvino_ir`) instead of the ONNX file: what a deployer who converts
once ships. It is only measured when named in ``measure.runtimes``.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pqd.errors import PqdError


@dataclass
class Runner:
    """``run(x)`` maps a float32 NCHW batch to logits on one runtime (to the list of every
    output when opened with ``all_outputs=True``)."""

    runtime: str
    run: Callable[[np.ndarray], np.ndarray]
    settings: dict[str, Any] = field(default_factory=dict)


OPENVINO_RUNTIMES = ("openvino", "openvino-ir")


def runtime_package(runtime: str) -> str:
    """The installed package a runtime name needs (``openvino-ir`` is OpenVINO's)."""
    return "openvino" if runtime in OPENVINO_RUNTIMES else runtime


def static_batch(runtime: str) -> bool:
    """Whether ``runtime`` compiles a static batch size (OpenVINO, from ONNX or IR)."""
    return runtime in OPENVINO_RUNTIMES


def available_runtimes() -> list[str]:
    """Installed runtimes among onnxruntime and openvino (``openvino-ir`` is not listed:
    it is OpenVINO on another file, measured only when asked for)."""
    found = []
    for name in ("onnxruntime", "openvino"):
        try:
            importlib.metadata.version(name)
            found.append(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def runtime_versions() -> dict[str, str]:
    """Versions of the installed runtimes."""
    versions = {name: importlib.metadata.version(name) for name in available_runtimes()}
    if "openvino" in versions:
        versions["openvino-ir"] = versions["openvino"]
    return versions


def open_runner(
    runtime: str,
    path: str | Path,
    threads: int,
    batch: int | None = None,
    *,
    all_outputs: bool = False,
    spinning: bool = True,
) -> Runner:
    """Load ``path`` on ``runtime``; ``batch`` fixes the batch (OpenVINO compiles it static).

    ``run(x)`` returns the first output, or the list of all outputs with ``all_outputs``.
    ``spinning=False`` stops onnxruntime's intra-op workers from busy-waiting between calls
    (each session has its own workers: several sessions called in turn, as the early-exit
    runtime does, otherwise fight over the cores; measured here: about 2.3x slower mean)."""
    if runtime == "onnxruntime":
        return _ort(Path(path), threads, all_outputs, spinning)
    if runtime == "openvino":
        return _openvino(Path(path), threads, batch, all_outputs)
    if runtime == "openvino-ir":
        xml = export_openvino_ir(Path(path))
        runner = _openvino(xml, threads, batch, all_outputs)
        return Runner("openvino-ir", runner.run, {**runner.settings, "file": xml.name})
    raise ValueError(f"unknown runtime {runtime!r}")


def _ort(path: Path, threads: int, all_outputs: bool = False, spinning: bool = True) -> Runner:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    def run_all(x: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {name: x})

    return Runner(
        "onnxruntime",
        run_all if all_outputs else run,
        {
            "intra_op_threads": threads,
            "inter_op_threads": 1,
            "graph_optimization": "all",
            "provider": "CPUExecutionProvider",
            "spinning": spinning,
        },
    )


def ort_optimized(path: str | Path, threads: int = 1) -> Any:
    """The ONNX graph onnxruntime really runs (after its graph optimizations, e.g. QDQ
    Conv groups fused into QLinearConv, NCHW -> NHWC layout), as an ``onnx.ModelProto``."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="pqd-ort-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath, load_external_data=False)


def ort_kernels(path: str | Path, threads: int = 1, proto: Any = None) -> dict[str, int]:
    """Op counts of the graph onnxruntime really runs (:func:`ort_optimized`, or ``proto``
    when already optimized; float convs show as Conv/FusedConv)."""
    from collections import Counter

    proto = proto if proto is not None else ort_optimized(path, threads)
    return dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))


# ops whose output is an integer tensor in onnxruntime's optimized graph
_INT_OUT = {
    "QuantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearAdd",
    "QLinearMul",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearSoftmax",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "QLinearConcat",
    "QLinearMatMul",
    "QLinearWhere",
    "ConvInteger",
    "MatMulInteger",
}
# moving or reshaping data: never counted as a float island of their own
_LAYOUT = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
_WHY = {
    "Conv": "float conv: a quantizer is missing on its input, weight or output",
    "FusedConv": "float conv: a quantizer is missing on its input, weight or output",
    "Gemm": "float linear: a quantizer is missing on its input, weight or output",
    "MatMul": "float matmul: a quantizer is missing on its input or weight",
    "HardSigmoid": "no integer HardSigmoid / HardSwish kernel in onnxruntime",
    "HardSwish": "no integer HardSwish kernel in onnxruntime",
    "Gelu": "no integer GELU kernel in onnxruntime",
    "QuickGelu": "no integer SiLU / QuickGelu kernel in onnxruntime",
    "Erf": "no integer GELU kernel in onnxruntime",
    "Tanh": "no integer Tanh kernel in onnxruntime",
    "Sigmoid": "the sigmoid inside SiLU (x * sigmoid(x) is one activation, no quantizer between)",
    "Mul": "the product inside HardSwish / SiLU (x * gate(x)), or a product of two "
    "tensors without quantizers",
    "MaxPool": "float max pool: its input and output quantizers differ",
    "Concat": "float concat: an input or the output has no quantizer",
    "Add": "float add: an input or the output has no quantizer",
}


def float_islands(proto: Any) -> dict[str, Any]:
    """Where an onnxruntime-optimized QDQ graph (:func:`ort_optimized`) leaves integer
    arithmetic: each op that runs on a dequantized (float) tensor, and the layout
    transposes.

    Float tensors before the first QuantizeLinear (the input normalization) and the
    final DequantizeLinear are not islands. An elementwise op next to another island op
    (e.g. the ``Mul`` of ``x * HardSigmoid(x)``) is listed with it.

    Args:
        proto: an ``onnx.ModelProto`` as onnxruntime optimized it.

    Returns:
        ``float_ops``: ``[{op, count, why}]`` (empty: every op between the first
        quantization and the logits runs in integer); ``transposes``: Transpose count.
    """
    from collections import Counter

    inits = {i.name for i in proto.graph.initializer}
    dequantized: set[str] = set()  # float tensors computed from a dequantized activation
    islands: Counter[str] = Counter()
    for node in proto.graph.node:
        acts = [i for i in node.input if i and i not in inits]
        if node.op_type == "DequantizeLinear":
            if acts:  # an activation (weights are initializers)
                dequantized.update(node.output)
            continue
        if node.op_type in _INT_OUT or (node.op_type == "QGemm" and len(node.input) > 7):
            continue
        if any(i in dequantized for i in acts):
            dequantized.update(node.output)
            if node.op_type not in _LAYOUT and node.op_type != "QuantizeLinear":
                islands[node.op_type] += 1
    ops = [
        {"op": op, "count": n, "why": _WHY.get(op, "elementwise op on a float tensor")}
        for op, n in sorted(islands.items())
    ]
    return {
        "float_ops": ops,
        "transposes": sum(n.op_type == "Transpose" for n in proto.graph.node),
    }


def import_openvino() -> Any:
    """``import openvino`` without its usage telemetry.

    Importing openvino (2025-2026) starts openvino_telemetry, which, unless the user has
    run ``opt_in_out``, counts itself consented: it writes a client id under ``~/intel``
    and forks a process that posts to Google Analytics. pqd must not phone home, so an
    absent consent file reads as declined here; an explicit opt-in is still honoured.
    """
    try:
        from openvino_telemetry.utils import opt_in_checker as oic
    except ImportError:  # telemetry not installed: nothing to turn off
        oic = None
    if oic is not None and not getattr(oic.OptInChecker.check, "_pqd_declines", False):
        original = oic.OptInChecker.check

        def check(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            no_file = oic.ConsentCheckResult.NO_FILE
            return oic.ConsentCheckResult.DECLINED if result == no_file else result

        check._pqd_declines = True  # type: ignore[attr-defined]
        oic.OptInChecker.check = check
    import openvino as ov

    return ov


def _openvino(path: Path, threads: int, batch: int | None, all_outputs: bool = False) -> Runner:
    ov = import_openvino()

    core = ov.Core()
    model = core.read_model(str(path))
    if batch is not None:
        shape = list(model.input(0).get_partial_shape())
        shape[0] = batch
        model.reshape({model.input(0): ov.PartialShape(shape)})
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_PRECISION_HINT": "f32",
    }
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return request.infer({0: x})[0]

    def run_all(x: np.ndarray) -> list[np.ndarray]:
        result = request.infer({0: x})
        return [result[i] for i in range(len(compiled.outputs))]

    return Runner(
        "openvino",
        run_all if all_outputs else run,
        {"threads": threads, "streams": 1, "precision_hint": "f32", "static_batch": batch},
    )


def openvino_ir_paths(onnx_path: Path) -> tuple[Path, Path]:
    """The ``.xml`` and ``.bin`` files of the OpenVINO IR written next to ``onnx_path``."""
    return onnx_path.with_suffix(".xml"), onnx_path.with_suffix(".bin")


def export_openvino_ir(onnx_path: Path) -> Path:
    """Convert an ONNX file to OpenVINO IR next to it (kept if newer than the ONNX file).

    Weights are stored as they are (``compress_to_fp16=False``: an FP32 artifact stays
    FP32, INT8 weights stay INT8 behind their FakeQuantize/dequantize ops).

    Args:
        onnx_path: the ONNX artifact.

    Returns:
        The ``.xml`` path (its weights are the ``.bin`` beside it).
    """
    xml, binary = openvino_ir_paths(onnx_path)
    mtime = onnx_path.stat().st_mtime
    if xml.exists() and binary.exists() and xml.stat().st_mtime >= mtime:
        return xml
    ov = import_openvino()
    model = ov.Core().read_model(str(onnx_path))
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml


_AVX2_SCRIPT = """
import sys
import numpy as np
from pqd.measurement.runtime import open_runner
run = open_runner("openvino", sys.argv[1], int(sys.argv[2])).run
x = np.load(sys.argv[3])
step = int(sys.argv[5])
np.save(sys.argv[4], np.concatenate([run(x[i:i + step]) for i in range(0, len(x), step)]))
"""


def avx2_logits(
    path: str | Path, x: np.ndarray, threads: int = 2, batch_size: int = 256
) -> np.ndarray:
    """The artifact's outputs as a CPU without VNNI computes them, on this machine.

    OpenVINO's CPU plugin (oneDNN) honours ``ONEDNN_MAX_CPU_ISA``: capped at ``AVX2`` it
    runs the AVX2 u8 x s8 kernels, whose int16 pair sums saturate, on any newer x86 CPU.
    It runs in a fresh process because oneDNN reads the cap once per process.

    Args:
        path: the ONNX file.
        x: float32 NCHW input in [0, 1].
        threads: OpenVINO inference threads.
        batch_size: images per call.

    Returns:
        The first output (logits) for every image of ``x``.
    """
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "x.npy", Path(tmp) / "y.npy"
        np.save(src, np.ascontiguousarray(x, dtype=np.float32))
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _AVX2_SCRIPT,
                str(path),
                str(threads),
                str(src),
                str(dst),
                str(batch_size),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the AVX2 OpenVINO run of {path} failed: {tail}")
        return np.load(dst)


def resolve_runtimes(runtimes: list[str]) -> list[str]:
    """The runtimes to measure on: ``runtimes`` (``measure.runtimes``; ``["auto"]``: every
    installed one, onnxruntime first); fails (one line) if a requested one is not installed.

    Args:
        runtimes: runtime names.

    Returns:
        The runtime names to open.
    """
    have = available_runtimes()
    ort_fix = (
        "onnxruntime is a dependency of pqd, so the install is broken: reinstall pqd, "
        "or pip install onnxruntime"
    )
    if runtimes == ["auto"]:
        if not have:
            raise PqdError("no ONNX runtime is installed (not even onnxruntime)", ort_fix)
        return have
    for rt in runtimes:
        package = runtime_package(rt)
        if package not in have:
            fix = (
                f"{ort_fix}; or remove it from measure.runtimes"
                if rt == "onnxruntime"
                else "pip install 'pqd[openvino]' (or pip install openvino), or remove "
                f"{rt} from measure.runtimes"
            )
            what = rt if package == rt else f"{package} (for {rt})"
            raise PqdError(f"measure.runtimes: {what} is not installed", fix)
    return list(runtimes)
