"""Does the channel count matter to INT8 kernels? ResNet-18 pruned to odd vs rounded widths.

    python benchmarks/channel_widths.py            # ~3 min on 2 cores

ResNet-18 (random weights, 10 classes) is channel-pruned with pqd's own planner and
Torch-Pruning surgery (group L2 magnitude, ``scope: layer``) to: 50% of channels
(widths 32/64/128/256), 45% with no rounding (widths 35/70/140/281: odd), and 45% with
kept widths rounded to multiples of 8 and of 16. Each is exported like the pipeline does
(FP32 ONNX; INT8 QDQ after ``prepare_qat`` + 2 calibration batches) and every file is
timed side by side in ONE ``compare_latency`` call on onnxruntime at batch 1 (interleaved
rounds, an untimed 100 ms pause after each file's block). Prints MACs (read from the INT8
file) and p50/p90, and p50 per GMAC relative to the dense INT8 file.

This is why ``prune_channels`` rounds kept widths to ``round_to: 8`` by default.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args(argv)

    import torch

    from pqd.measurement.complexity import onnx_complexity
    from pqd.measurement.latency import compare_latency
    from pqd.measurement.runtime import open_runner
    from pqd.models import build_model
    from pqd.onnx_export import export_onnx
    from pqd.prune.channels import apply_structure, plan_records
    from pqd.quant.calibration import calibrate
    from pqd.quant.prepare import prepare_qat
    from pqd.recipe import recipe_from_dict

    t0 = time.perf_counter()
    torch.manual_seed(0)
    base = build_model("resnet18", 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)).eval()
    example = torch.rand(2, 3, 32, 32)
    calib = [(torch.rand(32, 3, 32, 32), None) for _ in range(2)]
    scores = {n: p.detach().abs() for n, p in base.named_parameters() if p.ndim >= 2}
    variants = {
        "dense": (0.0, None),
        "50% (x8 widths)": (0.5, None),
        "45%, odd widths": (0.45, None),
        "45%, round_to 8": (0.45, 8),
        "45%, round_to 16": (0.45, 16),
    }
    paths, macs, widths = {}, {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="pqd-widths-"))
    for i, (name, (ratio, round_to)) in enumerate(variants.items()):
        m = copy.deepcopy(base)
        if ratio:
            spec = recipe_from_dict(
                {
                    "model": {"name": "resnet18"},
                    "stages": [{"stage": "prune_channels", "ratio": ratio, "round_to": round_to}],
                }
            ).stages[0]
            apply_structure(m, example, plan_records(m, example, scores, 1 - ratio, spec))
        widths[name] = sorted(
            {c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)}
        )
        paths[f"{name} FP32"], _ = export_onnx(m, tmp / f"{i}_fp32.onnx", example, quantized=False)
        g = prepare_qat(m, example)
        calibrate(g, calib, len(calib), torch.device("cpu"))
        paths[f"{name} INT8"], _ = export_onnx(g, tmp / f"{i}_int8.onnx", example, quantized=True)
        macs[name] = onnx_complexity(paths[f"{name} INT8"])["macs"]
        print(f"exported {name}: widths {widths[name]}", file=sys.stderr, flush=True)
    per_call = 0.1 / max(1, args.repeats // args.rounds)
    timed = {}
    for i, (name, path) in enumerate(paths.items()):
        timed[name] = open_runner("onnxruntime", path, args.threads).run
        timed[f"_pause{i}"] = lambda _x, s=per_call: time.sleep(s)
    stats = compare_latency(
        timed, (1, 3, 32, 32), warmup=50, repeats=args.repeats, rounds=args.rounds, progress=False
    )
    dense_rate = stats["dense INT8"].p50 / macs["dense"]
    print(
        "| variant | conv widths | MMACs | FP32 p50 ms | INT8 p50 ms | INT8 p90 ms | "
        "INT8 ms per MAC vs dense |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in variants:
        s8, s32 = stats[f"{name} INT8"], stats[f"{name} FP32"]
        print(
            f"| {name} | {'/'.join(map(str, widths[name]))} | {macs[name] / 1e6:.1f} | "
            f"{s32.p50:.3f} | {s8.p50:.3f} | {s8.p90:.3f} | "
            f"{s8.p50 / macs[name] / dense_rate:.2f}x |"
        )
    print(
        f"\nonnxruntime, batch 1, {args.threads} threads, {args.repeats} calls per file in "
        f"{args.rounds} interleaved rounds; wall {time.perf_counter() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
