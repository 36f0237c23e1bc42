"""INT8 vs FP32 ONNX over architectures and resolutions: does the INT8 file pay everywhere?

    python benchmarks/mobile_int8.py                      # the table below, ~25 min
    python benchmarks/mobile_int8.py --models mobilenetv2 tiny_blocks --sizes 32 \
        --arms fp32 int8_x86 int8_fact int8_pqd           # pqd's annotation vs torchao's

For each model and input size (random weights, BN statistics from random images, as
``benchmarks/runtime.py`` builds them; at 224x224 the ImageNet layouts of ResNet-18 and
MobileNetV2 from ``--imagenet``) the FP32 file and the INT8 file are exported the pipeline's
way. Optional INT8 arms: torchao's x86 annotation only (``int8_x86``: pqd's passes
:data:`ISLAND_PASSES` switched off) and pqd's island annotation with SiLU / hardswish /
hardsigmoid left whole (``int8_fact``). At each batch size ONE ``compare_latency`` call
times every file on every runtime side by side (interleaved rounds): onnxruntime,
OpenVINO reading the ONNX file, and OpenVINO on its IR (``openvino-ir``). Per file:
onnxruntime's kernels after its graph optimizations (integer convs, float convs, Q/DQ,
layout transposes, ops left in float and why) and OpenVINO's convolutions by execution
precision. ``x floor``: the INT8 file's best p50 over the INT8 GEMM floor (its MACs at
onnxruntime's peak u8s8 MatMulInteger throughput); the floor ratio (fp32 / int8 GEMM peak)
is what INT8 can gain where GEMM-bound. ``--profile`` adds onnxruntime's per-node profile
of the named models at 224x224, batch 1: time per call in depthwise, grouped, 1x1 and kxk
convs and the rest, FP32 vs INT8 (why depthwise nets gain less). The held-out style of
user model is ``user_blocks:build`` (``tests/user_blocks.py``: depthwise, concat,
squeeze-excite, functional residuals). ``targets`` judges the issue's goals.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))  # user_blocks:build, the held-out style model

import runtime as rt_bench  # noqa: E402  (benchmarks/runtime.py)

ARMS = ("fp32", "int8_x86", "int8_fact", "int8_pqd")
ISLAND_PASSES = ("close_float_islands", "split_silu", "split_hard_gates")
MODELS = (
    "fastnet_q8",
    "resnet18",
    "mobilenetv2",
    "mobilenetv3_large",
    "tiny_blocks",
    "user_blocks:build",
)
# at ImageNet sizes the ImageNet layouts (torchvision's stems and strides), not CIFAR's
IMAGENET = {"resnet18": "resnet18_imagenet", "mobilenetv2": "mobilenetv2_imagenet"}
MOBILE = ("mobilenetv2", "mobilenetv3_large", "mobilenetv3_small", "tiny_blocks")
USER = "user_blocks:build"
# the goals: at 224x224 batch 1, INT8 speed-up on the best runtime >= this share of
# the GEMM floor ratio; the user model's INT8 file faster than its FP32 file at every batch
SHARE_OF_FLOOR = {"resnet18": 0.8, **{m: 0.6 for m in MOBILE}}


def _text(value: Any) -> str:
    """An OpenVINO rt_info value (an ``OVAny``) as text."""
    return value.astype(str) if hasattr(value, "astype") else str(value)


def openvino_ops(path: Path, threads: int) -> dict[str, int]:
    """``"<layer type>/<exec precision>"`` counts of OpenVINO's compiled (runtime) model."""
    from pqd.measurement.runtime import import_openvino

    ov = import_openvino()
    core = ov.Core()
    model = core.read_model(str(path))
    compiled = core.compile_model(
        model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    )
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = _text(info["layerType"]) if "layerType" in info else op.get_type_name()
        prec = _text(info["runtimePrecision"]) if "runtimePrecision" in info else "?"
        if kind in ("Input", "Parameter", "Output", "Result", "Const", "Constant"):
            continue
        counts[f"{kind}/{prec}"] += 1
    return dict(sorted(counts.items()))


def _export_without(
    model: Any, out: Path, passes: tuple[str, ...], image: tuple[int, int, int]
) -> Path:
    """The INT8 file of ``model`` with the named :mod:`pqd.quant.quantizer` passes switched off."""
    import pqd.quant.quantizer as quantizer

    originals = {p: getattr(quantizer, p) for p in passes}
    for p in passes:
        setattr(quantizer, p, lambda *a, **k: 0)
    try:
        return rt_bench.export_pair(model, out, image=image)[0]["int8"]
    finally:
        for p, fn in originals.items():
            setattr(quantizer, p, fn)


def export_arms(
    model_name: str, out: Path, arms: tuple[str, ...], image: tuple[int, int, int]
) -> dict[str, Path]:
    """The requested files of ``model_name`` for inputs of shape ``image``: ``fp32``, INT8
    with torchao's x86 annotation alone (``int8_x86``), with pqd's island annotation but
    SiLU / hardswish / hardsigmoid left whole, i.e. float on onnxruntime (``int8_fact``),
    and INT8 as pqd exports it (``int8_pqd``)."""
    bn_batch = 64 if image[1] <= 64 else 8
    model = rt_bench.build(model_name, batch=bn_batch, image=image)
    paths, _ = rt_bench.export_pair(model, out / "pqd", batch=bn_batch, image=image)
    files = {"fp32": paths["fp32"], "int8_pqd": paths["int8"]}
    if "int8_x86" in arms:
        files["int8_x86"] = _export_without(model, out / "x86", ISLAND_PASSES, image)
    if "int8_fact" in arms:
        files["int8_fact"] = _export_without(model, out / "fact", ISLAND_PASSES[1:], image)
    return {a: files[a] for a in ARMS if a in arms}


def kernel_summary(path: Path) -> dict[str, Any]:
    """Integer / float convs, Q/DQ left, transposes and float ops in onnxruntime's graph."""
    from pqd.measurement.runtime import float_islands, ort_kernels, ort_optimized

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


def openvino_convs(ops: dict[str, int]) -> dict[str, int]:
    """OpenVINO's convolutions by execution precision, e.g. ``{"u8": 20, "f32": 0}``."""
    out: Counter[str] = Counter()
    for key, n in ops.items():
        kind, _, prec = key.partition("/")
        if kind in ("Convolution", "GroupConvolution", "FullyConnected"):
            out[prec.lower()] += n
    return dict(out)


def conv_kind(node: Any, inits: dict[str, Any]) -> str | None:
    """``depthwise`` / ``grouped`` / ``1x1`` / ``kxk`` for a conv node of onnxruntime's
    optimized graph (QLinearConv or float Conv/FusedConv), None for any other op."""
    if node.op_type not in ("QLinearConv", "Conv", "FusedConv", "ConvInteger"):
        return None
    w = inits.get(node.input[3 if node.op_type == "QLinearConv" else 1])
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    if group > 1:
        return "depthwise" if w is not None and w.dims[1] == 1 else "grouped"
    if w is not None and list(w.dims[2:]) == [1, 1]:
        return "1x1"
    return "kxk"


def ort_profile(path: Path, image: tuple[int, int, int], threads: int, calls: int) -> dict:
    """Per-call ms of onnxruntime's kernels at batch 1, summed by conv kind (:func:`conv_kind`)
    and by op type for the rest, from onnxruntime's own profiler (``enable_profiling``),
    over the last 80% of ``calls`` (the first ones pack weights)."""
    import numpy as np
    import onnxruntime as ort

    from pqd.measurement.runtime import ort_optimized

    proto = ort_optimized(path)
    inits = {i.name: i for i in proto.graph.initializer}
    kinds = {n.name: conv_kind(n, inits) for n in proto.graph.node}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="pqd-prof-") as tmp:
        so.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((1, *image), dtype=np.float32)
        name = sess.get_inputs()[0].name
        for _ in range(calls):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    # the first calls pack weights and allocate: only the last ``calls - warm`` count
    warm = max(1, calls // 5)
    runs = sorted(ev["ts"] for ev in events if ev.get("name") == "model_run")
    start = runs[warm] if len(runs) > warm else 0
    timed = len([t for t in runs if t >= start]) or calls
    total: defaultdict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") != "Node" or not ev["name"].endswith("_kernel_time"):
            continue
        if ev["ts"] < start:
            continue
        node = ev["name"][: -len("_kernel_time")]
        kind = kinds.get(node) or ev.get("args", {}).get("op_name", "other")
        total[kind] += ev["dur"] / 1e3 / timed
    return {k: round(v, 4) for k, v in sorted(total.items())}


DENSE_CONVS = ("1x1", "kxk", "grouped")


def ceiling(profile: dict[str, dict[str, float]], floor_ratio: float) -> dict[str, float]:
    """What INT8 can gain at most on this profile: every dense (1x1, kxk, grouped) conv at
    the GEMM floor ratio over its FP32 time, everything else (depthwise convs, elementwise,
    Q/DQ, transposes) as the INT8 file measured it.

    Args:
        profile: ``{"fp32": {kind: ms}, "int8_pqd": {kind: ms}}`` from :func:`ort_profile`.
        floor_ratio: fp32 / int8 GEMM peak on this CPU.

    Returns:
        ``speedup`` (the ceiling, FP32 profile total over the bound), ``measured`` (the
        profiled FP32 / INT8 totals), ``depthwise_speedup`` and ``rest_share`` (fraction of
        the INT8 time outside dense convs).
    """
    f32, i8 = profile["fp32"], profile["int8_pqd"]
    t32, t8 = sum(f32.values()), sum(i8.values())
    dense32 = sum(f32.get(k, 0.0) for k in DENSE_CONVS)
    rest8 = t8 - sum(i8.get(k, 0.0) for k in DENSE_CONVS)
    dw32, dw8 = f32.get("depthwise", 0.0), i8.get("depthwise", 0.0)
    return {
        "speedup": round(t32 / (dense32 / floor_ratio + rest8), 3),
        "measured": round(t32 / t8, 3),
        "depthwise_speedup": round(dw32 / dw8, 3) if dw8 else 0.0,
        "rest_share": round(rest8 / t8, 3),
    }


def latency_calls(batch: int, image: tuple[int, int, int], repeats: int) -> tuple[int, int]:
    """(warm-up, timed) calls per file: ``repeats`` at batch 1 and 32x32, fewer for more
    pixels per call (at least 3 and 10)."""
    scale = math.sqrt(batch * image[1] * image[2] / (32 * 32))
    return max(3, round(30 / scale)), max(10, round(repeats / scale))


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from pqd.measurement.complexity import onnx_complexity
    from pqd.measurement.env import environment
    from pqd.measurement.latency import compare_latency
    from pqd.measurement.runtime import (
        available_runtimes,
        open_runner,
        runtime_package,
        static_batch,
    )

    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "environment": environment(args.threads),
        "batches": args.batches,
        "threads": args.threads,
        "models": {},
    }
    peaks = rt_bench.gemm_peaks(args.threads, sizes=(256, 512, 1024))
    result["gemm_peak_gmacs"] = {"int8": peaks["int8"], "fp32": peaks["fp32"]}
    result["floor_ratio"] = peaks["int8"] / peaks["fp32"]
    have = available_runtimes()
    runtimes = [r for r in args.runtimes if runtime_package(r) in have]
    for size in args.sizes:
        image = (3, size, size)
        for base in args.models:
            name = IMAGENET.get(base, base) if size >= args.imagenet else base
            key = f"{base}@{size}"
            folder = out / key.replace(":", "_").replace("@", "_")
            paths = export_arms(name, folder, args.arms, image)
            rec: dict[str, Any] = {"model": name, "size": size, "files": {}, "latency_ms": {}}
            macs = onnx_complexity(paths["int8_pqd"])["macs"]
            rec["macs"] = macs
            rec["floor_ms"] = rt_bench.floors_ms(macs, peaks)
            for arm, path in paths.items():
                f = {"size_bytes": path.stat().st_size, "ort": kernel_summary(path)}
                if "openvino" in runtimes:
                    f["openvino"] = openvino_ops(path, args.threads)
                    f["openvino_convs"] = openvino_convs(f["openvino"])
                rec["files"][arm] = f
            for b in args.batches:
                warmup, repeats = latency_calls(b, image, args.repeats)
                runs = {}
                for rt in runtimes:
                    for arm, path in paths.items():
                        one = b if static_batch(rt) else None
                        runs[f"{arm}|{rt}"] = open_runner(rt, path, args.threads, batch=one).run
                stats = compare_latency(
                    runs, (b, *image), warmup=warmup, repeats=repeats, progress=False
                )
                by_rt: dict[str, dict[str, float]] = {}
                for k, st in stats.items():
                    arm, rt = k.split("|")
                    by_rt.setdefault(rt, {})[arm] = round(st.p50, 4)
                rec["latency_ms"][str(b)] = by_rt
                print(f"[mobile_int8] {key} batch {b}: {by_rt}", flush=True)
            if size in args.profile_sizes and base in args.profile:
                rec["profile_ms"] = {
                    arm: ort_profile(paths[arm], image, args.threads, args.profile_calls)
                    for arm in ("fp32", "int8_pqd")
                }
                rec["ceiling"] = ceiling(rec["profile_ms"], result["floor_ratio"])
            result["models"][key] = rec
    result["summary"] = summarize(result)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return result


def best(by_rt: dict[str, dict[str, float]], arm: str) -> tuple[str, float]:
    """The runtime with the lowest p50 for ``arm`` and that p50 (ms)."""
    rt = min(by_rt, key=lambda r: by_rt[r][arm])
    return rt, by_rt[rt][arm]


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per model, size and batch: the best runtime of each file, the INT8 speed-ups (best INT8
    vs best FP32, and the best same-runtime ratio), x floor, and the issue's checks."""
    out: dict[str, Any] = {}
    ratio = result["floor_ratio"]
    for key, rec in result["models"].items():
        base = key.split("@")[0]
        f = rec["files"]["int8_pqd"]
        ort = f["ort"]
        gates = [o for o in ort["float_ops"] if o["op"] in ("Mul", "Sigmoid", "HardSigmoid")]
        row: dict[str, Any] = {
            "float_convs": ort["float_convs"],
            "float_gates": sum(o["count"] for o in gates),
            "openvino_float_convs": f.get("openvino_convs", {}).get("f32", 0),
            "batches": {},
        }
        for b, by_rt in rec["latency_ms"].items():
            rt8, p8 = best(by_rt, "int8_pqd")
            rt32, p32 = best(by_rt, "fp32")
            same = max(by_rt[r]["fp32"] / by_rt[r]["int8_pqd"] for r in by_rt)
            row["batches"][b] = {
                "int8_runtime": rt8,
                "int8_ms": p8,
                "fp32_runtime": rt32,
                "fp32_ms": p32,
                "speedup": round(p32 / p8, 3),
                "speedup_same_runtime": round(same, 3),
                "x_floor": round(p8 / (rec["floor_ms"]["int8"] * int(b)), 2),
            }
        checks = {"no_float_conv": row["float_convs"] == 0, "no_float_gate": not gates}
        b1 = row["batches"].get("1")
        if rec["size"] >= 224 and base in SHARE_OF_FLOOR and b1:
            need = SHARE_OF_FLOOR[base] * ratio
            checks[f"224 b1 speed-up >= {SHARE_OF_FLOOR[base]:.0%} of floor ratio"] = (
                b1["speedup"] >= need
            )
            row["needed_speedup"] = round(need, 3)
        if base == USER:
            for b, r in row["batches"].items():
                checks[f"faster than FP32 at batch {b}"] = r["speedup"] > 1.0
        row["checks"] = checks
        out[key] = row
    return out


def table(result: dict[str, Any]) -> str:
    """One row per model x size x batch: best FP32 and INT8 p50 (runtime), speed-ups, x floor,
    kernel counts; then the per-runtime p50s, the profiles and the checks."""
    lines = [
        "model@size                batch  FP32 ms (best rt)        INT8 ms (best rt)        "
        "speed-up  same-rt  x floor",
        "------------------------  -----  -----------------------  -----------------------  "
        "--------  -------  -------",
    ]
    for key, row in result["summary"].items():
        for b, r in row["batches"].items():
            lines.append(
                f"{key:<24}  {b:>5}  {r['fp32_ms']:9.3f} ({r['fp32_runtime']:<11})  "
                f"{r['int8_ms']:9.3f} ({r['int8_runtime']:<11})  {r['speedup']:7.2f}x  "
                f"{r['speedup_same_runtime']:6.2f}x  {r['x_floor']:7.2f}"
            )
    lines += ["", "p50 ms per runtime (file: onnxruntime / openvino / openvino-ir)"]
    for key, rec in result["models"].items():
        for b, by_rt in rec["latency_ms"].items():
            arms = next(iter(by_rt.values())).keys()
            cells = [f"{a} " + " / ".join(f"{by_rt[rt][a]:.3f}" for rt in by_rt) for a in arms]
            lines.append(f"  {key} b{b}: " + "; ".join(cells))
    lines += [
        "",
        "INT8 file kernels: onnxruntime int convs / float convs / Q / DQ / transposes; "
        "OpenVINO convs by precision; float ops",
    ]
    for key, rec in result["models"].items():
        for arm, f in rec["files"].items():
            if arm == "fp32":
                continue
            o = f["ort"]
            ops = ", ".join(f"{r['op']} x{r['count']}" for r in o["float_ops"]) or "-"
            ov = ", ".join(f"{p} {n}" for p, n in sorted(f.get("openvino_convs", {}).items()))
            lines.append(
                f"  {key} {arm}: {o['int_convs']} / {o['float_convs']} / {o['quantize']} / "
                f"{o['dequantize']} / {o['transposes']}; OpenVINO {ov or '-'}; float: {ops}"
            )
    profiled = {k: r["profile_ms"] for k, r in result["models"].items() if "profile_ms" in r}
    if profiled:
        lines += ["", "onnxruntime profile, batch 1, ms per call by kernel kind (FP32 -> INT8)"]
        for key, prof in profiled.items():
            kinds = sorted(set(prof["fp32"]) | set(prof["int8_pqd"]))
            cells = []
            for k in kinds:
                a, q = prof["fp32"].get(k, 0.0), prof["int8_pqd"].get(k, 0.0)
                gain = f" ({a / q:.2f}x)" if a and q else ""
                cells.append(f"{k} {a:.3f} -> {q:.3f}{gain}")
            lines.append(f"  {key}: " + "; ".join(cells))
            c = result["models"][key].get("ceiling")
            if c:
                lines.append(
                    f"    profiled FP32/INT8 {c['measured']:.2f}x; depthwise convs "
                    f"{c['depthwise_speedup']:.2f}x; {100 * c['rest_share']:.0f}% of INT8 time "
                    f"outside dense convs; ceiling with every dense conv at the floor ratio "
                    f"and the rest as measured: {c['speedup']:.2f}x"
                )
    lines += ["", "checks (the issue's Done-means)"]
    for key, row in result["summary"].items():
        marks = ", ".join(f"{c}: {'met' if ok else 'NOT met'}" for c, ok in row["checks"].items())
        need = f" (needs {row['needed_speedup']:.2f}x)" if "needed_speedup" in row else ""
        lines.append(f"  {key}{need}: {marks}")
    env = result["environment"]
    lines.append("")
    lines.append(
        f"GEMM peak ({result['threads']} threads, onnxruntime): int8 "
        f"{result['gemm_peak_gmacs']['int8']:.0f}, fp32 {result['gemm_peak_gmacs']['fp32']:.0f} "
        f"GMAC/s; floor ratio {result['floor_ratio']:.2f}x"
    )
    lines.append(f"CPU: {env['cpu']} ({', '.join(env['cpu_flags'])}), {env['logical_cpus']} CPUs")
    if "wall_s" in result:
        lines.append(f"wall {result['wall_s']:.0f} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 224], help="input H = W")
    p.add_argument(
        "--imagenet",
        type=int,
        default=128,
        help="from this size up, resnet18 / mobilenetv2 are their ImageNet layouts",
    )
    p.add_argument("--arms", nargs="+", choices=ARMS, default=["fp32", "int8_pqd"])
    p.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino", "openvino-ir"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=200, help="timed calls at batch 1, 32x32")
    p.add_argument("--profile", nargs="*", default=["mobilenetv2", "mobilenetv3_large", "resnet18"])
    p.add_argument("--profile-sizes", nargs="*", type=int, default=[224])
    p.add_argument("--profile-calls", type=int, default=30)
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--out", type=Path, help="keep the ONNX files here")
    args = p.parse_args(argv)
    args.arms = tuple(dict.fromkeys(["fp32", *args.arms, "int8_pqd"]))
    return args


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
