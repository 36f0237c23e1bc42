"""Every quantization option of the quantize stage, side by side: accuracy, MB, batch-1 ms.

    python benchmarks/quantization.py                                  # ~12 min on 2 cores
    python benchmarks/quantization.py --checkpoint runs/quick/baseline.safetensors
    python benchmarks/quantization.py --variants qat_pc ptq_minmax --json out.json

One baseline (FastNet-Q8 trained ``--epochs`` on the CIFAR-10 subset, or ``--checkpoint``)
is quantized once per variant with the quantize stage itself (``pqd.apply_stages`` with a
``QuantizeSpec``: calibration on the validation split, QAT fine-tuning where the variant
trains), exported with ``export_onnx`` as the pipeline does, and all artifacts plus the FP32
baseline are measured in ONE ``measure_artifacts`` call: top-1 of each ONNX file on the
test split (onnxruntime), bytes on disk, batch-1 latency p50/p90 in interleaved rounds, and
the kernels onnxruntime really runs after its graph optimizations (``QLinearConv`` = fused
INT8 conv; ``Conv``/``FusedConv`` = float conv). Ratios are against the FP32 file of the
same run. ``val`` is the fake-quant torch model's top-1 on the validation split (what
mixed precision and every other choice see).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QAT_TRAIN = {"lr": 0.01, "warmup": 0.0, "schedule": "cosine"}

# name -> (label, quantize stage options); QAT variants get --qat-epochs epochs
# (an option "target" sets the deployment target, pqd.target; default portable: 7-bit weights)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "qat_pc": ("QAT, per-channel (default: portable, 7-bit weights)", {"mode": "qat"}),
    "qat_pc_vnni": (
        "QAT, per-channel, target x86-vnni (8-bit weights)",
        {"mode": "qat", "target": "x86-vnni"},
    ),
    "ptq_minmax_vnni": (
        "PTQ min-max, target x86-vnni (8-bit weights)",
        {"mode": "ptq", "target": "x86-vnni"},
    ),
    "qat_pt": ("QAT, per-tensor", {"mode": "qat", "weights": {"granularity": "per_tensor"}}),
    "ptq_minmax": ("PTQ min-max", {"mode": "ptq"}),
    "ptq_percentile": (
        "PTQ percentile 99.99",
        {"mode": "ptq", "activations": {"observer": "percentile"}},
    ),
    "ptq_entropy": ("PTQ entropy (KL)", {"mode": "ptq", "activations": {"observer": "entropy"}}),
    "ptq_pt": (
        "PTQ min-max, per-tensor",
        {"mode": "ptq", "weights": {"granularity": "per_tensor"}},
    ),
    "ptq_wasym": (
        "PTQ min-max, asymmetric weights",
        {"mode": "ptq", "weights": {"symmetric": False}},
    ),
    "ptq_s8s8": (
        "PTQ min-max, symmetric int8 activations",
        {"mode": "ptq", "activations": {"symmetric": True}},
    ),
    "dynamic": ("dynamic (weights int8, activations at run time)", {"mode": "dynamic"}),
    "ptq_mixed": (
        "PTQ entropy + mixed precision (0.5 pt budget)",
        {
            "mode": "ptq",
            "activations": {"observer": "entropy"},
            "mixed_precision": {"max_drop_points": 0.5},
        },
    ),
    "ptq_int4": ("PTQ INT4 weights (per-channel)", {"mode": "ptq", "weights": {"bits": 4}}),
    "qat_int4": ("QAT INT4 weights (per-channel)", {"mode": "qat", "weights": {"bits": 4}}),
}


def _log(msg: str) -> None:
    print(f"[quantization] {msg}", file=sys.stderr, flush=True)


def kernel_summary(kernels: dict[str, int]) -> str:
    """What onnxruntime runs for the convs/linears: fused INT8, integer or float kernels."""
    parts = []
    for op in (
        "QLinearConv",
        "ConvInteger",
        "Conv",
        "FusedConv",
        "QGemm",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
        "Gemm",
    ):
        if kernels.get(op):
            parts.append(f"{kernels[op]} {op}")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pqd.checkpoint import save_checkpoint
    from pqd.context import Context
    from pqd.data import load_dataset, resolve_data_root
    from pqd.engine import apply_stages, recipe_baseline, seed_everything
    from pqd.measurement.artifacts import measure_artifacts, torch_reference
    from pqd.measurement.env import environment
    from pqd.measurement.parity import parity
    from pqd.measurement.runtime import avx2_logits
    from pqd.models import build_model
    from pqd.onnx_export import export_onnx
    from pqd.recipe import MeasureSpec, recipe_from_dict
    from pqd.train import evaluate

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    names = args.variants or list(VARIANTS)
    stages = []
    targets = []
    for n in names:
        opts = copy.deepcopy(VARIANTS[n][1])
        targets.append(opts.pop("target", "portable"))
        train = opts["mode"] == "qat"
        stages.append(
            {
                "stage": "quantize",
                **opts,
                "epochs": args.qat_epochs if train else 0,
                **({"train": QAT_TRAIN} if train else {}),
            }
        )
    recipe = recipe_from_dict(
        {
            "name": "quantization-benchmark",
            "seed": 0,
            "model": {"name": args.model},
            "data": {"dataset": "cifar10", "val_size": 500},
            "train": {
                "batch_size": 128,
                "lr": 0.2,
                "schedule": "onecycle",
                "warmup": 0.2,
                "label_smoothing": 0.2,
            },
            "baseline": {"epochs": args.epochs}
            if not args.checkpoint
            else {"checkpoint": str(args.checkpoint)},
            "stages": stages,
            "measure": {
                "runtimes": ["onnxruntime"],
                "threads": args.threads,
                "batch_sizes": [1],
                "repeats": args.repeats,
                "warmup": 50,
            },
        },
        "benchmark",
    )
    data = load_dataset("cifar10", resolve_data_root(args.data_dir, None), val_size=500, seed=0)
    seed_everything(0)
    device = torch.device("cpu")
    model = build_model(args.model, data.num_classes, data.mean, data.std)
    ctx = Context(data=data, device=device, teacher=model, progress=False)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.checkpoint:
        _log(f"training the {args.model} baseline for {args.epochs} epochs")
    recipe_baseline(model, data, recipe, device=device)
    if not args.checkpoint:
        save_checkpoint(model, out / "baseline.safetensors", {"recipe": recipe.name})
    baseline_s = time.perf_counter() - t0
    val = ctx.loader("val", 256)
    example = ctx.example_input().cpu()
    artifacts = {"fp32": export_onnx(model, out / "fp32.onnx", example, quantized=False)}
    rows: dict[str, dict[str, Any]] = {
        "fp32": {
            "label": "FP32 baseline",
            "val_accuracy": evaluate(model, val, device=device, progress=False),
            "seconds": round(baseline_s, 1),
        }
    }
    for i, name in enumerate(names):
        _log(f"{name}: {VARIANTS[name][0]}")
        t0 = time.perf_counter()
        # each variant from the baseline, seeded as stage i of a run (seed + 1000 * (i + 1))
        state = apply_stages(
            model,
            [recipe.stages[i]],
            data,
            model,
            train=recipe.train,
            seed=1000 * i,
            augment=recipe.data.augment,
            device=device,
            target=targets[i],
            threads=args.threads,
            fresh_model=lambda: build_model(args.model, data.num_classes, data.mean, data.std),
        )
        seconds = time.perf_counter() - t0
        rows[name] = {
            "label": VARIANTS[name][0],
            "seconds": round(seconds, 1),
            "val_accuracy": evaluate(state.model, val, device=device, progress=False),
            "precision": state.info["precision"],
            "float_layers": state.info["scheme"]["float_layers"],
        }
        if "mixed_precision" in state.info:
            rows[name]["mixed_precision"] = state.info["mixed_precision"]
            rows[name]["sensitivity"] = state.info["sensitivity"]
        state.model.cpu()
        artifacts[name] = export_onnx(state.model, out / f"{name}.onnx", example, quantized=True)
    _log(f"measuring {len(artifacts)} artifacts side by side")
    spec = MeasureSpec(**recipe.measure.model_dump())
    measured = measure_artifacts(artifacts, data, spec, parity_samples=256, progress=False)
    base = measured["fp32"]
    avx2 = {}
    if args.avx2:  # the same files on AVX2 kernels (no VNNI: int16 pair sums saturate)
        _log("running every file on OpenVINO capped at AVX2")
        x = data.test_x.float().div(255.0).numpy()
        for name, (path, deployed) in artifacts.items():
            reference = torch_reference(deployed, data, None)
            avx2[name] = parity(reference, avx2_logits(path, x, args.threads))
    for name, m in measured.items():
        ort = m["runtimes"]["onnxruntime"]
        rows[name].update(
            {
                "accuracy": m["accuracy"],
                "size_bytes": m["size_bytes"],
                "p50_ms": m["latency_ms"]["p50"],
                "p90_ms": m["latency_ms"]["p90"],
                "speedup": base["latency_ms"]["p50"] / m["latency_ms"]["p50"],
                "size_ratio": base["size_bytes"] / m["size_bytes"],
                "kernels": ort.get("kernels", {}),
                "parity": m["parity"],
                "saturation": m["saturation"],
                "avx2_parity": avx2.get(name),
                "macs": m["macs"],
                "bitops": m["bitops"],
            }
        )
    return {
        "model": args.model,
        "baseline": str(args.checkpoint or f"{args.epochs} epochs"),
        "qat_epochs": args.qat_epochs,
        "rows": rows,
        "threads": args.threads,
        "data": data.summary(),
        "environment": environment(args.threads),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def table(result: dict[str, Any]) -> str:
    """Markdown table, one row per variant, then the mixed-precision choice and setup."""
    header = [
        "variant",
        "precision",
        "top-1 test",
        "top-1 val",
        "MB",
        "p50 ms",
        "p90 ms",
        "vs FP32 (ms)",
        "vs FP32 (MB)",
        "parity (this CPU)",
        "pairs at risk",
        "parity (AVX2 kernels)",
        "onnxruntime runs",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["rows"].values():
        avx2 = r.get("avx2_parity")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    r.get("precision", "fp32"),
                    f"{100 * r['accuracy']:.2f}%",
                    f"{100 * r['val_accuracy']:.2f}%",
                    f"{r['size_bytes'] / 1e6:.2f}",
                    f"{r['p50_ms']:.3f}",
                    f"{r['p90_ms']:.3f}",
                    f"{r['speedup']:.2f}x",
                    f"{r['size_ratio']:.2f}x",
                    f"{100 * r['parity']['top1_agreement']:.2f}%",
                    str(r["saturation"]["pairs_at_risk"]),
                    "-"
                    if avx2 is None
                    else f"{100 * avx2['top1_agreement']:.2f}% "
                    f"(max {avx2['max_abs_logit_diff']:.3f})",
                    kernel_summary(r["kernels"]),
                ]
            )
            + " |"
        )
    notes = []
    for r in result["rows"].values():
        if "mixed_precision" in r:
            mp, sens = r["mixed_precision"], r["sensitivity"]
            top = ", ".join(
                f"{x['layer']} {x['drop_points']:.1f}"
                for x in sorted(sens["layers"], key=lambda x: -x["drop_points"])[:3]
            )
            notes.append(
                f"- mixed precision: float layers {r['float_layers'] or 'none'}; val "
                f"drop {mp['trace'][0]['drop_points']:.2f} -> {mp['val_drop_points']:.2f}"
                f" points (budget {mp['max_drop_points']}); most sensitive alone: {top}"
            )
    env = result["environment"]
    notes.append(
        f"- {result['model']}, baseline {result['baseline']}, QAT variants "
        f"{result['qat_epochs']} epochs; {result['data']['test']} test / "
        f"{result['data']['val']} val images (CIFAR-10 subset); batch 1, "
        f"{result['threads']} threads, onnxruntime "
        f"{env['libraries'].get('onnxruntime')}; {env['cpu']} "
        f"({', '.join(env['cpu_flags'])}); wall {result['wall_s']:.0f} s"
    )
    notes.append(
        "- parity: top-1 agreement of the file (onnxruntime) with its torch model "
        "on the test split; pairs at risk: int8 weight pairs whose int16 sum can "
        "saturate on a CPU without VNNI (read from the file); parity (AVX2 kernels): "
        "the same file on OpenVINO with oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA)"
    )
    return "\n".join([*lines, "", *notes])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fastnet_q8")
    ap.add_argument("--epochs", type=int, default=30, help="baseline epochs (no --checkpoint)")
    ap.add_argument("--checkpoint", type=Path, help="baseline weights instead of training")
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=300, help="timed calls per artifact")
    ap.add_argument("--data-dir", default=None, help="else PQD_DATA_DIR")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "quant-bench")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument(
        "--no-avx2",
        dest="avx2",
        action="store_false",
        help="skip the AVX2-kernel parity column (needs OpenVINO)",
    )
    args = ap.parse_args(argv)
    for category in (UserWarning, FutureWarning, DeprecationWarning):  # library chatter
        warnings.filterwarnings("ignore", category=category)
    from pqd.errors import PqdError

    try:
        result = run(args)
    except PqdError as exc:
        print(f"benchmarks/quantization.py: error: {exc.line()}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
