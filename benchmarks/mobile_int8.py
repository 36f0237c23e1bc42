"""INT8 vs FP32 ONNX on mobile blocks, before and after pqd's float-island annotation.

    python benchmarks/mobile_int8.py                      # mobilenetv2 + tiny_blocks, ~6 min
    python benchmarks/mobile_int8.py --json mobile.json --models tiny_blocks

For each model (random weights, BN statistics from random images, as
``benchmarks/runtime.py`` builds them) four files are exported: FP32, INT8 with
torchao's x86 annotation only (``x86``: pqd's passes :data:`ISLAND_PASSES` switched off),
INT8 with float activations (``fact``: :func:`pqd.quant.pt2e.close_float_islands` on,
SiLU / hardswish / hardsigmoid not split, so onnxruntime runs them in float) and INT8 as
pqd exports it now (``pqd``). On
every installed runtime and each batch size, one ``compare_latency`` call times them
side by side (interleaved rounds). Per file: onnxruntime's kernels after its graph
optimizations (integer convs, float convs, Q/DQ left, layout transposes, the ops left in
float and why), and OpenVINO's runtime-model op types with their execution precisions.
The INT8 GEMM floor ratio (fp32 / int8 peak GMAC/s of onnxruntime's MatMul /
MatMulInteger, ``benchmarks/runtime.py``) says what INT8 could gain where GEMM-bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runtime as rt_bench  # benchmarks/runtime.py

ARMS = ("fp32", "int8_x86", "int8_fact", "int8_pqd")
ISLAND_PASSES = ("close_float_islands", "split_silu", "split_hard_gates")


def openvino_ops(path: Path, threads: int) -> dict[str, int]:
    """``"<layer type>/<exec precision>"`` counts of OpenVINO's compiled (runtime) model."""
    from pqd.measure.runtime import import_openvino

    ov = import_openvino()
    core = ov.Core()
    model = core.read_model(str(path))
    compiled = core.compile_model(
        model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    )
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = str(info["layerType"]) if "layerType" in info else op.get_type_name()
        prec = str(info["runtimePrecision"]) if "runtimePrecision" in info else "?"
        if kind in ("Input", "Parameter", "Output", "Result", "Const", "Constant"):
            continue
        counts[f"{kind}/{prec}"] += 1
    return dict(sorted(counts.items()))


def _export_without(model: Any, out: Path, passes: tuple[str, ...]) -> Path:
    """The INT8 file of ``model`` with the named :mod:`pqd.quant.pt2e` passes switched off."""
    import pqd.quant.pt2e as pt2e

    originals = {p: getattr(pt2e, p) for p in passes}
    for p in passes:
        setattr(pt2e, p, lambda *a, **k: 0)
    try:
        return rt_bench.export_pair(model, out)[0]["int8"]
    finally:
        for p, fn in originals.items():
            setattr(pt2e, p, fn)


def export_arms(model_name: str, out: Path) -> dict[str, Path]:
    """The FP32 file and the three INT8 files of ``model_name``: torchao's x86 annotation
    alone (``int8_x86``), with pqd's island annotation but SiLU / hardswish / hardsigmoid
    left whole, i.e. float on onnxruntime (``int8_fact``), and as pqd exports it now."""
    model = rt_bench.build(model_name)
    paths, _ = rt_bench.export_pair(model, out / "pqd")
    return {
        "fp32": paths["fp32"],
        "int8_x86": _export_without(model, out / "x86", ISLAND_PASSES),
        "int8_fact": _export_without(model, out / "fact", ISLAND_PASSES[1:]),
        "int8_pqd": paths["int8"],
    }


def kernel_summary(path: Path) -> dict[str, Any]:
    """Integer / float convs, Q/DQ left, transposes and float ops in onnxruntime's graph."""
    from pqd.measure.runtime import float_islands, ort_kernels, ort_optimized

    proto = ort_optimized(path)
    k = ort_kernels(path, proto=proto)
    return {
        "int_convs": k.get("QLinearConv", 0) + k.get("ConvInteger", 0),
        "float_convs": k.get("Conv", 0) + k.get("FusedConv", 0),
        "quantize": k.get("QuantizeLinear", 0),
        "dequantize": k.get("DequantizeLinear", 0),
        **float_islands(proto),
        "kernels": k,
    }


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from pqd.measure.env import environment
    from pqd.measure.latency import compare_latency
    from pqd.measure.runtime import available_runtimes, open_runner

    result: dict[str, Any] = {
        "environment": environment(args.threads),
        "batches": args.batches,
        "threads": args.threads,
        "models": {},
    }
    peaks = rt_bench.gemm_peaks(args.threads, sizes=(256, 512, 1024))
    result["gemm_peak_gmacs"] = {"int8": peaks["int8"], "fp32": peaks["fp32"]}
    result["floor_ratio"] = peaks["int8"] / peaks["fp32"]
    runtimes = [r for r in args.runtimes if r in available_runtimes()]
    for name in args.models:
        paths = export_arms(name, out / name)
        rec: dict[str, Any] = {"files": {}, "latency_ms": {}}
        for arm, path in paths.items():
            rec["files"][arm] = {"size_bytes": path.stat().st_size, "ort": kernel_summary(path)}
            if "openvino" in runtimes:
                rec["files"][arm]["openvino"] = openvino_ops(path, args.threads)
        for rt in runtimes:
            for b in args.batches:
                runners = {
                    arm: open_runner(rt, p, args.threads, batch=b if rt == "openvino" else None)
                    for arm, p in paths.items()
                }
                stats = compare_latency(
                    {arm: r.run for arm, r in runners.items()},
                    (b, *rt_bench.IMAGE),
                    warmup=max(5, 30 // b),
                    repeats=max(20, args.repeats // b),
                    progress=False,
                )
                rec["latency_ms"].setdefault(rt, {})[str(b)] = {
                    arm: round(st.p50, 4) for arm, st in stats.items()
                }
                rec.setdefault("settings", {})[rt] = runners["fp32"].settings
                print(f"[mobile_int8] {name} {rt} batch {b}: {rec['latency_ms'][rt][str(b)]}")
        result["models"][name] = rec
    return result


def table(result: dict[str, Any]) -> str:
    """One row per model x runtime x batch: p50s, INT8 speed-ups, kernel counts."""
    lines = [
        "model        runtime      batch  fp32 ms  x86 ms  fact ms  pqd ms  x86 x  fact x  pqd x",
        "-----------  -----------  -----  -------  ------  -------  ------  -----  ------  -----",
    ]
    for name, rec in result["models"].items():
        for rt, by_batch in rec["latency_ms"].items():
            for b, p in by_batch.items():
                ms = "  ".join(f"{p[a]:6.3f}" for a in ARMS[1:])
                ups = "  ".join(f"{p['fp32'] / p[a]:4.2f}x" for a in ARMS[1:])
                lines.append(f"{name:<11}  {rt:<11}  {b:>5}  {p['fp32']:7.3f}  {ms}  {ups}")
    lines.append("")
    lines.append("onnxruntime kernels: int convs / float convs / Q / DQ / transposes; float ops")
    for name, rec in result["models"].items():
        for arm in ARMS[1:]:
            o = rec["files"][arm]["ort"]
            ops = ", ".join(f"{r['op']} x{r['count']}" for r in o["float_ops"]) or "-"
            lines.append(
                f"  {name} {arm}: {o['int_convs']} / {o['float_convs']} / {o['quantize']} / "
                f"{o['dequantize']} / {o['transposes']}; {ops}"
            )
    env = result["environment"]
    lines.append("")
    lines.append(
        f"GEMM peak ({result['threads']} threads, onnxruntime): int8 "
        f"{result['gemm_peak_gmacs']['int8']:.0f}, fp32 {result['gemm_peak_gmacs']['fp32']:.0f} "
        f"GMAC/s; floor ratio {result['floor_ratio']:.2f}x"
    )
    lines.append(f"CPU: {env['cpu']} ({', '.join(env['cpu_flags'])}), {env['logical_cpus']} CPUs")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mobilenetv2", "tiny_blocks"])
    p.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=200, help="timed calls at batch 1")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--out", type=Path, help="keep the ONNX files here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pqd-mobile-") as tmp:
        result = run(args, args.out or Path(tmp))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
