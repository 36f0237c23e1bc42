"""INT8 vs FP32 ONNX of vit_small on onnxruntime, side by side in one run.

    python benchmarks/vit_int8.py                         # batch 1 and 64, ~10 min loaded
    python benchmarks/vit_int8.py --profile --json vit.json

The model has random weights (seed 0; BN statistics from random images, as
``benchmarks/runtime.py`` builds models): latency does not depend on the weights. Its FP32
and INT8 files are exported the pipeline's way (``runtime.export_pair``: PT2E prepare,
calibration on random images, QDQ export). On each batch size one ``compare_latency`` call
times both files in interleaved rounds. Per file: onnxruntime's kernel counts after its
graph optimizations (integer linears and attention matmuls, float ones, Q / DQ left);
with ``--profile``, onnxruntime's profiler splits a batch-64 call into per-op times
(which ops cost). The CPU is named from the machine (``lscpu`` model name and flags).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runtime as rt_bench  # benchmarks/runtime.py

ARMS = ("fp32", "int8")
INT_OPS = ("QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "QLinearConv")
FLOAT_OPS = ("Gemm", "FusedGemm", "MatMul", "FusedMatMul", "Conv", "FusedConv")


def kernel_summary(path: Path) -> dict[str, Any]:
    """Integer and float matmul/conv kernels and the Q/DQ nodes onnxruntime runs."""
    from pqd.measurement.runtime import ort_kernels

    k = ort_kernels(path)
    return {
        "integer": {op: k[op] for op in INT_OPS if op in k},
        "float": {op: k[op] for op in FLOAT_OPS if op in k},
        "quantize": k.get("QuantizeLinear", 0),
        "dequantize": k.get("DequantizeLinear", 0),
        "kernels": k,
    }


def profile_ops(path: Path, threads: int, batch: int, calls: int = 5) -> dict[str, float]:
    """Milliseconds per call spent in each op type (onnxruntime's profiler), slowest first.

    Args:
        path: the ONNX file.
        threads: intra-op threads.
        batch: images per call.
        calls: profiled calls (after 2 unprofiled warm-up calls are discarded).

    Returns:
        ``{op_type: ms per call}``.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="pqd-prof-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prof")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((batch, *rt_bench.IMAGE), dtype=np.float32)
        for _ in range(2 + calls):
            session.run(None, {"input": x})
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: Counter[str] = Counter()
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    skip_before = runs[2]["ts"] if len(runs) > 2 else 0  # the two warm-up calls
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= skip_before:
            per_op[e["args"]["op_name"]] += e["dur"]
    return {op: round(us / calls / 1000, 3) for op, us in per_op.most_common()}


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from pqd.measurement.env import environment
    from pqd.measurement.latency import compare_latency
    from pqd.measurement.runtime import open_runner

    result: dict[str, Any] = {
        "model": args.model,
        "weights": "random (seed 0), BN statistics from random images",
        "environment": environment(args.threads),
        "threads": args.threads,
        "files": {},
        "latency_ms": {},
    }
    t0 = time.perf_counter()
    paths, _ = rt_bench.export_pair(rt_bench.build(args.model), out)
    result["export_s"] = round(time.perf_counter() - t0, 1)
    for arm, path in paths.items():
        result["files"][arm] = {"size_bytes": path.stat().st_size, **kernel_summary(path)}
    for b in args.batches:
        runners = {arm: open_runner("onnxruntime", paths[arm], args.threads) for arm in ARMS}
        stats = compare_latency(
            {arm: r.run for arm, r in runners.items()},
            (b, *rt_bench.IMAGE),
            warmup=max(3, 20 // b),
            repeats=max(args.rounds * 2, args.repeats // b),
            rounds=args.rounds,
            progress=False,
        )
        result["latency_ms"][str(b)] = {
            arm: {"p50": round(st.p50, 3), "min": round(st.min, 3), "calls": st.samples}
            for arm, st in stats.items()
        }
        del runners
        print(f"[vit_int8] batch {b}: {result['latency_ms'][str(b)]}", flush=True)
    if args.profile:
        result["profile_ms"] = {
            arm: profile_ops(paths[arm], args.threads, max(args.batches)) for arm in ARMS
        }
    return result


def table(result: dict[str, Any]) -> str:
    """p50 per batch and arm, the INT8 speed-up, kernel counts, the per-op profile."""
    lines = ["batch  fp32 ms  int8 ms  int8 x", "-----  -------  -------  ------"]
    for b, p in result["latency_ms"].items():
        f, i = p["fp32"]["p50"], p["int8"]["p50"]
        lines.append(f"{b:>5}  {f:7.2f}  {i:7.2f}  {f / i:5.2f}x")
    lines.append("")
    for arm in ARMS:
        s = result["files"][arm]
        lines.append(
            f"{arm}: integer {s['integer'] or '-'}; float {s['float'] or '-'}; "
            f"Q {s['quantize']}, DQ {s['dequantize']}"
        )
    for arm, ops in result.get("profile_ms", {}).items():
        top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(ops.items())[:8])
        batch = max(map(int, result["latency_ms"]))
        lines.append(f"profile {arm} (ms per batch-{batch} call): {top}")
    env = result["environment"]
    lines.append(
        f"CPU: {env['cpu']} ({', '.join(env['cpu_flags'])}), {env['logical_cpus']} CPUs, "
        f"{result['threads']} threads; weights: {result['weights']}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=200, help="timed calls at batch 1")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--profile", action="store_true", help="per-op times at the largest batch")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--out", type=Path, help="keep the ONNX files here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pqd-vit-") as tmp:
        result = run(args, args.out or Path(tmp))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
